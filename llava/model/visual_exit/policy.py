"""Who exits where: the stages of an exit, run in order before layer 0 and after every layer of one prefill."""

from __future__ import annotations

import torch
from torch import nn

from llava.model.visual_exit.config import ExitConfig
from llava.model.visual_exit.stages import ExitState, LayerStep, Stage
from llava.model.visual_exit.stages.base import Rewrite
from llava.model.visual_exit.tokens import TokenLayout


class ExitPolicy:
    """The config's stages over one prefill. Each may drop visual slots; their drops are united and carried out
    at once. Per sample it ends with the exit layer, the gates evaluated, the visual tokens pruned and, from the
    decoder, the tokens that entered each layer (`layer_tokens`)."""

    def __init__(self, config: ExitConfig, num_layers: int, layout: TokenLayout, gates: nn.ModuleList | None):
        config.check_model(num_layers, gates is not None)
        self.stages: tuple[Stage, ...] = config.stage_list
        self.state = ExitState(layout, num_layers, gates)
        self.state.any_active &= bool(self.stages)
        prune_layers = [layer for s in self.stages for layer in s.pruning_layers if layer < num_layers]
        self.prune_layer = min(prune_layers, default=num_layers)  # the first layer after which tokens are pruned
        self.gated = config.uses_gates
        self.renumbers = any(stage.renumbers for stage in self.stages)  # then every drop of this prefill renumbers
        self.layer_tokens: list[torch.Tensor] = []  # per layer, the (B,) tokens that entered it (the decoder records)

    def drop_before_first_layer(self, layout: TokenLayout) -> torch.Tensor | None:
        return _union(stage.before_first_layer(self.state, layout) for stage in self.stages)

    def drop_after(self, step: LayerStep, layout: TokenLayout):
        """(slots to drop after the decoder layer `step` describes or None, the states that go on, the order the
        remaining slots take or None): the layer's output, with the slots stages rewrote (`Rewrite`) in their new
        states. Every stage decides on the layer's own output."""
        if not self.state.any_active:
            return None, step.output, None
        decisions = [stage.after_layer(step, self.state, layout) for stage in self.stages]
        hidden, order = step.output, None
        for decision in decisions:
            if isinstance(decision, Rewrite):
                hidden = torch.where(decision.rewritten[..., None], decision.states, hidden)
                order = decision.order if decision.order is not None else order
        return _union(d.drop if isinstance(d, Rewrite) else d for d in decisions), hidden, order

    @property
    def gate_evaluations(self) -> torch.Tensor:
        """Gates run for a sample at layers 0 .. exit_layer - 1, never at the last layer."""
        state = self.state
        if not self.gated:
            return torch.zeros_like(state.exit_layer)
        return torch.where(state.has_visual, state.exit_layer.clamp(max=state.num_layers - 1), 0)


def _union(drops) -> torch.Tensor | None:
    """The union of the stages' drops, None when none dropped anything."""
    union = None
    for drop in drops:  # every stage runs: each updates the shared state
        if drop is not None:
            union = drop if union is None else union | drop
    return union
