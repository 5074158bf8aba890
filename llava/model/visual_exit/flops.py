"""Theoretical LM-prefill FLOPs (FLOPs = 2 x multiply-adds; attention counted as a full square, as FastV does).

Per layer with the n tokens that entered it: 2n(2d^2 + 2d*d_kv) + 4n^2*d + 6n*d*m, plus 2(2d*G + 2G) per evaluated
gate. FastV's ranking row (one query projected and scored against layer K's cached keys) is far below 1 % of a
layer and not counted. When f of the n skip the layer's update (ShortV) they cost only their keys and values:
2n*2d*d_kv + 2(n - f)*2d^2 + 4(n - f)*n*d + 6(n - f)*d*m, the same formula at f = 0.
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

    def layer_flops(self, tokens: torch.Tensor, frozen: torch.Tensor | None = None) -> torch.Tensor:
        """FLOPs of layers that `tokens` entered, `frozen` of them skipping the update (queries, attention rows,
        output projection, MLP) but not their keys and values."""
        n, d = tokens.double(), self.hidden
        q = n if frozen is None else n - frozen.double()  # the rows the layer updates
        return 4 * n * d * self.kv_width + 4 * q * d * d + 4 * q * n * d + 6 * q * d * self.intermediate

    @property
    def gate_flops(self) -> int:
        return 2 * (2 * self.hidden * self.gate_hidden + 2 * self.gate_hidden)


def prefill_flops(geometry: DecoderGeometry, layer_tokens: torch.Tensor, gate_evaluations: torch.Tensor,
                  layer_frozen: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample FLOPs from `layer_tokens` (B, L), the tokens that entered each layer, the gates evaluated and
    `layer_frozen` (B, L), the tokens that skipped each layer's update: whatever left the sequence after whichever
    layer (an exit, pruning stages), each layer costs what entered it."""
    per_layer = geometry.layer_flops(layer_tokens, layer_frozen)
    return per_layer.sum(dim=1) + gate_evaluations.double() * geometry.gate_flops
