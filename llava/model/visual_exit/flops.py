"""Theoretical LM-prefill FLOPs (FLOPs = 2 x multiply-adds; attention counted as a full square, as FastV does).

Per layer with the n tokens that entered it: 2n(2d^2 + 2d*d_kv) + 4n^2*d + 6n*d*m, plus 2(2d*G + 2G) per evaluated
gate. FastV's ranking row (one query projected and scored against layer K's cached keys) is far below 1 % of a
layer and not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecoderGeometry:
    hidden: int
    kv_width: int
    intermediate: int
    layers: int
    gate_hidden: int = 0

    @classmethod
    def from_config(cls, config) -> DecoderGeometry:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(
            hidden=config.hidden_size,
            kv_width=kv_heads * head_dim,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            gate_hidden=getattr(config, "visual_gate_hidden_size", None) or 0,
        )

    def layer_flops(self, tokens: torch.Tensor) -> torch.Tensor:
        n, d = tokens.double(), self.hidden
        return 2 * n * (2 * d * d + 2 * d * self.kv_width) + 4 * n * n * d + 6 * n * d * self.intermediate

    @property
    def gate_flops(self) -> int:
        return 2 * (2 * self.hidden * self.gate_hidden + 2 * self.gate_hidden)


def prefill_flops(geometry: DecoderGeometry, layer_tokens: torch.Tensor, gate_evaluations: torch.Tensor) -> torch.Tensor:
    """Per-sample FLOPs from `layer_tokens` (B, L), the tokens that entered each layer, and the gates evaluated:
    whatever left the sequence after whichever layer (an exit, pruning stages), each layer costs what entered it."""
    return geometry.layer_flops(layer_tokens).sum(dim=1) + gate_evaluations.double() * geometry.gate_flops
