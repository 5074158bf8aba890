#!/usr/bin/env bash
# VQAv2: answers and the EvalAI submission file, a summary row. Test-dev ground truth is server-side, so metrics stay
# {} unless VQAV2_ANNOTATIONS (official val annotations) exists: then the split is scored offline with vqaEval's
# rules. For val, point SPLIT, VQAV2_TEST_FILE and VQAV2_IMAGES at the val questions and images.
source "$(dirname "$0")/common.sh"
whole_benchmark
DIR=${VQAV2_DIR:-$EVAL_ROOT/vqav2}
SPLIT=${SPLIT:-llava_vqav2_mscoco_test-dev2015}
VQAV2_TEST_FILE=${VQAV2_TEST_FILE:-$DIR/llava_vqav2_mscoco_test2015.jsonl}
VQAV2_IMAGES=${VQAV2_IMAGES:-$DIR/test2015}
VQAV2_ANNOTATIONS=${VQAV2_ANNOTATIONS:-$DIR/v2_mscoco_val2014_annotations.json}
ANSWERS=$DIR/answers/$SPLIT/$CKPT

run_chunks llava.eval.model_vqa_loader "$ANSWERS" --question-file "$DIR/$SPLIT.jsonl" --image-folder "$VQAV2_IMAGES"
mkdir -p "$DIR/answers_upload/$SPLIT"
"$PYTHON" -m llava.eval.eval_vqa vqav2-submission --src "$ANSWERS/merge.jsonl" \
    --test-file "$VQAV2_TEST_FILE" --dst "$DIR/answers_upload/$SPLIT/$CKPT.json"
if [ -f "$VQAV2_ANNOTATIONS" ]; then
    "$PYTHON" -m llava.eval.eval_vqa vqav2 --annotation-file "$VQAV2_ANNOTATIONS" --result-file "$ANSWERS/merge.jsonl" \
        --metrics-out "$ANSWERS/metrics.json"
else
    echo '{}' > "$ANSWERS/metrics.json"
fi
summarize vqav2 "$ANSWERS/merge.jsonl" "$ANSWERS/metrics.json"
