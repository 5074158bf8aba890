"""`gates:τ`: DyVTE. After layer i the gate of layer i reads each sample's text and its visual tokens leave once
P(exit) > τ; the first exit wins. The gate after the last layer is never run: an exit there changes nothing."""

from __future__ import annotations

import math
from dataclasses import dataclass

from llava.model.visual_exit.gate import gate_features
from llava.model.visual_exit.stages.base import ExitState, LayerStep, Stage, spec_number
from llava.model.visual_exit.tokens import TokenLayout


@dataclass(frozen=True)
class GateExit(Stage):
    threshold: float
    usage = "gates:τ"
    decides_on_device = True

    @classmethod
    def parse(cls, args: list[str]) -> GateExit:
        return cls(spec_number(args[0], float, 0.0, 1.0))

    def check(self, num_layers: int, has_gates: bool) -> None:
        if not has_gates:
            raise ValueError("exit by gates needs gates: the model has none (visual_gate_hidden_size unset)")

    @property
    def margin(self) -> float:
        """P(exit) > τ  <=>  logit(exit) - logit(stay) > log(τ / (1 - τ)): no softmax per layer."""
        tau = self.threshold
        return math.inf if tau >= 1 else -math.inf if tau <= 0 else math.log(tau / (1 - tau))

    def after_layer(self, step: LayerStep, state: ExitState, layout: TokenLayout):
        if not state.any_active or step.index >= state.num_layers - 1:
            return None
        logits = state.gates[step.index](gate_features(step.output, layout.feature_weights))
        exiting = state.active & (logits[:, 1] - logits[:, 0] > self.margin)
        return state.exit(exiting, step.index + 1, layout)  # read by the host when it arrives (PendingDrop)
