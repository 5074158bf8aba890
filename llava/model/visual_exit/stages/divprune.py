"""`divprune:R[:renumber|keep]` (DivPrune, Alvar et al., CVPR 2025): before the first decoder layer each sample keeps
round(R·n) of its n visual tokens (R: the share kept, its code's SUBSET_RATIO), picked for diversity on the LLM's
input embeddings — the projector's outputs — with no attention and no text.

The official selection (vbdi/divprune, `llava_arch.py`), re-implemented batched (its code prunes sample 0's image
span, at a hard-coded offset, and applies that to the whole batch): distances D = 1 − cosine similarity between
the sample's visual embeddings, in their dtype; first the token whose nearest neighbour is farthest (the second
smallest of its column, the smallest being its own 0), then, step by step, the token farthest from all picked so
far (the largest min over picked rows; the first on ties; picked tokens are not excluded, their own distance is 0).
The kept tokens keep their order; the official LLaVA code then numbers positions 0, 1, ... again (`renumber`,
the default; `keep` keeps the original positions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llava.model.visual_exit.budget import Budget
from llava.model.visual_exit.stages.base import ExitState, InputReduction, spec_number, spec_positions
from llava.model.visual_exit.stages.prune import record_pruning
from llava.model.visual_exit.tokens import TokenLayout


def diverse_subset(features: torch.Tensor, visual: torch.Tensor, ratio: float) -> torch.Tensor:
    """(B, T) bool: of each sample's `visual` slots, the round(ratio · n) its greedy max-min selection picks on
    `features` (B, T, H)."""
    batch, length = visual.shape
    counts = visual.sum(dim=1)
    keep_counts = (counts.double() * ratio).round().long()  # Python's round: half to even, as torch's
    width = int(counts.max())
    kept = torch.zeros_like(visual)
    if width == 0:
        return kept
    # Each sample's visual slots first, in order: (B, N) slot indices, `real` where they are visual tokens.
    slots = (~visual).long().argsort(dim=1, stable=True)[:, :width]
    real = visual.gather(1, slots)
    vectors = features.gather(1, slots[..., None].expand(-1, -1, features.shape[-1]))
    unit = vectors / vectors.norm(dim=-1, keepdim=True)
    distance = 1.0 - unit @ unit.transpose(1, 2)  # (B, N, N), in the features' dtype
    pair = real[:, :, None] & real[:, None, :]
    distance = distance.masked_fill(~pair, float("inf"))
    if width > 1:  # the nearest neighbour's distance: the second smallest of each column
        nearest = distance.topk(2, dim=1, largest=False).values[:, 1]
    else:
        nearest = distance[:, 0]
    scores = nearest.masked_fill(~real, float("-inf"))
    closest = None
    rows = torch.arange(batch, device=visual.device)
    for step in range(int(keep_counts.max())):
        if step:
            scores = closest.masked_fill(~real, float("-inf"))
        picked = scores.argmax(dim=1)  # the first of equal maxima
        taking = step < keep_counts
        kept[rows[taking], slots[rows, picked][taking]] = True
        row = distance[rows, picked].masked_fill(~real, float("inf"))
        closest = row if closest is None else torch.minimum(closest, row)
    return kept


@dataclass(frozen=True)
class DivPrune(InputReduction):
    ratio: float
    renumbers: bool = True
    usage = "divprune:R[:renumber|keep]"
    optional_fields = 1

    @classmethod
    def parse(cls, args: list[str]) -> DivPrune:
        return cls(spec_number(args[0], float, 0.0, 1.0), spec_positions(args, 1))

    @classmethod
    def at_budget(cls, budget: Budget) -> str:
        """Both rules: R = T / n, so that round(R·n) = T tokens enter every layer (its code released only R = 0.098,
        56 of 576; 1/3, 2/9, 1/9 give 192, 128, 64)."""
        return f"divprune:{budget.target / budget.visual:.10g}"

    def reduce(self, state: ExitState, layout: TokenLayout, hidden: torch.Tensor, visual: torch.Tensor):
        pruned = visual & ~diverse_subset(hidden, visual, self.ratio)
        record_pruning(state, pruned, visual, 0, layout)
        return pruned
