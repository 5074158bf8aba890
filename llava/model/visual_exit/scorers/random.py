"""`random` scorer: a seeded uniform ranking, the baseline benchmark papers find hard to beat.

A token's score depends only on its own RoPE position, never on the batch or its padding, so a sample pruned in a
batch keeps the same tokens as alone; the same positions always get the same scores."""

from __future__ import annotations

import torch

from llava.model.visual_exit.stages.base import LayerStep
from llava.model.visual_exit.tokens import TokenLayout

SEED = 0


def random_scores(step: LayerStep, layout: TokenLayout) -> torch.Tensor:
    """(B, T): a uniform draw per position id, from one seeded stream (its prefix does not depend on its length)."""
    positions = layout.position_ids
    table = torch.rand(int(positions.max()) + 1, generator=torch.Generator().manual_seed(SEED))
    return table.to(positions.device)[positions]
