#!/usr/bin/env bash
# TextVQA val with OCR tokens: VQA accuracy (EvalAI normalisation), a summary row.
source "$(dirname "$0")/common.sh"
whole_benchmark
DIR=${TEXTVQA_DIR:-$EVAL_ROOT/textvqa}
ANSWERS=$DIR/answers/$CKPT

run_chunks llava.eval.model_vqa_loader "$ANSWERS" \
    --question-file "$DIR/llava_textvqa_val_v051_ocr.jsonl" --image-folder "$DIR/train_images"
"$PYTHON" -m llava.eval.eval_vqa textvqa --annotation-file "$DIR/TextVQA_0.5.1_val.json" \
    --result-file "$ANSWERS/merge.jsonl" --metrics-out "$ANSWERS/metrics.json"
summarize textvqa "$ANSWERS/merge.jsonl" "$ANSWERS/metrics.json"
