"""Tiny checkpoints of every VLM family, written by our own writer once per test module, and images of known
sizes for them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from llava.model.families import FAMILY_MODULES
from llava.tiny.llava import TinyGeometry
from llava.tiny.families import write_tiny_family

FAMILIES = list(FAMILY_MODULES)
GEOMETRY = TinyGeometry(seed=3)
WIDE, SQUARE = (30, 60), (56, 56)  # (height, width) of the test images
# Visual tokens the model fills for a WIDE and a SQUARE image, worked out by hand from each family's tiny tower
# (28 px tiles of 14 px patches):
#   llava-hf: every image becomes one 28 px tile, (28/14)^2 = 4.
#   llava-next, onevision: the 2x2 base tile (4), then the grid of the pinpoint that fits best: WIDE → 28x56, 1x2
#     tiles, 2x4 features + 2 newlines = 10 (14); SQUARE → 56x56, 4x4 + 4 newlines = 20 (24).
#   qwen, onevision-1.5: pixels rounded to whole 28 px units: WIDE → 28x56, 2x4 patches / 2^2 = 2; SQUARE → 4x4 / 4 = 4 (Qwen3-VL and Qwen3.5,
#     16 px patches: 32 px units, WIDE → 32x64, the same 2 and 4).
#   internvl: one token per 28 px tile, plus a thumbnail when there are several: WIDE → 2 + 1, SQUARE → 4 + 1.
#   gemma3: every image resized to the tower's 56 px, its 4x4 patches pooled to mm_tokens_per_image = 4.
EXPECTED_TOKENS = {
    "llava-hf": (4, 4), "llava-next": (14, 24), "llava-onevision": (14, 24),
    "qwen2-vl": (2, 4), "qwen2.5-vl": (2, 4), "qwen3-vl": (2, 4), "qwen3-vl-moe": (2, 4), "qwen3.5": (2, 4), "llava-onevision-1.5": (2, 4),
    "internvl": (3, 5),
    "gemma3": (4, 4),
}


def image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    height, width = size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module", params=FAMILIES)
def family_checkpoint(request, tmp_path_factory) -> tuple[str, str]:
    """(family, folder) of a tiny checkpoint without gates."""
    return request.param, write_tiny_family(str(tmp_path_factory.mktemp(request.param)), request.param, GEOMETRY)
