"""A DynamicCache whose layers may hold different tokens.

After an exit, the layers that follow cache fewer keys than the ones before. Each layer therefore keeps its
`ValidKeys`: which of its cached keys are real (not padding). Layers between two exits share one such object,
so masks are built once per object, not once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from llava.compat import recurrent_cache_layers


@dataclass
class ValidKeys:
    """`valid[b, k]`: key k of sample b is a real token. `padded`: some key is not (fixed at prefill, since every
    token appended later is real). `positions[b, k]`: the key's original (RoPE) position, what sliding windows
    are measured in once tokens have left. `blocks[b, k]`: the bidirectional block the key belongs to (-1: none),
    whose members see each other both ways (Gemma 3's image tokens); None when there are none."""

    valid: torch.Tensor
    padded: bool
    positions: torch.Tensor
    blocks: torch.Tensor | None = None

    def extended(self, new_positions: torch.Tensor) -> ValidKeys:
        """After appending real tokens at `new_positions` (B, new), in no block (decoded tokens are text)."""
        ones = self.valid.new_ones(new_positions.shape)
        blocks = None if self.blocks is None else torch.cat([self.blocks, self.blocks.new_full(new_positions.shape, -1)], dim=1)
        return ValidKeys(
            torch.cat([self.valid, ones], dim=1), self.padded, torch.cat([self.positions, new_positions], dim=1), blocks
        )

    def map_batch(self, fn) -> ValidKeys:
        return ValidKeys(fn(self.valid), self.padded, fn(self.positions), None if self.blocks is None else fn(self.blocks))


def _map_shared(per_layer: list[ValidKeys], fn) -> list[ValidKeys]:
    """Apply `fn` once per distinct object, keeping layers that shared one sharing the result."""
    done: dict[int, ValidKeys] = {}
    for keys in per_layer:
        if id(keys) not in done:
            done[id(keys)] = fn(keys)
    return [done[id(keys)] for keys in per_layer]


class VisualExitCache(DynamicCache):
    """KV cache for the exit decoder. `get_seq_length` reports the tokens seen (what position ids count), which
    differs from a layer's cached length once visual tokens left it."""

    def __init__(self, config=None, **kwargs):
        # `config` is not handed on: it would make sliding-window layers, which evict keys by slot, while the exit
        # measures windows in original positions (masks.py) and keeps every key a window may still reach. Only
        # linear-attention layers get their own kind (`hold_recurrent_layers`).
        super().__init__(**kwargs)
        self.valid_keys: list[ValidKeys] = []
        self.seen_tokens = 0
        self.renumbered = False  # a stage renumbered positions at prefill: each layer numbers new tokens on its own
        if config is not None:
            self.hold_recurrent_layers(config)

    def hold_recurrent_layers(self, config) -> None:
        """Before the first token: the layer kinds a decoder with linear-attention layers needs (no-op otherwise)."""
        layers = recurrent_cache_layers(config)
        if layers is not None and self.seen_tokens == 0:
            self.layers = layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def extend_valid_keys(self, new_positions) -> list[ValidKeys]:
        """Each layer's valid keys after appending real tokens at `new_positions` (B, new) to it (done by the
        caller's forward); a function of the layer's ValidKeys gives each its own."""
        positions_of = new_positions if callable(new_positions) else lambda keys: new_positions
        extended = _map_shared(self.valid_keys, lambda keys: keys.extended(positions_of(keys)))
        self.seen_tokens += extended[0].valid.shape[1] - self.valid_keys[0].valid.shape[1]
        self.valid_keys = extended
        return self.valid_keys

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.valid_keys = _map_shared(self.valid_keys, lambda keys: keys.map_batch(lambda v: v[beam_idx.to(v.device)]))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.valid_keys = _map_shared(self.valid_keys, lambda keys: keys.map_batch(lambda v: v[indices.to(v.device)]))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.valid_keys = _map_shared(
            self.valid_keys, lambda keys: keys.map_batch(lambda v: v.repeat_interleave(repeats, dim=0))
        )

    def crop(self, *args, **kwargs) -> None:
        """Only for caches that no exit has touched (one ValidKeys for all layers, every token cached); used by
        assisted decoding."""
        uniform = len({id(keys) for keys in self.valid_keys}) <= 1
        if not uniform or (self.layers and self.layers[0].get_seq_length() != self.seen_tokens):
            raise NotImplementedError("cropping a cache whose layers hold different tokens is not supported")
        super().crop(*args, **kwargs)
        self.seen_tokens = self.layers[0].get_seq_length() if self.layers else 0
        self.valid_keys = _map_shared(self.valid_keys, lambda keys: keys.map_batch(lambda v: v[:, : self.seen_tokens]))
