#!/usr/bin/env bash
# POPE (adversarial, popular, random): accuracy, precision, recall, F1, yes-ratio per category, a summary row.
source "$(dirname "$0")/common.sh"
DIR=${POPE_DIR:-$EVAL_ROOT/pope}
ANSWERS=$DIR/answers/$CKPT

QUESTIONS=$(asked_questions "$DIR/llava_pope_test.jsonl" "$ANSWERS")
run_chunks llava.eval.model_vqa_loader "$ANSWERS" --question-file "$QUESTIONS" --image-folder "$DIR/val2014"
"$PYTHON" -m llava.eval.eval_pope --annotation-dir "$DIR/coco" --question-file "$DIR/llava_pope_test.jsonl" \
    --asked "$QUESTIONS" --result-file "$ANSWERS/merge.jsonl" --metrics-out "$ANSWERS/metrics.json"
summarize pope "$ANSWERS/merge.jsonl" "$ANSWERS/metrics.json"
