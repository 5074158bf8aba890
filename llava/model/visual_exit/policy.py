"""Who exits where: the decision source of each exit mode, over one prefill."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from llava.model.visual_exit.config import ExitConfig
from llava.model.visual_exit.fastv import fastv_pruned, last_token_attention
from llava.model.visual_exit.gate import gate_features
from llava.model.visual_exit.tokens import TokenLayout


@dataclass
class LayerStep:
    """What a decision after decoder layer `index` may read: the layer, its input and output hidden states
    (B, T, H), and the keys it has just cached for these T slots (None without a cache)."""

    index: int
    layer: nn.Module
    input: torch.Tensor
    output: torch.Tensor
    cached_keys: torch.Tensor | None


class ExitPolicy:
    """Tracks per sample whether it still holds visual tokens, its `exit_layer` (layers that processed them), how
    many gates it evaluated and how many visual tokens FastV pruned (after `prune_layer` layers).

    After each layer, `drop_after` returns the slots to remove from the sequence, or None. A gated layer costs one
    host read of its decision (any sample exiting, any left with visual tokens); dynamic mode stops gating once no
    sample holds visual tokens, and `fixed` mode never waits beyond the re-packing itself. FastV ranks by the last
    token's attention in `layers[fastv_k - 1]`, from that layer's input; a sample left with no visual token has
    exited there.
    """

    def __init__(
        self,
        config: ExitConfig,
        num_layers: int,
        layout: TokenLayout,
        gates: nn.ModuleList | None,
    ):
        if config.mode == "fixed" and config.layer > num_layers:
            raise ValueError(f"exit layer {config.layer} exceeds the model's {num_layers} layers")
        if config.uses_fastv and config.fastv_k > num_layers:
            raise ValueError(f"FastV layer {config.fastv_k} exceeds the model's {num_layers} layers")
        if config.uses_gates and gates is None:
            raise ValueError(f"exit mode {config.mode!r} needs gates: the model has none (visual_gate_hidden_size unset)")
        self.config = config
        self.num_layers = num_layers
        self.gates = gates
        self.pruned_visual = torch.zeros_like(layout.visual[:, 0], dtype=torch.long)
        # FastV at K = L would prune after the last layer, which changes nothing.
        self.prune_layer = config.fastv_k if config.uses_fastv and config.fastv_k < num_layers else num_layers
        self.num_visual = layout.visual.sum(dim=1)
        has_visual = self.num_visual > 0
        self.active = has_visual
        self.has_visual = has_visual
        self.exit_layer = torch.where(has_visual, num_layers, 0)
        # P(exit) > tau  <=>  logit(exit) - logit(stay) > log(tau / (1 - tau)): no softmax per layer.
        tau = config.threshold
        self.margin = math.inf if tau >= 1 else -math.inf if tau <= 0 else math.log(tau / (1 - tau))
        self.any_active = config.mode != "none" and bool(has_visual.any())
        self.layer_tokens: list[torch.Tensor] = []  # per layer, the (B,) tokens that entered it (the decoder records)

    def drop_before_first_layer(self, layout: TokenLayout) -> torch.Tensor | None:
        if self.config.mode != "fixed" or self.config.layer != 0 or not self.any_active:
            return None
        self.any_active = False
        return self._exit(self.active, 0, layout)

    def drop_after(self, step: LayerStep, layout: TokenLayout) -> torch.Tensor | None:
        """Slots to drop after the decoder layer `step` describes, or None."""
        layer = step.index
        if self.config.mode == "fixed":
            # K = L is the vanilla model: nothing is left to skip after the last layer.
            if not self.any_active or layer + 1 != self.config.layer or layer + 1 == self.num_layers:
                return None
            self.any_active = False
            return self._exit(self.active, layer + 1, layout)
        drop = None
        # An exit after the last layer would change nothing, so its gate is not run.
        if self.config.uses_gates and self.any_active and layer < self.num_layers - 1:
            drop = self._run_gate(layer, step.output, layout)
        if self.config.uses_fastv and layer + 1 == self.prune_layer and self.any_active:
            drop = self._prune(step, layout, drop)
        return drop

    def _prune(self, step: LayerStep, layout: TokenLayout, drop: torch.Tensor | None):
        """FastV after the step's layer: prune the active samples' least-attended visual tokens, together with
        `drop`, the visual tokens of samples whose gates fired at this layer."""
        layer = step.index
        scores = last_token_attention(step.layer, step.input, layout.position_embeddings, layout.keys.valid, step.cached_keys)
        visual = layout.visual & self.active[:, None]
        pruned = fastv_pruned(scores, visual, self.config.fastv_r)
        counts = pruned.sum(dim=1)
        emptied = self.active & (counts == visual.sum(dim=1))
        self._exit(emptied, layer + 1, layout)
        self.pruned_visual = torch.where(emptied, 0, counts)
        if drop is not None:
            pruned = pruned | drop
        if self.config.mode == "fastv":
            self.any_active = False  # nothing is decided after FastV's one layer
        return pruned

    def _run_gate(self, layer: int, hidden: torch.Tensor, layout: TokenLayout) -> torch.Tensor | None:
        """The visual slots of the samples whose gate fires after `layer`, or None when none does."""
        logits = self.gates[layer](gate_features(hidden, layout.gate_weights))
        exiting = self.active & (logits[:, 1] - logits[:, 0] > self.margin)
        drop = self._exit(exiting, layer + 1, layout)
        any_exiting, self.any_active = torch.stack([exiting.any(), self.active.any()]).tolist()  # the one host read
        return drop if any_exiting else None

    @property
    def gate_evaluations(self) -> torch.Tensor:
        """Gates run for a sample at layers 0 .. exit_layer - 1, never at the last layer."""
        if not self.config.uses_gates:
            return torch.zeros_like(self.exit_layer)
        return torch.where(self.has_visual, self.exit_layer.clamp(max=self.num_layers - 1), 0)

    def _exit(self, exiting: torch.Tensor, layer: int, layout: TokenLayout) -> torch.Tensor:
        self.exit_layer = torch.where(exiting, layer, self.exit_layer)
        self.active = self.active & ~exiting  # not in place: `exiting` may be `self.active` itself
        return layout.visual & exiting[:, None]
