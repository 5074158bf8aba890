"""Who exits where: the decision source of each exit mode, over one prefill."""

from __future__ import annotations

import torch
from torch import nn

from llava.model.visual_exit.cache import KeyLayout
from llava.model.visual_exit.config import ExitConfig
from llava.model.visual_exit.gate import gate_features
from llava.model.visual_exit.tokens import TokenLayout


class FlagReadback:
    """Device flags read on the host without waiting: on CUDA a non-blocking copy into pinned memory plus an
    event; `poll()` returns the latest posted flags once they have arrived, else None."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host = torch.empty(2, dtype=torch.bool, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None
        self.posted = False

    def post(self, flags: torch.Tensor) -> None:
        self.host.copy_(flags, non_blocking=self.cuda)
        if self.cuda:
            self.event.record()
        self.posted = True

    def poll(self) -> list[bool] | None:
        if not self.posted or (self.cuda and not self.event.query()):
            return None
        self.posted = False
        return self.host.tolist()


class ExitPolicy:
    """Tracks per sample whether it still holds visual tokens, its `exit_layer` (layers that processed them) and
    how many gates it evaluated.

    Before each layer, `visible_keys` says which cached keys that layer may attend to; after it, `drop_after`
    returns the slots to remove from the sequence, or None. Gate decisions take effect on the device at once,
    by hiding the exited visual keys from the next layer; the host learns of them asynchronously and only then
    drops the tokens. So dynamic mode never waits for the device per layer: the one host synchronisation is
    the re-packing itself, once per layer at which tokens are dropped. `fixed` mode needs none beyond it.
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
        self.hidden_visual: torch.Tensor | None = None  # exited visual slots still in the sequence, masked
        self.readback = FlagReadback(layout.keys.valid.device)

    def visible_keys(self, layout: TokenLayout) -> KeyLayout:
        if self.hidden_visual is None:
            return layout.keys
        return KeyLayout(layout.keys.valid & ~self.hidden_visual, padded=True)

    def drop_before_first_layer(self, layout: TokenLayout) -> torch.Tensor | None:
        if self.config.mode != "fixed" or self.config.layer != 0 or not self.any_active:
            return None
        self.any_active = False
        return self._exit(self.active, 0, layout)

    def drop_after(self, layer: int, hidden: torch.Tensor, layout: TokenLayout) -> torch.Tensor | None:
        if self.config.mode == "fixed":
            # K = L is the vanilla model: nothing is left to skip after the last layer.
            if not self.any_active or layer + 1 != self.config.layer or layer + 1 == self.num_layers:
                return None
            self.any_active = False
            return self._exit(self.active, layer + 1, layout)
        # dynamic: an exit after the last layer would change nothing, so its gate is not run.
        if self.any_active and layer < self.num_layers - 1:
            self._run_gate(layer, hidden, layout)
        return self._collect()

    def _run_gate(self, layer: int, hidden: torch.Tensor, layout: TokenLayout) -> None:
        logits = self.gates[layer](gate_features(hidden, layout.text_span, layout.last_index))
        exiting = self.active & (logits.softmax(dim=-1)[:, 1] > self.config.threshold)
        self.gate_evaluations = self.gate_evaluations + self.active.long()
        hidden_now = self._exit(exiting, layer + 1, layout)
        self.hidden_visual = hidden_now if self.hidden_visual is None else self.hidden_visual | hidden_now
        self.readback.post(torch.stack([self.hidden_visual.any(), self.active.any()]))

    def _collect(self) -> torch.Tensor | None:
        """Once the host knows what the device decided: stop gating when nobody is left, drop what is hidden."""
        flags = self.readback.poll()
        if flags is None:
            return None
        any_hidden, self.any_active = flags
        if not any_hidden or self.hidden_visual is None:
            return None
        drop, self.hidden_visual = self.hidden_visual, None
        return drop

    def _exit(self, exiting: torch.Tensor, layer: int, layout: TokenLayout) -> torch.Tensor:
        self.exit_layer = torch.where(exiting, layer, self.exit_layer)
        self.active = self.active & ~exiting  # not in place: `exiting` may be `self.active` itself
        return layout.visual & exiting[:, None]
