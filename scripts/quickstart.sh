#!/usr/bin/env bash
# DyVTE end to end on the tiny world, on a laptop CPU: set up .venv, generate the world, add gates to the world's
# trained LLaVA (init_weight.py), train them (finetune_visual_gate.sh), evaluate GQA-style on 800 held-out questions,
# one-word and long-answer kinds (llava.world.evaluate: what gqa.sh writes, every setting in one process) with no
# exit, dynamic exit at several thresholds, fixed exit after every K, FastV at several ratios, dynamic+FastV and the
# reduction methods at an equal visual budget, then print the table with confidence intervals, the gaps at equal
# FLOPs, the long answers by their own rules, and plot accuracy against cost. About 9 minutes on 2 cores; the full
# table of docs/tiny_world.md (2000 questions, both budget rules, about 19 minutes):
#   TEST_IMAGES=2000 BUDGET_RULES="equal paper" bash scripts/quickstart.sh
#
# Every knob is an environment variable (defaults in brackets):
#   PYTHON [set up .venv and use it]   WORLD [./playground/data/tiny_world]   TRAIN_IMAGES [20000]  TEST_IMAGES [800]
#   LONG_KINDS ["describe,ground,read": the long-answer kinds the world asks too; "": the one-word kinds only]
#   BASE_MODEL [./checkpoints/tiny-world-llava, trained by llava.world.train_model if missing: ~35 min]
#   GATE_STEPS [300]  GATE_BATCH_SIZE [8]  GATE_LEARNING_RATE [5e-5]   THRESHOLDS ["0.5 0.9 0.99 0.999"]
#   GATE_ARGS [none; more gate-training flags, e.g. "--gate_ratio_threshold 1.2"]
#   FIXED_LAYERS [every K from 0 to L-1]   FASTV_LAYER [2]   FASTV_RATIOS ["0.5 0.75 0.9"]
#   DYNAMIC_FASTV_THRESHOLDS ["0.99"] (with FastV at FASTV_LAYER, R = DYNAMIC_FASTV_RATIO [0.5])
#   METHODS ["fastv random pdrop dart visionzip divprune cdpruner downsample sparsevlm"] at BUDGETS ["64"] visual tokens by
#   each of BUDGET_RULES ["equal"; equal: the same layer average of 196 for every method; paper: the papers'
#   LLaVA-1.5 settings carried over, whose 64 of 576 is 22 of 196 here: below what one of 8 layers with every token
#   averages, so the methods that prune inside the LLM cannot reach it (listed under the table, not run)]
#   GATES_AFTER ["divprune cdpruner"]: those of METHODS run again with the gates deciding after them, at GATES_AFTER_THRESHOLD
#   [0.99]   SHORTV [1: ShortV's layers calibrated on SHORTV_QUESTIONS [20] test questions, then run; 0: not]
#   EVAL_BATCH_SIZE [128]  RESULTS [./playground/quickstart]
# An empty FASTV_RATIOS, DYNAMIC_FASTV_THRESHOLDS, METHODS or GATES_AFTER leaves those runs out.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ]; then
    echo "== setting up .venv (first run only: a few minutes) =="
    source scripts/setup.sh
    PYTHON=$PY
fi
WORLD=${WORLD:-./playground/data/tiny_world}
TRAIN_IMAGES=${TRAIN_IMAGES:-20000}
TEST_IMAGES=${TEST_IMAGES:-800}  # 2000 for the full table of docs/tiny_world.md (about 19 min)
LONG_KINDS=${LONG_KINDS-describe,ground,read}
BASE_MODEL=${BASE_MODEL:-./checkpoints/tiny-world-llava}
INIT_MODEL=${INIT_MODEL:-$BASE_MODEL-exit-init}
GATED_MODEL=${GATED_MODEL:-$BASE_MODEL-visual-gate}
GATE_STEPS=${GATE_STEPS:-300}
GATE_BATCH_SIZE=${GATE_BATCH_SIZE:-8}
GATE_LEARNING_RATE=${GATE_LEARNING_RATE:-5e-5}
THRESHOLDS=${THRESHOLDS:-0.5 0.9 0.99 0.999}
FASTV_LAYER=${FASTV_LAYER:-2}
FASTV_RATIOS=${FASTV_RATIOS-0.5 0.75 0.9}
DYNAMIC_FASTV_THRESHOLDS=${DYNAMIC_FASTV_THRESHOLDS-0.99}
DYNAMIC_FASTV_RATIO=${DYNAMIC_FASTV_RATIO:-0.5}
METHODS=${METHODS-fastv random pdrop dart visionzip divprune cdpruner downsample sparsevlm}   # run at each visual budget
BUDGETS=${BUDGETS:-64}   # visual tokens of 196 per image (SparseVLM reaches 50 at the least)
BUDGET_RULES=${BUDGET_RULES:-${BUDGET_RULE:-equal}}  # "equal paper" for the full table
GATES_AFTER=${GATES_AFTER-divprune cdpruner}
GATES_AFTER_THRESHOLD=${GATES_AFTER_THRESHOLD:-0.99}
SHORTV=${SHORTV:-1}
SHORTV_QUESTIONS=${SHORTV_QUESTIONS:-20}
EVAL_BATCH_SIZE=${EVAL_BATCH_SIZE:-128}  # the fastest on 2 cores (32: 64 s, 128: 48 s, 256: 67 s for two runs)
RESULTS=${RESULTS:-./playground/quickstart}
export PYTHON
started=$SECONDS

