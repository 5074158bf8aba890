"""DyVTE as an lmms-eval model (`--model dyvte`) and the tiny world's lmms-eval tasks.

lmms-eval finds the model through this package's entry point in the `lmms_eval.models` group (`manifests`), so
`pip install -e ".[lmms]"` is all it takes; the model itself is `llava.eval.lmms.model.DyVTE`. The tiny world's
tasks live in `TASKS_DIR` (`python -m llava.eval.lmms` prints it), for lmms-eval's `--include_path`.
"""

from __future__ import annotations

import os

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
MODEL_ID = "dyvte"


def manifests() -> list:
    """The entry point's payload: the model's manifest (imported only when lmms-eval loads its plug-ins)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path="llava.eval.lmms.model.DyVTE")]
