#!/usr/bin/env bash
# MME: per-category acc and acc+, perception and cognition scores, a summary row.
source "$(dirname "$0")/common.sh"
whole_benchmark
DIR=${MME_DIR:-$EVAL_ROOT/MME}
ANSWERS=$DIR/answers/$CKPT

run_chunks llava.eval.model_vqa_loader "$ANSWERS" --question-file "$DIR/llava_mme.jsonl" \
    --image-folder "$DIR/MME_Benchmark_release_version"
"$PYTHON" -m llava.eval.eval_mme convert --question-file "$DIR/llava_mme.jsonl" --result-file "$ANSWERS/merge.jsonl" \
    --data-dir "$DIR/MME_Benchmark_release_version" --out-dir "$DIR/eval_tool/answers/$CKPT"
"$PYTHON" -m llava.eval.eval_mme score --results-dir "$DIR/eval_tool/answers/$CKPT" --metrics-out "$ANSWERS/metrics.json"
summarize mme "$ANSWERS/merge.jsonl" "$ANSWERS/metrics.json"
