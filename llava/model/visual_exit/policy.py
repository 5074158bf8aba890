"""Who exits where: the decision source of each exit mode, over one prefill."""

from __future__ import annotations

import torch
from torch import nn

from llava.model.visual_exit.config import ExitConfig
from llava.model.visual_exit.gate import gate_features
from llava.model.visual_exit.tokens import TokenLayout


class ExitPolicy:
    """Tracks per sample whether it still holds visual tokens, its `exit_layer` (layers that processed them) and
    how many gates it evaluated. `drop_after(i, ...)` returns the slots to drop after layer i, or None.

    Host synchronisation: none in `none`/`fixed` mode; in `dynamic` mode one per layer while some sample still
    holds visual tokens, none after the last one has exited.
    """

    def __init__(self, config: ExitConfig, num_layers: int, layout: TokenLayout, gates: nn.ModuleList | None):
        if config.mode == "fixed" and config.layer > num_layers:
            raise ValueError(f"exit layer {config.layer} exceeds the model's {num_layers} layers")
        if config.mode == "dynamic" and gates is None:
            raise ValueError("exit mode 'dynamic' needs gates: the model has none (visual_gate_hidden_size unset)")
        self.config = config
        self.num_layers = num_layers
        self.gates = gates
        self.num_visual = layout.visual.sum(dim=1)
        has_visual = self.num_visual > 0
        self.active = has_visual
        self.exit_layer = torch.where(has_visual, num_layers, 0)
        self.gate_evaluations = torch.zeros_like(self.num_visual)
        self.any_active = config.mode != "none" and bool(has_visual.any())

    def drop_before_first_layer(self, layout: TokenLayout) -> torch.Tensor | None:
        if self.config.mode != "fixed" or self.config.layer != 0 or not self.any_active:
            return None
        self.any_active = False
        return self._exit(self.active, 0, layout)

    def drop_after(self, layer: int, hidden: torch.Tensor, layout: TokenLayout) -> torch.Tensor | None:
        if not self.any_active:
            return None
        if self.config.mode == "fixed":
            # K = L is the vanilla model: nothing is left to skip after the last layer.
            if layer + 1 != self.config.layer or layer + 1 == self.num_layers:
                return None
            self.any_active = False
            return self._exit(self.active, layer + 1, layout)
        # dynamic: an exit after the last layer would change nothing, so its gate is not run.
        if layer >= self.num_layers - 1:
            return None
        logits = self.gates[layer](gate_features(hidden, layout.text_span, layout.last_index))
        exiting = self.active & (logits.softmax(dim=-1)[:, 1] > self.config.threshold)
        self.gate_evaluations += self.active.long()
        any_exit, any_left = torch.stack([exiting.any(), (self.active & ~exiting).any()]).tolist()
        if not any_exit:
            return None
        drop = self._exit(exiting, layer + 1, layout)
        self.any_active = any_left
        return drop

    def _exit(self, exiting: torch.Tensor, layer: int, layout: TokenLayout) -> torch.Tensor:
        self.exit_layer = torch.where(exiting, layer, self.exit_layer)
        self.active = self.active & ~exiting  # not in place: `exiting` may be `self.active` itself
        return layout.visual & exiting[:, None]
