"""`pdrop` scorer (PyramidDrop, Xing et al. 2024): a visual token is worth what the last instruction token attends
to it, head-averaged, in the *next* layer: that layer's own norm and query/key projections applied to the states
the layer just produced, RoPE at the tokens' positions, softmax over every key the last token sees.

As for FastV, only that one query row is computed; no layer runs on eager attention for it.
"""

from __future__ import annotations

import torch

from llava.model.visual_exit.scorers.fastv import last_token_attention
from llava.model.visual_exit.stages.base import LayerStep
from llava.model.visual_exit.tokens import TokenLayout


def pdrop_scores(step: LayerStep, layout: TokenLayout) -> torch.Tensor:
    """(B, T): the last prompt token's attention in the layer after the step's (there is one: nothing is pruned
    after the last layer)."""
    following = step.decoder.layers[step.index + 1]
    return last_token_attention(following, step.output, layout, step.index + 1, step.window(step.index + 1))
