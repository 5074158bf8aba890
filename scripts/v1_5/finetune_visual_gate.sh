#!/usr/bin/env bash
# Train the exit gates of a LLaVA-1.5 checkpoint (LLM, vision tower and projector frozen) with DeepSpeed ZeRO-2,
# over all visible GPUs; without a GPU the same run goes to the CPU (NUM_PROCS processes). Every path and size is an
# environment variable; extra Trainer flags go after the script's name, e.g. `... finetune_visual_gate.sh --max_steps
# 10`. Input errors (data, checkpoint, options) end the run with one line on stderr and exit status 1.
# Relative paths are read from the folder you call it from. The defaults train on the tiny world (generated here if
# missing, TRAIN_IMAGES / TEST_IMAGES images); for LLaVA-1.5-7B set, as the paper does:
#   MODEL_PATH=./checkpoints/llava-v1.5-7b-exit-init OUTPUT_DIR=./checkpoints/llava-v1.5-7b-visual-gate \
#   DATA_PATH=./playground/data/mix665k_single_turn_only_image_1%.json IMAGE_FOLDER=./playground/data
set -euo pipefail
source "$(dirname "$0")/../script_env.sh"
# Paths the caller gave are read from the caller's folder; the defaults below from the repository's.
paths_from_caller MODEL_PATH DATA_PATH IMAGE_FOLDER OUTPUT_DIR DEEPSPEED_CONFIG
cd "$(dirname "$0")/../.."

MODEL_PATH=${MODEL_PATH:-./checkpoints/tiny-world-llava-exit-init}   # from init_weight.py
DATA_PATH=${DATA_PATH:-$TINY_WORLD/train_single_turn.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-$TINY_WORLD/images}
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/tiny-world-llava-visual-gate}
VERSION=${VERSION:-v1}
DEEPSPEED_CONFIG=${DEEPSPEED_CONFIG:-./scripts/zero2.json}
BATCH_SIZE=${BATCH_SIZE:-16}          # per device; the paper: 16 x 8 GPUs = 128
GRAD_ACCUM=${GRAD_ACCUM:-1}
LEARNING_RATE=${LEARNING_RATE:-6e-5}
EPOCHS=${EPOCHS:-1}
MODEL_MAX_LENGTH=${MODEL_MAX_LENGTH:-2048}
SAVE_STEPS=${SAVE_STEPS:-50000}
WORKERS=${WORKERS:-4}
REPORT_TO=${REPORT_TO:-none}          # wandb to log there as well
PYTHON=${PYTHON:-python}
NUM_PROCS=${NUM_PROCS:-1}             # without a GPU: processes on the CPU (gloo), global batch NUM_PROCS x BATCH_SIZE
# DeepSpeed's rendezvous port, free at launch: its default 29500 would stop a second training on the same machine.
MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -c "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])")}

if [ "$DATA_PATH" = "$TINY_WORLD/train_single_turn.json" ]; then ensure_tiny_world; fi
if [ ! -f "$DEEPSPEED_CONFIG" ]; then
    echo "finetune_visual_gate.sh: error: DEEPSPEED_CONFIG=$DEEPSPEED_CONFIG: no such file" >&2
    exit 1
fi

DEEPSPEED=("$PYTHON" -m deepspeed.launcher.runner --master_port "$MASTER_PORT")  # `deepspeed` of $PYTHON's environment
NUM_GPUS=${NUM_GPUS:-$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")}
if [ "$NUM_GPUS" -gt 0 ]; then
    PRECISION=(--bf16 True --tf32 True)
    LAUNCH=("${DEEPSPEED[@]}" --num_gpus "$NUM_GPUS")
else
    # DeepSpeed's CPU (gloo) backend, one process per NUM_PROCS; fp32, since CPUs gain nothing from bf16 here.
    PRECISION=(--use_cpu True)
    LAUNCH=("${DEEPSPEED[@]}" --num_gpus "$NUM_PROCS")
fi

"${LAUNCH[@]}" llava/train/train.py \
    --deepspeed "$DEEPSPEED_CONFIG" \
    --model_name_or_path "$MODEL_PATH" \
    --version "$VERSION" \
    --data_path "$DATA_PATH" \
    --image_folder "$IMAGE_FOLDER" \
    --image_aspect_ratio pad \
    --group_by_modality_length True \
    "${PRECISION[@]}" \
    --output_dir "$OUTPUT_DIR" \
    --num_train_epochs "$EPOCHS" \
    --per_device_train_batch_size "$BATCH_SIZE" \
    --gradient_accumulation_steps "$GRAD_ACCUM" \
    --save_strategy steps \
    --save_steps "$SAVE_STEPS" \
    --save_total_limit 1 \
    --learning_rate "$LEARNING_RATE" \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type cosine \
    --logging_steps 1 \
    --model_max_length "$MODEL_MAX_LENGTH" \
    --dataloader_num_workers "$WORKERS" \
    --report_to "$REPORT_TO" \
    "$@"
