"""The per-layer exit gates and the features they read."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init


class VisualGate(nn.Module):
    """`w2(GELU(w1(x)))` on 2H features, no bias; logit 1 means "exit". Names match the reference checkpoints."""

    def __init__(self, hidden_size: int, gate_hidden_size: int):
        super().__init__()
        self.w1 = nn.Linear(2 * hidden_size, gate_hidden_size, bias=False)
        self.w2 = nn.Linear(gate_hidden_size, 2, bias=False)
        for linear in (self.w1, self.w2):
            linear.is_visual_gate = True  # initialised as the reference does, whoever initialises (see init_if_gate)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """fp32 logits. The matrix products run in the weights' dtype (fp32 accumulation), so a bf16 model
        reads its gate weights once instead of converting them at every layer."""
        hidden = F.gelu(F.linear(features.to(self.w1.weight.dtype), self.w1.weight))
        return F.linear(hidden, self.w2.weight).float()


def build_visual_gates(config) -> nn.ModuleList | None:
    """One gate per decoder layer when the config names a gate width (`visual_gate_hidden_size`)."""
    width = getattr(config, "visual_gate_hidden_size", None)
    if not width:
        return None
    return nn.ModuleList(VisualGate(config.hidden_size, width) for _ in range(config.num_hidden_layers))


def gate_feature_weights(text_span: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
    """(B, T, 2) fp32 weights that read the gate features off the hidden states in one matrix product: column 0
    averages the text after the last visual token (without the last prompt token), column 1 picks the last
    prompt token. An empty span averages the last token instead, so there is never a 0/0."""
    last = torch.nn.functional.one_hot(last_index, text_span.shape[1]).float()
    count = text_span.sum(dim=1, keepdim=True)
    mean = torch.where(count > 0, text_span.float() / count.clamp(min=1), last)
    return torch.stack([mean, last], dim=-1)


def gate_features(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, 2H) fp32 features [span mean, last token] with `weights` from `gate_feature_weights`."""
    return torch.bmm(weights.transpose(1, 2).to(hidden.dtype), hidden).flatten(1).float()


def init_if_gate(module: nn.Module) -> bool:
    """For a model's `_init_weights`: a gate's linear gets the reference's Xavier initialisation (through
    transformers' guarded init, so weights a checkpoint loaded stay); True when `module` was one."""
    if not getattr(module, "is_visual_gate", False):
        return False
    init.xavier_uniform_(module.weight)
    return True


def init_gate_weights(gates: nn.ModuleList) -> None:
    """The reference's initialisation: Xavier-uniform linear weights, zero biases where present."""
    for module in gates.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
