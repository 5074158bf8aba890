# Shared by the benchmark scripts in this folder (source it; it runs nothing by itself).
# Environment, all optional:
#   MODEL_PATH, MODEL_BASE, EVAL_ROOT (and each script's own *_DIR), relative to where you call the script from;
#   CKPT (answers subfolder, default: <model folder>_<exit settings>, e.g. llava-v1.5-7b_dynamic-0.5);
#   EXIT_MODE / EXIT_LAYER / EXIT_THRESHOLD / FASTV_K / FASTV_R, or EXIT_STAGES (e.g. prune:random:2:0.5,gates:0.9),
#   or EXIT_METHOD + VISUAL_BUDGET (e.g. pdrop 64: a method at retained visual tokens, by BUDGET_RULE paper (its
#   published setting) or equal (the same layer average); VISUAL_TOKENS per image for checkpoints whose count
#   depends on the image); default: the checkpoint's config, BATCH_SIZE,
#   CONV_MODE (default: the template the checkpoint saved, else LLaVA's rule for its folder name),
#   CUDA_VISIBLE_DEVICES (one chunk per listed GPU; without a GPU one chunk on the CPU), PYTHON,
#   LIMIT (the first N questions only, scored on those: a quick look; gqa.sh and pope.sh).
# The defaults evaluate the tiny world's gated model on its GQA-format questions (generated here if missing, with
# TRAIN_IMAGES / TEST_IMAGES images); for real benchmarks set MODEL_PATH and EVAL_ROOT=./playground/data/eval
# (LLaVA's layout).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/../../script_env.sh"
# Paths the caller gave are read from the caller's folder; the defaults below from the repository's.
paths_from_caller MODEL_PATH MODEL_BASE EVAL_ROOT GQADIR MME_DIR MMBENCH_DIR POPE_DIR SEED_DIR SQA_DIR TEXTVQA_DIR \
    VIZWIZ_DIR VQAV2_DIR VQAV2_ANNOTATIONS VQAV2_TEST_FILE VQAV2_IMAGES VIZWIZ_ANNOTATIONS VIZWIZ_QUESTIONS VIZWIZ_IMAGES
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."

MODEL_PATH=${MODEL_PATH:-./checkpoints/tiny-world-llava-visual-gate}
EVAL_ROOT=${EVAL_ROOT:-$TINY_WORLD/eval}
BATCH_SIZE=${BATCH_SIZE:-1}
PYTHON=${PYTHON:-python}
if [ ! -f "$MODEL_PATH/config.json" ] && [ ! -f "$MODEL_PATH/visual_gates.json" ]; then
    if [ "$MODEL_PATH" = ./checkpoints/tiny-world-llava-visual-gate ]; then
        echo "$(basename "$0"): error: no trained gates yet in $MODEL_PATH: run \`python init_weight.py\` and" \
            "\`bash scripts/v1_5/finetune_visual_gate.sh\` first, or set MODEL_PATH (e.g. ./checkpoints/tiny-world-llava)" >&2
    else
        echo "$(basename "$0"): error: MODEL_PATH=$MODEL_PATH: no checkpoint there (no config.json)" >&2
    fi
    exit 1
fi
if [ "$EVAL_ROOT" = "$TINY_WORLD/eval" ]; then ensure_tiny_world; fi

