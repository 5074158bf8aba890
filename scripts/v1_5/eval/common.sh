# Shared by the benchmark scripts in this folder (source it; it runs nothing by itself).
# Environment, all optional:
#   MODEL_PATH, MODEL_BASE, CKPT (answers subfolder, default: the model folder's name), EVAL_ROOT,
#   EXIT_MODE / EXIT_LAYER / EXIT_THRESHOLD / FASTV_K / FASTV_R (default: the checkpoint's config), BATCH_SIZE, CONV_MODE,
#   CUDA_VISIBLE_DEVICES (one chunk per listed GPU; without a GPU one chunk on the CPU), PYTHON.
# The defaults evaluate the tiny world's gated model on its GQA-format questions (scripts/quickstart.sh); for real
# benchmarks set MODEL_PATH and EVAL_ROOT=./playground/data/eval (LLaVA's layout).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."

MODEL_PATH=${MODEL_PATH:-./checkpoints/tiny-world-llava-visual-gate}
CKPT=${CKPT:-$(basename "$MODEL_PATH")}
EVAL_ROOT=${EVAL_ROOT:-./playground/data/tiny_world/eval}
BATCH_SIZE=${BATCH_SIZE:-1}
CONV_MODE=${CONV_MODE:-vicuna_v1}
PYTHON=${PYTHON:-python}

LOADER_ARGS=(--model-path "$MODEL_PATH" --conv-mode "$CONV_MODE" --temperature 0 --batch-size "$BATCH_SIZE")
[ -n "${MODEL_BASE:-}" ] && LOADER_ARGS+=(--model-base "$MODEL_BASE")
[ -n "${EXIT_MODE:-}" ] && LOADER_ARGS+=(--exit-mode "$EXIT_MODE")
[ -n "${EXIT_LAYER:-}" ] && LOADER_ARGS+=(--exit-layer "$EXIT_LAYER")
[ -n "${EXIT_THRESHOLD:-}" ] && LOADER_ARGS+=(--exit-threshold "$EXIT_THRESHOLD")
[ -n "${FASTV_K:-}" ] && LOADER_ARGS+=(--fastv-k "$FASTV_K")
[ -n "${FASTV_R:-}" ] && LOADER_ARGS+=(--fastv-r "$FASTV_R")

if "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    IFS=',' read -ra GPULIST <<< "${CUDA_VISIBLE_DEVICES:-0}"
else
    GPULIST=(cpu)
fi
CHUNKS=${#GPULIST[@]}

# run_chunks LOADER_MODULE ANSWERS_DIR [loader args...]: one loader per GPU on its chunk, then merge.jsonl in order.
run_chunks() {
    local module=$1 answers_dir=$2
    shift 2
    mkdir -p "$answers_dir"
    local pids=()
    for IDX in $(seq 0 $((CHUNKS - 1))); do
        local device=(--device cuda)
        [ "${GPULIST[$IDX]}" = cpu ] && device=(--device cpu)
        CUDA_VISIBLE_DEVICES=${GPULIST[$IDX]/cpu/} "$PYTHON" -m "$module" "${LOADER_ARGS[@]}" "${device[@]}" "$@" \
            --answers-file "$answers_dir/${CHUNKS}_${IDX}.jsonl" --num-chunks "$CHUNKS" --chunk-idx "$IDX" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
    : > "$answers_dir/merge.jsonl"
    for IDX in $(seq 0 $((CHUNKS - 1))); do
        cat "$answers_dir/${CHUNKS}_${IDX}.jsonl" >> "$answers_dir/merge.jsonl"
    done
}

# summarize BENCHMARK ANSWERS METRICS_JSON: the run's table row and <answers>.summary.json.
summarize() {
    "$PYTHON" -m llava.eval.summary --benchmark "$1" --answers-file "$2" --metrics-json "$3"
}
