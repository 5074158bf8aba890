#!/usr/bin/env bash
# Gate width sweep on the tiny world: for each width, fresh gates on the world's LLaVA (init_weight.py), the same
# gate training, dynamic exit at one threshold on the held-out questions; then llava.world.gate_sweep compares every
# width's exit decisions, accuracy and FLOPs with the widest one's.
#
# Environment (defaults in brackets): PYTHON [python]  WORLD [./playground/data/tiny_world]
#   BASE_MODEL [./checkpoints/tiny-world-llava]  WIDTHS ["16 64 256 2048"]  GATE_STEPS [300]  GATE_BATCH_SIZE [8]
#   GATE_LEARNING_RATE [5e-5]  THRESHOLD [0.9]  EVAL_BATCH_SIZE [32]  SWEEP [./playground/gate_widths] (models,
#   answers and the report)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
WORLD=${WORLD:-./playground/data/tiny_world}
BASE_MODEL=${BASE_MODEL:-./checkpoints/tiny-world-llava}
WIDTHS=${WIDTHS:-16 64 256 2048}
GATE_STEPS=${GATE_STEPS:-300}
GATE_BATCH_SIZE=${GATE_BATCH_SIZE:-8}
GATE_LEARNING_RATE=${GATE_LEARNING_RATE:-5e-5}
THRESHOLD=${THRESHOLD:-0.9}
EVAL_BATCH_SIZE=${EVAL_BATCH_SIZE:-32}
SWEEP=${SWEEP:-./playground/gate_widths}
export PYTHON

if [ ! -f "$WORLD/train_single_turn.json" ]; then
    "$PYTHON" -m llava.world.generate --out "$WORLD"
fi
ANSWERS_ROOT=$WORLD/eval/gqa/answers/llava_gqa_testdev_balanced/gate_widths
rm -rf "$ANSWERS_ROOT"  # answers of earlier gates must not be resumed
for width in $WIDTHS; do
    echo "== gate width $width =="
    "$PYTHON" init_weight.py --model-path "$BASE_MODEL" --output-dir "$SWEEP/init-$width" --gate-hidden-size "$width"
    MODEL_PATH=$SWEEP/init-$width DATA_PATH=$WORLD/train_single_turn.json IMAGE_FOLDER=$WORLD/images \
        OUTPUT_DIR=$SWEEP/gated-$width BATCH_SIZE=$GATE_BATCH_SIZE LEARNING_RATE=$GATE_LEARNING_RATE WORKERS=2 \
        bash scripts/v1_5/finetune_visual_gate.sh --max_steps "$GATE_STEPS" --disable_tqdm False --logging_steps 250
    MODEL_PATH=$SWEEP/gated-$width EVAL_ROOT=$WORLD/eval CKPT=gate_widths/width-$width BATCH_SIZE=$EVAL_BATCH_SIZE \
        EXIT_MODE=dynamic EXIT_THRESHOLD=$THRESHOLD bash scripts/v1_5/eval/gqa.sh
done
"$PYTHON" -m llava.world.gate_sweep --answers-root "$ANSWERS_ROOT" --model-config "$BASE_MODEL/config.json" --out "$SWEEP"