LOADER_ARGS=(--model-path "$MODEL_PATH" --temperature 0 --batch-size "$BATCH_SIZE")
EXIT_ARGS=()
[ -n "${MODEL_BASE:-}" ] && LOADER_ARGS+=(--model-base "$MODEL_BASE")
[ -n "${CONV_MODE:-}" ] && LOADER_ARGS+=(--conv-mode "$CONV_MODE")
[ -n "${EXIT_MODE:-}" ] && EXIT_ARGS+=(--exit-mode "$EXIT_MODE")
[ -n "${EXIT_LAYER:-}" ] && EXIT_ARGS+=(--exit-layer "$EXIT_LAYER")
[ -n "${EXIT_THRESHOLD:-}" ] && EXIT_ARGS+=(--exit-threshold "$EXIT_THRESHOLD")
[ -n "${FASTV_K:-}" ] && EXIT_ARGS+=(--fastv-k "$FASTV_K")
[ -n "${FASTV_R:-}" ] && EXIT_ARGS+=(--fastv-r "$FASTV_R")
[ -n "${EXIT_STAGES:-}" ] && EXIT_ARGS+=(--exit-stages "$EXIT_STAGES")
[ -n "${EXIT_METHOD:-}" ] && EXIT_ARGS+=(--exit-method "$EXIT_METHOD")
[ -n "${VISUAL_BUDGET:-}" ] && EXIT_ARGS+=(--visual-budget "$VISUAL_BUDGET")
[ -n "${BUDGET_RULE:-}" ] && EXIT_ARGS+=(--budget-rule "$BUDGET_RULE")
[ -n "${VISUAL_TOKENS:-}" ] && EXIT_ARGS+=(--visual-tokens "$VISUAL_TOKENS")
LOADER_ARGS+=(${EXIT_ARGS[@]+"${EXIT_ARGS[@]}"})
# Named after the model and the exit settings, so a run with other settings never resumes another's answers.
CKPT=${CKPT:-$("$PYTHON" -m llava.eval.run_settings --model-path "$MODEL_PATH" ${EXIT_ARGS[@]+"${EXIT_ARGS[@]}"})${LIMIT:+_limit$LIMIT}}
if [ -n "${LIMIT:-}" ] && ! [ "$LIMIT" -ge 1 ] 2>/dev/null; then
    echo "$(basename "$0"): error: LIMIT=$LIMIT: a number of questions, at least 1" >&2
    exit 1
fi

# asked_questions FILE DIR: FILE, or with LIMIT=N a copy of its first N questions in DIR (JSON lines): what the run
# asks and is scored on.
asked_questions() {
    local file=$1 dir=$2
    if [ -z "${LIMIT:-}" ]; then echo "$file"; return; fi
    mkdir -p "$dir"
    head -n "$LIMIT" "$file" > "$dir/questions.limit$LIMIT.jsonl"
    echo "$dir/questions.limit$LIMIT.jsonl"
}

# whole_benchmark: for scripts whose scorer needs an answer to every question of its annotations.
whole_benchmark() {
    if [ -n "${LIMIT:-}" ]; then
        echo "$(basename "$0"): error: LIMIT: this benchmark's scorer needs every question; LIMIT works with gqa.sh" \
            "and pope.sh (or run llava.eval.model_vqa_loader with --limit and score it yourself)" >&2
        exit 1
    fi
}

if "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    IFS=',' read -ra GPULIST <<< "${CUDA_VISIBLE_DEVICES:-0}"
else
    GPULIST=(cpu)
fi
CHUNKS=${CHUNKS:-${#GPULIST[@]}}

# run_chunks LOADER_MODULE ANSWERS_DIR [loader args...]: one loader per chunk (a GPU each, or all on the CPU), then
# merge.jsonl in chunk order. CHUNKS overrides the count (several CPU processes, or a test).
run_chunks() {
    local module=$1 answers_dir=$2
    shift 2
    mkdir -p "$answers_dir"
    local pids=() parts=()
    for IDX in $(seq 0 $((CHUNKS - 1))); do
        local gpu=${GPULIST[$((IDX % ${#GPULIST[@]}))]}
        local device=(--device cuda)
        [ "$gpu" = cpu ] && device=(--device cpu)
        parts+=("$answers_dir/${CHUNKS}_${IDX}.jsonl")
        CUDA_VISIBLE_DEVICES=${gpu/cpu/} "$PYTHON" -m "$module" "${LOADER_ARGS[@]}" "${device[@]}" "$@" \
            --answers-file "$answers_dir/${CHUNKS}_${IDX}.jsonl" --num-chunks "$CHUNKS" --chunk-idx "$IDX" &
        pids+=($!)
    done
    # Stopped (kill, Ctrl-C): the loaders stop too, keeping every answer written and releasing their locks, so a
    # rerun resumes; nothing is merged or scored from a partial run.
    trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait; echo "stopped: the answers so far stay in $answers_dir; rerun to resume" >&2; exit 143' TERM INT
    local failed=0
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    trap - TERM INT
    [ "$failed" = 0 ] || { echo "a chunk failed (its message is above); nothing merged" >&2; exit 1; }
    "$PYTHON" -m llava.eval.merge --out "$answers_dir/merge.jsonl" "${parts[@]}"
}

# summarize BENCHMARK ANSWERS METRICS_JSON: the run's table row and <answers>.summary.json.
summarize() {
    "$PYTHON" -m llava.eval.summary --benchmark "$1" --answers-file "$2" --metrics-json "$3"
}
