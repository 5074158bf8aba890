#!/usr/bin/env bash
# VizWiz: answers and the EvalAI submission file, a summary row. Test ground truth is server-side, so metrics stay {}
# unless VIZWIZ_ANNOTATIONS (VizWiz val.json) exists: then the questions are scored offline with VizWiz's evaluator
# rules. For val, point VIZWIZ_QUESTIONS and VIZWIZ_IMAGES at the val questions (question_id, image) and images.
source "$(dirname "$0")/common.sh"
whole_benchmark
DIR=${VIZWIZ_DIR:-$EVAL_ROOT/vizwiz}
VIZWIZ_QUESTIONS=${VIZWIZ_QUESTIONS:-$DIR/llava_test.jsonl}
VIZWIZ_IMAGES=${VIZWIZ_IMAGES:-$DIR/test}
VIZWIZ_ANNOTATIONS=${VIZWIZ_ANNOTATIONS:-$DIR/val.json}
ANSWERS=$DIR/answers/$CKPT

run_chunks llava.eval.model_vqa_loader "$ANSWERS" --question-file "$VIZWIZ_QUESTIONS" --image-folder "$VIZWIZ_IMAGES"
mkdir -p "$DIR/answers_upload"
"$PYTHON" -m llava.eval.eval_vqa vizwiz-submission --annotation-file "$VIZWIZ_QUESTIONS" \
    --result-file "$ANSWERS/merge.jsonl" --dst "$DIR/answers_upload/$CKPT.json"
if [ -f "$VIZWIZ_ANNOTATIONS" ]; then
    "$PYTHON" -m llava.eval.eval_vqa vizwiz --annotation-file "$VIZWIZ_ANNOTATIONS" \
        --question-file "$VIZWIZ_QUESTIONS" --result-file "$ANSWERS/merge.jsonl" --metrics-out "$ANSWERS/metrics.json"
else
    echo '{}' > "$ANSWERS/metrics.json"
fi
summarize vizwiz "$ANSWERS/merge.jsonl" "$ANSWERS/metrics.json"
