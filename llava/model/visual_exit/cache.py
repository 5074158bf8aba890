"""A DynamicCache whose layers may hold different tokens.

After an exit, the layers that follow cache fewer keys than the ones before. Each layer therefore keeps its
`ValidKeys`: which of its cached keys are real (not padding). Layers between two exits share one such object,
so masks are built once per object, not once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import StaticLayer

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

    @property
    def is_prefilled(self) -> bool:
        """A Python flag (not a tensor): whether the next forward decodes, which a compiled step must not branch on
        by a tensor."""
        return self.seen_tokens > 0

    def prefill_keys(self, layer_idx: int) -> torch.Tensor | None:
        """The keys layer `layer_idx` cached at this prefill (None for a linear-attention layer)."""
        return getattr(self.layers[layer_idx], "keys", None)

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


class StaticExitLayer(StaticLayer):
    """A layer of `StaticExitCache`: its capacity, fixed at its first update (the prefill), is the keys it caches
    there plus the cache's new tokens. The prefill's attention sees exactly those keys (its mask is built for them);
    each decode step writes at the next slot and attends to the whole, masked, capacity."""

    def __init__(self):
        super().__init__(max_cache_len=0)
        self.new_tokens = 0  # set by the cache before the prefill
        self.prefill_length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.prefill_length = key_states.shape[-2]
        self.max_cache_len = self.prefill_length + self.new_tokens
        super().lazy_initialization(key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """What a stock forward's own masks (unused here: the exit builds its own) are sized by; before the prefill
        the layer holds nothing yet."""
        return (self.max_cache_len if self.is_initialized else query_length), 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        prefill = not self.is_initialized
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        return (key_states, value_states) if prefill else (keys, values)


class StaticExitCache(VisualExitCache):
    """The exit's KV cache for `generate(cache_implementation="static")` and compiled decoding: every layer
    preallocated for its own prefill keys (what stayed after the exits and prunes, compacted, rows left-padded as
    in the dynamic cache) plus the new tokens, so a decode step has the same shapes at every step. After the prefill
    (`seal`) each layer's `ValidKeys` covers its whole capacity: the new slots are marked real and carry the
    positions their tokens will have; `step` (a tensor, as transformers' static layers count) says how many of
    them are written, which the decode masks read. `max_cache_len`: prompt + new tokens, as generate sizes a stock
    static cache."""

    def __init__(self, config, max_cache_len: int):
        super().__init__()
        self.layers = [StaticExitLayer() for _ in range(config.num_hidden_layers)]
        self.total_length = max_cache_len  # not `max_cache_len`: a read-only property of the cache in some releases
        self.new_tokens = 0
        self.step = torch.zeros((), dtype=torch.long)
        self.shared_with: list[int] = []

    @property
    def is_compileable(self) -> bool:
        return True

    def get_seq_length(self, layer_idx: int = 0):
        """The tokens seen, a tensor once decoding (as transformers' static caches report it)."""
        return self.seen_tokens + self.step if self.is_prefilled else self.seen_tokens

    def begin_prefill(self, input_length: int) -> None:
        if input_length > self.total_length:
            raise ValueError(f"a prompt of {input_length} tokens does not fit a static cache of {self.total_length}")
        self.new_tokens = self.total_length - input_length
        for layer in self.layers:
            layer.new_tokens = self.new_tokens

    def prefill_keys(self, layer_idx: int) -> torch.Tensor:
        layer = self.layers[layer_idx]
        return layer.keys[:, :, : layer.prefill_length]

    def seal(self, next_positions: torch.Tensor) -> None:
        """After the prefill: each layer's keys extended by the new slots, whose tokens take `next_positions` (B,)
        + 0, 1, ... (or, when a stage renumbered, each layer's own last position + 1, 2, ...)."""
        steps = torch.arange(self.new_tokens, device=next_positions.device)
        first = (lambda keys: keys.positions[:, -1:] + 1) if self.renumbered else (lambda keys: next_positions[:, None])
        self.valid_keys = _map_shared(self.valid_keys, lambda keys: keys.extended(first(keys) + steps))
        # Per layer, the first layer sharing its ValidKeys: Python ints a compiled step may read (an object's id
        # would make it recompile for every new cache).
        first_with = {}
        self.shared_with = [first_with.setdefault(id(keys), index) for index, keys in enumerate(self.valid_keys)]
        self.step = self.step.to(next_positions.device)
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.step)

    def crop(self, *args, **kwargs) -> None:
        raise NotImplementedError("a static exit cache cannot be cropped (assisted decoding): use the dynamic cache")
