"""A DynamicCache whose layers may hold different tokens.

After an exit, the layers that follow cache fewer keys than the ones before. Each layer therefore keeps a
`KeyLayout`: which of its cached keys are real (not padding). Layers between two exits share one layout object,
so masks are built once per layout, not once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class KeyLayout:
    """`valid[b, k]`: key k of sample b is a real token. `padded`: some key is not (fixed at prefill, since every
    token appended later is real)."""

    valid: torch.Tensor
    padded: bool

    def extended(self, new_tokens: int) -> KeyLayout:
        ones = self.valid.new_ones(self.valid.shape[0], new_tokens)
        return KeyLayout(torch.cat([self.valid, ones], dim=1), self.padded)

    def map_batch(self, fn) -> KeyLayout:
        return KeyLayout(fn(self.valid), self.padded)


def _map_shared(layouts: list[KeyLayout], fn) -> list[KeyLayout]:
    """Apply `fn` once per distinct layout, keeping layers that shared a layout sharing the result."""
    done: dict[int, KeyLayout] = {}
    for layout in layouts:
        if id(layout) not in done:
            done[id(layout)] = fn(layout)
    return [done[id(layout)] for layout in layouts]


class VisualExitCache(DynamicCache):
    """KV cache for the exit decoder. `get_seq_length` reports the tokens seen (what position ids count), which
    differs from a layer's cached length once visual tokens left it. `exit_stats` holds the prefill's outcome."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layouts: list[KeyLayout] = []
        self.seen_tokens = 0
        self.exit_stats = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def extend_layouts(self, new_tokens: int) -> list[KeyLayout]:
        """Layouts after appending `new_tokens` real tokens to every layer (done by the caller's forward)."""
        self.layouts = _map_shared(self.layouts, lambda layout: layout.extended(new_tokens))
        self.seen_tokens += new_tokens
        return self.layouts

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.layouts = _map_shared(self.layouts, lambda layout: layout.map_batch(lambda v: v[beam_idx.to(v.device)]))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.layouts = _map_shared(self.layouts, lambda layout: layout.map_batch(lambda v: v[indices.to(v.device)]))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.layouts = _map_shared(
            self.layouts, lambda layout: layout.map_batch(lambda v: v.repeat_interleave(repeats, dim=0))
        )

    def crop(self, *args, **kwargs) -> None:
        """Only for caches that no exit has touched (one layout, every token cached); used by assisted decoding."""
        uniform = len({id(layout) for layout in self.layouts}) <= 1
        if not uniform or (self.layers and self.layers[0].get_seq_length() != self.seen_tokens):
            raise NotImplementedError("cropping a cache whose layers hold different tokens is not supported")
        super().crop(*args, **kwargs)
        self.seen_tokens = self.layers[0].get_seq_length() if self.layers else 0
        self.layouts = _map_shared(self.layouts, lambda layout: layout.map_batch(lambda v: v[:, : self.seen_tokens]))
