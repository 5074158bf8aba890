"""`prune:SCORER:K:R`: after the first K layers each sample keeps the round((1 - R)·n) of its n remaining visual
tokens that SCORER ranks highest (FastV with the `fastv` scorer); the rest leave the sequence and the later layers'
caches. A sample left with none has exited after K. Several prune stages prune what the earlier ones left."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llava.model.visual_exit.budget import Budget
from llava.model.visual_exit.scorers import SCORERS
from llava.model.visual_exit.stages.base import ExitState, LayerStep, Stage, spec_number
from llava.model.visual_exit.tokens import TokenLayout


def lowest_ranked(scores: torch.Tensor, visual: torch.Tensor, ratio: float) -> torch.Tensor:
    """(B, T) bool: the visual slots outside each sample's top round((1 - ratio) * its visual count) by score."""
    return outside_top(scores, visual, ((1.0 - ratio) * visual.sum(dim=1).double()).round().long())


def outside_top(scores: torch.Tensor, visual: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the visual slots outside each sample's `keep[b]` highest-scored ones (ties: the earlier slot)."""
    order = scores.masked_fill(~visual, float("-inf")).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return visual & (rank >= keep[:, None])


def record_pruning(state: ExitState, pruned: torch.Tensor, visual: torch.Tensor, layer: int, layout: TokenLayout) -> None:
    """Account `pruned` (B, T) of the samples' remaining `visual` slots after `layer` layers: a sample left with
    none has exited there; the others count their pruned tokens."""
    counts = pruned.sum(dim=1)
    emptied = state.active & (counts == visual.sum(dim=1))
    state.exit(emptied, layer, layout)
    state.pruned_visual = torch.where(emptied, state.pruned_visual, state.pruned_visual + counts)


@dataclass(frozen=True)
class Prune(Stage):
    scorer: str
    layer: int
    ratio: float
    usage = "prune:SCORER:K:R"

    @classmethod
    def parse(cls, args: list[str]) -> Prune:
        scorer, layer, ratio = args
        if scorer not in SCORERS:
            raise ValueError(f"unknown scorer {scorer!r}; known: {', '.join(SCORERS)}")
        return cls(scorer, spec_number(layer, int, 1), spec_number(ratio, float, 0.0, 1.0))

    @property
    def pruning_layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def check(self, num_layers: int, has_gates: bool) -> None:
        if self.layer > num_layers:
            raise ValueError(f"prune layer {self.layer} exceeds the model's {num_layers} layers")

    @classmethod
    def at_budget(cls, budget: Budget, scorer: str) -> str:
        """Both rules: K = 2 (of 32) keeping x with K·n + (L − K)·x = L·T, the convention of SparseVLM's table that
        the papers comparing against FastV use (FastV itself published K and R, no budgets)."""
        k = budget.layer(2)
        return f"prune:{scorer}:{k}:{1 - budget.kept_after(k) / budget.visual:.4f}"

    def after_layer(self, step: LayerStep, state: ExitState, layout: TokenLayout):
        # K = L would prune after the last layer, which changes nothing.
        if step.index + 1 != self.layer or self.layer == state.num_layers or not state.any_active:
            return None
        visual = layout.visual & state.active[:, None]
        pruned = lowest_ranked(SCORERS[self.scorer](step, layout), visual, self.ratio)
        record_pruning(state, pruned, visual, self.layer, layout)
        return pruned