echo "== [1/5] the tiny world: $WORLD =="
# written afresh unless its world.json records these very settings
"$PYTHON" -m llava.world.generate --reuse --out "$WORLD" --train "$TRAIN_IMAGES" --test "$TEST_IMAGES" \
    ${LONG_KINDS:+--long-kinds "$LONG_KINDS"}

echo "== [2/5] the world's LLaVA: $BASE_MODEL =="
if [ ! -f "$BASE_MODEL/config.json" ]; then
    echo "not found: training it from scratch (about 35 minutes on 2 cores)"
    "$PYTHON" -m llava.world.train_model --data-path "$WORLD/train.json" --out "$BASE_MODEL"
fi

LAYERS=$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['num_hidden_layers'])" "$BASE_MODEL/config.json")
FIXED_LAYERS=${FIXED_LAYERS:-$(seq -s ' ' 0 $((LAYERS - 1)))}

echo "== [3/5] init_weight.py: fresh gates → $INIT_MODEL =="
"$PYTHON" init_weight.py --model-path "$BASE_MODEL" --output-dir "$INIT_MODEL"

echo "== [4/5] finetune_visual_gate.sh: $GATE_STEPS steps → $GATED_MODEL =="
MODEL_PATH=$INIT_MODEL DATA_PATH=$WORLD/train_single_turn.json IMAGE_FOLDER=$WORLD/images OUTPUT_DIR=$GATED_MODEL \
    BATCH_SIZE=$GATE_BATCH_SIZE LEARNING_RATE=$GATE_LEARNING_RATE WORKERS=2 \
    bash scripts/v1_5/finetune_visual_gate.sh --max_steps "$GATE_STEPS" --disable_tqdm False --logging_steps 250 \
    ${GATE_ARGS:-}

echo "== [5/5] GQA-style evaluation: none, dynamic τ ∈ {$THRESHOLDS}, fixed K ∈ {$FIXED_LAYERS}, FastV K=$FASTV_LAYER R ∈ {$FASTV_RATIOS}, dynamic+FastV τ ∈ {$DYNAMIC_FASTV_THRESHOLDS}, {$METHODS} at budgets {$BUDGETS} (rules: $BUDGET_RULES), gates after {$GATES_AFTER}, ShortV =="
ANSWERS_ROOT=$WORLD/eval/gqa/answers/llava_gqa_testdev_balanced/quickstart
rm -rf "$ANSWERS_ROOT"  # answers of an earlier gate model must not be resumed
mkdir -p "$RESULTS"
# One process for every setting (the model loaded once); each run writes what scripts/v1_5/eval/gqa.sh writes with
# the same flags and CKPT=quickstart/NAME.
RUNS=(--run "none=--exit-mode none")
for tau in $THRESHOLDS; do RUNS+=(--run "dynamic-$tau=--exit-mode dynamic --exit-threshold $tau"); done
for k in $FIXED_LAYERS; do RUNS+=(--run "fixed-$k=--exit-mode fixed --exit-layer $k"); done
for r in $FASTV_RATIOS; do
    RUNS+=(--run "fastv-$FASTV_LAYER-$r=--exit-mode fastv --fastv-k $FASTV_LAYER --fastv-r $r")
done
for tau in $DYNAMIC_FASTV_THRESHOLDS; do
    RUNS+=(--run "dynamic+fastv-$tau-$FASTV_LAYER-$DYNAMIC_FASTV_RATIO=--exit-mode dynamic+fastv --exit-threshold $tau --fastv-k $FASTV_LAYER --fastv-r $DYNAMIC_FASTV_RATIO")
done
for budget in $BUDGETS; do
    for rule in $BUDGET_RULES; do
        for method in $METHODS; do
            RUNS+=(--run "$method-$rule$budget=--exit-method $method --visual-budget $budget --budget-rule $rule")
        done
        for method in $GATES_AFTER; do  # DyVTE after a reduction before the LLM: the stage list that budget runs
            if stages=$("$PYTHON" -m llava.model.exit_args --model-path "$GATED_MODEL" --exit-method "$method" \
                    --visual-budget "$budget" --budget-rule "$rule" 2>/dev/null); then
                RUNS+=(--run "$method-$rule$budget+gates-$GATES_AFTER_THRESHOLD=--exit-stages $stages,gates:$GATES_AFTER_THRESHOLD")
            fi  # out of reach: the method's own run says so
        done
    done
done
if [ "$SHORTV" = 1 ]; then  # ShortV's layers by their Layer Contribution on the first test questions, as its README
    "$PYTHON" -m llava.analysis.shortv --model-path "$GATED_MODEL" --question-file "$WORLD/eval/gqa/llava_gqa_testdev_balanced.jsonl" \
        --image-folder "$WORLD/eval/gqa/data/images" --limit "$SHORTV_QUESTIONS" --output-dir "$RESULTS" | tail -n 1
    RUNS+=(--run "shortv=--exit-stages $("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['stages'])" "$RESULTS/shortv.json")")
fi
"$PYTHON" -m llava.world.evaluate --model-path "$GATED_MODEL" --gqa-dir "$WORLD/eval/gqa" --answers-root "$ANSWERS_ROOT" \
    --batch-size "$EVAL_BATCH_SIZE" "${RUNS[@]}"

echo "== results ($(( (SECONDS - started) / 60 )) min) =="
"$PYTHON" -m llava.world.report --answers-root "$ANSWERS_ROOT" --out "$RESULTS"
