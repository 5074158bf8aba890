"""`pdrop:L1-L2-...:λ[:positions]` (PyramidDrop, Xing et al. 2024): after the first L_s layers (s = 1, 2, ...) each
sample keeps ⌊n·λ^s⌋ of its n original visual tokens, those the `pdrop` scorer ranks highest (the last instruction
token's attention in the next layer); the rest leave the sequence and the later layers' caches. LLaVA-1.5's default
is `pdrop:8-16-24:0.5` (576 → 288 → 144 → 72). A sample left with none has exited there.

Positions, as PyramidDrop's code has them (`renumber`, the default): after each drop the remaining tokens are
numbered 0, 1, ... again, so the next boundary's ranking and every later layer see the renumbered positions, and
each decode token takes, in each layer, the position after that layer's own cached tokens (its code lowers the
incoming position by the tokens dropped at each boundary). `keep`: every token keeps its original position, as the
exit and FastV do."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llava.model.visual_exit.budget import Budget, schedule_average, solve
from llava.model.visual_exit.scorers.pdrop import pdrop_scores
from llava.model.visual_exit.stages.base import ExitState, LayerStep, Stage, spec_number, spec_positions
from llava.model.visual_exit.stages.prune import outside_top, record_pruning
from llava.model.visual_exit.tokens import TokenLayout


@dataclass(frozen=True)
class PyramidDrop(Stage):
    layers: tuple[int, ...]
    ratio: float
    renumbers: bool = True
    usage = "pdrop:L1-L2-...:λ[:renumber|keep]"
    optional_fields = 1

    @classmethod
    def parse(cls, args: list[str]) -> PyramidDrop:
        layers_text, ratio = args[:2]
        layers = tuple(spec_number(text, int, 1) for text in layers_text.split("-"))
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"layers {layers_text} must increase")
        return cls(layers, spec_number(ratio, float, 0.0, 1.0), spec_positions(args, 2))

    @classmethod
    def at_budget(cls, budget: Budget) -> str:
        """Both rules: boundaries [2, 8, 16] (of 32) with λ solved for the layer average, its authors' advice for
        budgets below its default's 270 (PyramidDrop#29; its code released no 192 / 128 / 64 settings)."""
        boundaries = sorted({budget.layer(layer) for layer in (2, 8, 16)})
        n, layers = budget.visual, budget.layers
        average = lambda ratio: schedule_average(  # noqa: E731
            boundaries, [math.floor(n * ratio**stage) for stage in range(1, len(boundaries) + 1)], n, layers
        )
        return f"pdrop:{'-'.join(map(str, boundaries))}:{solve(average, budget.target):.4f}"

    @property
    def pruning_layers(self) -> tuple[int, ...]:
        return self.layers

    def check(self, num_layers: int, has_gates: bool) -> None:
        if self.layers[-1] > num_layers:
            raise ValueError(f"pdrop layer {self.layers[-1]} exceeds the model's {num_layers} layers")

    def after_layer(self, step: LayerStep, state: ExitState, layout: TokenLayout):
        layer = step.index + 1
        # After the last layer nothing is left to save (and there is no next layer to score with).
        if layer not in self.layers or layer == state.num_layers or not state.any_active:
            return None
        stage = self.layers.index(layer) + 1
        # ⌊n·λ^s⌋ of the original count, as PyramidDrop's loader computes it (float64 like its Python floats).
        keep = (state.num_visual.double() * math.pow(self.ratio, stage)).floor().long()
        visual = layout.visual & state.active[:, None]
        pruned = outside_top(pdrop_scores(step, layout), visual, torch.minimum(keep, visual.sum(dim=1)))
        record_pruning(state, pruned, visual, layer, layout)
        return pruned
