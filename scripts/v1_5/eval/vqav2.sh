#!/usr/bin/env bash
# VQAv2 test-dev: answers and the EvalAI submission file (ground truth is server-side), a summary row.
source "$(dirname "$0")/common.sh"
DIR=${VQAV2_DIR:-$EVAL_ROOT/vqav2}
SPLIT=${SPLIT:-llava_vqav2_mscoco_test-dev2015}
ANSWERS=$DIR/answers/$SPLIT/$CKPT

run_chunks llava.eval.model_vqa_loader "$ANSWERS" --question-file "$DIR/$SPLIT.jsonl" --image-folder "$DIR/test2015"
mkdir -p "$DIR/answers_upload/$SPLIT"
"$PYTHON" -m llava.eval.eval_vqa vqav2-submission --src "$ANSWERS/merge.jsonl" \
    --test-file "$DIR/llava_vqav2_mscoco_test2015.jsonl" --dst "$DIR/answers_upload/$SPLIT/$CKPT.json"
echo '{}' > "$ANSWERS/metrics.json"
summarize vqav2 "$ANSWERS/merge.jsonl" "$ANSWERS/metrics.json"
