#!/usr/bin/env bash
# GQA test-dev balanced: answers with exit statistics, LLaVA's conversion, exact-match accuracy, a summary row.
source "$(dirname "$0")/common.sh"
SPLIT=${SPLIT:-llava_gqa_testdev_balanced}
GQADIR=${GQADIR:-$EVAL_ROOT/gqa}
ANSWERS=$GQADIR/answers/$SPLIT/$CKPT

QUESTIONS=$(asked_questions "$GQADIR/$SPLIT.jsonl" "$ANSWERS")
run_chunks llava.eval.model_vqa_loader "$ANSWERS" --question-file "$QUESTIONS" --image-folder "$GQADIR/data/images"
# LLaVA's script writes the predictions beside GQA's eval.py in the data folder; here each run keeps its own, so
# runs at once (a sweep over several GPUs) never score each other's answers.
"$PYTHON" -m llava.eval.eval_gqa convert --src "$ANSWERS/merge.jsonl" --dst "$ANSWERS/testdev_balanced_predictions.json"
"$PYTHON" -m llava.eval.eval_gqa score --questions "$GQADIR/data/testdev_balanced_questions.json" \
    --predictions "$ANSWERS/testdev_balanced_predictions.json" --asked "$QUESTIONS" --metrics-out "$ANSWERS/metrics.json"
summarize gqa "$ANSWERS/merge.jsonl" "$ANSWERS/metrics.json"
