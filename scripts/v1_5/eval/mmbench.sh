#!/usr/bin/env bash
# MMBench (dev by default): circular evaluation over all option rotations, the submission file, local accuracy
# when the TSV has answers, a summary row.
source "$(dirname "$0")/common.sh"
whole_benchmark
DIR=${MMBENCH_DIR:-$EVAL_ROOT/mmbench}
SPLIT=${SPLIT:-mmbench_dev_20230712}
ANSWERS=$DIR/answers/$SPLIT/$CKPT

run_chunks llava.eval.model_vqa_mmbench "$ANSWERS" --question-file "$DIR/$SPLIT.tsv" \
    --single-pred-prompt --all-rounds --lang "${LANG_MMBENCH:-en}"
mkdir -p "$DIR/answers_upload/$SPLIT"
"$PYTHON" -m llava.eval.eval_mmbench convert --annotation-file "$DIR/$SPLIT.tsv" --result-file "$ANSWERS/merge.jsonl" \
    --out "$DIR/answers_upload/$SPLIT/$CKPT.tsv"
if head -1 "$DIR/$SPLIT.tsv" | tr '\t' '\n' | grep -qx answer; then
    "$PYTHON" -m llava.eval.eval_mmbench score --annotation-file "$DIR/$SPLIT.tsv" --result-file "$ANSWERS/merge.jsonl" \
        --metrics-out "$ANSWERS/metrics.json"
else
    echo '{}' > "$ANSWERS/metrics.json"
fi
summarize mmbench "$ANSWERS/merge.jsonl" "$ANSWERS/metrics.json"
