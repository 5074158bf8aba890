"""Who exits where: the stages of an exit, run in order before layer 0 and after every layer of one prefill."""

from __future__ import annotations

import torch
from torch import nn

from llava.model.visual_exit.config import ExitConfig
from llava.model.visual_exit.stages import ExitState, LayerStep, Stage
from llava.model.visual_exit.stages.base import Rewrite
from llava.model.visual_exit.tokens import TokenLayout


class ExitRecord:
    """What one prompt's prefill decided, by input slot, so that recomputing prompt + answer from scratch (generate
    without a cache) takes the same decisions at every step: per layer after which something changed, the input
    slots that left, the ones rewritten with their states, and the order the rest took. The prompt's slots are the
    same in every recomputation (the answer is appended behind them), so decisions carry over by slot."""

    def __init__(self):
        self.changes: dict[int, tuple] = {}  # layer index (-1: before layer 0) -> (dropped, rewritten, states, order)
        self.recorded = False  # set by the decoder once the prompt's prefill decided

    def keep(self, index: int, layout: TokenLayout, drop, rewritten, hidden, order) -> None:
        by_input = lambda values, fill: _by_input(values, layout, fill)  # noqa: E731
        order = None if order is None else by_input(order.double(), float("inf"))
        drop = None if drop is None else by_input(drop, False)  # None: the stages only rewrote
        self.changes[index] = (drop, by_input(rewritten, False), by_input(hidden, 0.0), order)

    def replay(self, index: int, layout: TokenLayout, hidden: torch.Tensor):
        """(drop, states, order) for the current layout, as `ExitPolicy.drop_after` returns them."""
        if index not in self.changes:
            return None, hidden, None
        dropped, rewritten, states, order = (None if t is None else _on_layout(t, layout) for t in self.changes[index])
        hidden = torch.where(rewritten[..., None], states.to(hidden.dtype), hidden)
        if order is not None:  # the answer's slots stay behind, in their order
            slots = torch.arange(order.shape[1], device=order.device, dtype=order.dtype).expand_as(order)
            order = torch.where(torch.isinf(order), slots + order.shape[1], order)
        return None if dropped is None else dropped & layout.valid_keys.valid, hidden, order


def _by_input(values: torch.Tensor, layout: TokenLayout, fill) -> torch.Tensor:
    """Per-slot values (B, T, ...) scattered to the input's slots (B, input length, ...); `fill` where none."""
    length = layout.input_length
    target = torch.where(layout.valid_keys.valid, layout.origin, length)
    shape = (values.shape[0], length + 1, *values.shape[2:])
    scattered = torch.full(shape, fill, dtype=values.dtype, device=values.device)
    index = target.view(*target.shape, *([1] * (values.dim() - 2))).expand_as(values)
    return scattered.scatter_(1, index, values)[:, :length]


def _on_layout(values: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Input-slot values recorded on a prompt, gathered to the current layout's slots; a slot past the prompt (the
    answer) takes the fill the record holds past its end (not dropped, not rewritten, order +inf)."""
    longer = layout.input_length - values.shape[1]
    if longer > 0:
        pad = values[:, :1].new_full((values.shape[0], longer, *values.shape[2:]), 0)
        pad = pad.fill_(float("inf")) if values.is_floating_point() and values.dim() == 2 else pad
        values = torch.cat([values, pad], dim=1)
    index = layout.origin.view(*layout.origin.shape, *([1] * (values.dim() - 2))).expand(*layout.origin.shape, *values.shape[2:])
    return values.gather(1, index)


class ExitPolicy:
    """The config's stages over one prefill. Each may drop visual slots; their drops are united and carried out
    at once. Per sample it ends with the exit layer, the gates evaluated, the visual tokens pruned and, from the
    decoder, the tokens that entered each layer (`layer_tokens`). With an `ExitRecord` it records its decisions,
    or, once the record holds a prompt's, replays them instead of deciding."""

    def __init__(self, config: ExitConfig, num_layers: int, layout: TokenLayout, gates: nn.ModuleList | None,
                 record: ExitRecord | None = None):
        self.record = record
        config.check_model(num_layers, gates is not None)
        self.stages: tuple[Stage, ...] = config.decoder_stages
        self.state = ExitState(layout, num_layers, gates)
        self.state.any_active &= bool(self.stages)
        prune_layers = [layer for s in self.stages for layer in s.pruning_layers if layer < num_layers]
        self.prune_layer = min(prune_layers, default=num_layers)  # the first layer after which tokens are pruned
        self.gated = config.uses_gates
        self.renumbers = any(stage.renumbers for stage in self.stages)  # then every drop of this prefill renumbers
        # Every stage decides on the device and wants no host read of a decision (run_layers may compact later).
        self.decides_on_device = all(stage.decides_on_device for stage in self.stages)
        self.layer_tokens: list[torch.Tensor] = []  # per layer, the (B,) tokens that entered it (the decoder records)
        self.frozen: dict[int, torch.Tensor] = {}  # layer index -> (B,) visual tokens that skipped its update

    def drop_before_first_layer(self, layout: TokenLayout, hidden: torch.Tensor):
        """(slots to drop before layer 0 or None, the input states with the slots stages rewrote): stages decide on
        the LLM's input embeddings."""
        if self.record is not None and self.record.recorded:
            return self.record.replay(-1, layout, hidden)[:2]
        decisions = [stage.before_first_layer(self.state, layout, hidden) for stage in self.stages]
        drop, hidden, _ = self._carry_out(-1, decisions, hidden, layout)
        return drop, hidden

    def drop_after(self, step: LayerStep, layout: TokenLayout):
        """(slots to drop after the decoder layer `step` describes or None, the states that go on, the order the
        remaining slots take or None): the layer's output, with the slots stages rewrote (`Rewrite`) in their new
        states. Every stage decides on the layer's own output."""
        if self.record is not None and self.record.recorded:
            return self.record.replay(step.index, layout, step.output)
        if not self.state.any_active:
            return None, step.output, None
        decisions = [stage.after_layer(step, self.state, layout) for stage in self.stages]
        return self._carry_out(step.index, decisions, step.output, layout)

    def _carry_out(self, index: int, decisions: list, hidden: torch.Tensor, layout: TokenLayout):
        """The stages' decisions at one point (after layer `index`, -1 before layer 0) united: (drop, states, order),
        recorded when there is a record."""
        order = None
        rewrites = [decision for decision in decisions if isinstance(decision, Rewrite)]
        rewritten = torch.zeros_like(layout.visual) if rewrites or self.record is not None else None
        for decision in rewrites:
            hidden = torch.where(decision.rewritten[..., None], decision.states, hidden)
            rewritten |= decision.rewritten
            order = decision.order if decision.order is not None else order
            if decision.skipped:
                self.frozen[index] = self.frozen.get(index, 0) + decision.rewritten.sum(dim=1)
        drop = _union(d.drop if isinstance(d, Rewrite) else d for d in decisions)
        if self.record is not None and (drop is not None or rewrites):
            self.record.keep(index, layout, drop, rewritten, hidden, order)
        return drop, hidden, order

    @property
    def layer_frozen(self) -> torch.Tensor | None:
        """(B, L): per layer, the visual tokens that skipped its update (None when none did)."""
        if not self.frozen:
            return None
        zeros = torch.zeros_like(self.state.exit_layer)
        return torch.stack([self.frozen.get(index, zeros) for index in range(self.state.num_layers)], dim=1)

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
