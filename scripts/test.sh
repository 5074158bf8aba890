#!/usr/bin/env bash
# Set up .venv on a fresh machine (CPU torch when there is no CUDA GPU) and run the test suite on the transformers
# it resolves (the newest). Without arguments it then also runs the exit, generation and oracle tests on the oldest
# transformers we support, in .venv-transformers-$OLDEST_TRANSFORMERS, set up the same way. Arguments go to pytest
# (main environment only).
set -euo pipefail
cd "$(dirname "$0")/.."
OLDEST_TRANSFORMERS=${OLDEST_TRANSFORMERS:-5.17.0}
ORACLE_TESTS=(tests/test_compat.py tests/test_visual_exit.py tests/test_generation.py tests/test_decoding.py
    tests/test_stages.py tests/test_sliding_window.py tests/test_fastv.py tests/test_model.py tests/test_world_model.py
    tests/test_loader_variants.py tests/test_analysis_stages.py tests/test_families.py tests/test_anyres.py
    tests/test_tiny_families.py tests/test_family_processing.py tests/test_pyramid_drop.py tests/test_dart.py
    tests/test_visionzip.py tests/test_sparsevlm.py tests/test_budget.py tests/test_lmms_eval.py tests/test_gate_features.py
    tests/test_official_positions.py tests/test_stock_behaviour.py tests/test_hybrid_linear.py tests/test_video.py
    tests/test_divprune.py tests/test_shortv.py tests/test_resize.py tests/test_cdpruner.py tests/test_static_cache.py)

export WITH_LMMS_EVAL=1
source scripts/setup.sh
if [ $# -gt 0 ]; then
    exec "$PY" -m pytest -q "$@"
fi
"$PY" -c "import transformers; print('== the whole suite on transformers', transformers.__version__)"
"$PY" -m pytest -q

VENV=.venv-transformers-$OLDEST_TRANSFORMERS TRANSFORMERS_VERSION=$OLDEST_TRANSFORMERS source scripts/setup.sh
"$PY" -c "import transformers; print('== exit, generation and oracle tests on transformers', transformers.__version__)"
"$PY" -m pytest -q "${ORACLE_TESTS[@]}"
