"""`fixed:K`: every sample's visual tokens leave after the first K layers (VTW's fixed-layer exit)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from llava.model.visual_exit.budget import Budget, OutOfReach
from llava.model.visual_exit.stages.base import ExitState, LayerStep, Stage, spec_number
from llava.model.visual_exit.tokens import TokenLayout


@dataclass(frozen=True)
class FixedExit(Stage):
    """K = 0 drops them before layer 0; K = L is the vanilla model (nothing is left to skip after the last layer)."""

    layer: int
    usage = "fixed:K"
    decides_on_device = True

    @classmethod
    def parse(cls, args: list[str]) -> FixedExit:
        return cls(spec_number(args[0], int, 0))

    def check(self, num_layers: int, has_gates: bool) -> None:
        if self.layer > num_layers:
            raise ValueError(f"exit layer {self.layer} exceeds the model's {num_layers} layers")

    @classmethod
    def at_budget(cls, budget: Budget) -> str:
        """Both rules: the exit layer whose whole-image average is T (VTW publishes a layer, not a budget); refused
        when no whole layer comes within one token of it."""
        n, layers, target = budget.visual, budget.layers, budget.target
        exit_layer = round(target * layers / n)
        if abs(exit_layer * n / layers - target) > 1:  # a whole layer of the image per step: never another budget
            step = n / layers
            below, above = math.floor(target / step), math.ceil(target / step)
            raise OutOfReach(
                f"an exit after K layers averages K × {step:g}; the nearest are {below * step:g} (K = {below}) and "
                f"{above * step:g} (K = {above}): ask for one, or --exit-layer K"
            )
        return f"fixed:{exit_layer}"

    def before_first_layer(self, state: ExitState, layout: TokenLayout, hidden):
        return self._exit_all(state, layout) if self.layer == 0 else None

    def after_layer(self, step: LayerStep, state: ExitState, layout: TokenLayout):
        if step.index + 1 != self.layer or self.layer == state.num_layers:
            return None
        return self._exit_all(state, layout)

    def _exit_all(self, state: ExitState, layout: TokenLayout):
        if not state.any_active:
            return None
        state.any_active = False
        return state.exit(state.active, self.layer, layout)
