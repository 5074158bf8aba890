#!/usr/bin/env bash
# Source it: sets up .venv on a fresh machine (a CPU torch wheel when there is no CUDA GPU, then this package
# with its training extras) and leaves its interpreter in $PY. Re-running it on a set-up machine is quick.
# VENV names another environment; TRANSFORMERS_VERSION pins transformers there (e.g. the oldest we support);
# WITH_LMMS_EVAL=1 adds lmms-eval, for the plug-in's tests.
VENV=${VENV:-.venv}
LMMS_EVAL_VERSION=0.7.3
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PY="$VENV/bin/python"

if ! "$PY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        "$PY" -m pip install -q torch
    else
        # An unpinned torch resolves a multi-GB CUDA build; this one is a CPU wheel.
        "$PY" -m pip install -q torch==2.13.0
    fi
fi
export DS_BUILD_OPS=0
"$PY" -m pip install -q -e ".[train,dev]" ${TRANSFORMERS_VERSION:+"transformers==$TRANSFORMERS_VERSION"}
if [ "${WITH_LMMS_EVAL:-0}" = 1 ]; then
    # without the dependencies of lmms-eval's own models and metrics (see scripts/lmms-eval-imports.txt)
    "$PY" -m pip install -q --no-deps "lmms-eval==$LMMS_EVAL_VERSION"
    "$PY" -m pip install -q -r scripts/lmms-eval-imports.txt
fi
