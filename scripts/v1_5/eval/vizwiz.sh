#!/usr/bin/env bash
# VizWiz test: answers and the EvalAI submission file (ground truth is server-side), a summary row.
source "$(dirname "$0")/common.sh"
DIR=${VIZWIZ_DIR:-$EVAL_ROOT/vizwiz}
ANSWERS=$DIR/answers/$CKPT

run_chunks llava.eval.model_vqa_loader "$ANSWERS" --question-file "$DIR/llava_test.jsonl" --image-folder "$DIR/test"
mkdir -p "$DIR/answers_upload"
"$PYTHON" -m llava.eval.eval_vqa vizwiz-submission --annotation-file "$DIR/llava_test.jsonl" \
    --result-file "$ANSWERS/merge.jsonl" --dst "$DIR/answers_upload/$CKPT.json"
echo '{}' > "$ANSWERS/metrics.json"
summarize vizwiz "$ANSWERS/merge.jsonl" "$ANSWERS/metrics.json"
