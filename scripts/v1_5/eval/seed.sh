#!/usr/bin/env bash
# SEED-Bench: per-type, image and video accuracy, the upload file, a summary row.
source "$(dirname "$0")/common.sh"
whole_benchmark
DIR=${SEED_DIR:-$EVAL_ROOT/seed_bench}
ANSWERS=$DIR/answers/$CKPT

run_chunks llava.eval.model_vqa_loader "$ANSWERS" --question-file "$DIR/llava-seed-bench.jsonl" --image-folder "$DIR"
mkdir -p "$DIR/answers_upload"
"$PYTHON" -m llava.eval.eval_seed --annotation-file "$DIR/SEED-Bench.json" --result-file "$ANSWERS/merge.jsonl" \
    --result-upload-file "$DIR/answers_upload/$CKPT.jsonl" --metrics-out "$ANSWERS/metrics.json"
summarize seed "$ANSWERS/merge.jsonl" "$ANSWERS/metrics.json"
