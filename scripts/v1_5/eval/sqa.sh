#!/usr/bin/env bash
# ScienceQA (test, CQM-A): letter answers, accuracy and IMG-Accuracy (the reported number), a summary row.
source "$(dirname "$0")/common.sh"
whole_benchmark
DIR=${SQA_DIR:-$EVAL_ROOT/scienceqa}
ANSWERS=$DIR/answers/$CKPT

run_chunks llava.eval.model_vqa_science "$ANSWERS" --question-file "$DIR/llava_test_CQM-A.json" \
    --image-folder "$DIR/images/test" --single-pred-prompt
"$PYTHON" -m llava.eval.eval_science_qa --base-dir "$DIR" --result-file "$ANSWERS/merge.jsonl" \
    --output-file "$ANSWERS/output.jsonl" --output-result "$ANSWERS/result.json" --metrics-out "$ANSWERS/metrics.json"
summarize sqa "$ANSWERS/merge.jsonl" "$ANSWERS/metrics.json"
