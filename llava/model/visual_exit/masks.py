"""Attention masks for one layer's `ValidKeys`, in the form each attention implementation takes.

transformers' `create_causal_mask` sizes every mask from one cache layer; here layers hold different keys, so each
`ValidKeys` gets its own mask. Queries are the last `query_length` keys (new tokens are always appended at the end).
A sliding window (Mistral, Qwen2's sliding layers) is measured in original token positions, not in slots: once
visual tokens have left, a query still sees exactly the keys within `window` positions of it, as in the full
sequence, and a padded sample sees what it sees alone.

Bidirectional blocks (Gemma 3's image tokens) are compared by the block id each key carries with it, not by its
index: a block keeps seeing its own remaining members however the tokens around it were compacted. As in the stock
mask, a block widens causality (causal OR same block) and a window still bounds it from behind.
"""

from __future__ import annotations

import torch

from llava.model.visual_exit.cache import ValidKeys

FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")


def _is_flash(implementation: str) -> bool:
    return implementation in FLASH_IMPLEMENTATIONS or implementation.startswith("kernels-community/flash")


def attention_mask_for(
    valid_keys: ValidKeys, query_length: int, implementation: str, dtype: torch.dtype, window: int | None = None
):
    """eager: additive float (B, 1, Q, K); sdpa: bool (B, 1, Q, K) or None; flash: (B, K) padding mask or None.
    `window`: a query sees the keys less than `window` positions before it (None: all earlier keys)."""
    if _is_flash(implementation):
        if valid_keys.blocks is not None:
            raise NotImplementedError("flash attention has no bidirectional blocks (neither has the stock model): use sdpa or eager")
        if window is not None:
            raise NotImplementedError("flash attention windows count slots, not positions: use sdpa or eager here")
        return valid_keys.valid.long() if valid_keys.padded else None
    key_length = valid_keys.valid.shape[1]
    windowed = window is not None and key_length > window
    # None lets SDPA use its causal (flash) kernel: exact only without padding and when the queries are all keys
    # or a single new token (SDPA's is_causal aligns top-left).
    plain = not valid_keys.padded and not windowed and valid_keys.blocks is None
    if implementation == "sdpa" and plain and query_length in (1, key_length):
        return None
    offset = key_length - query_length
    key_slots = torch.arange(key_length, device=valid_keys.valid.device)
    query_slots = torch.arange(query_length, device=valid_keys.valid.device) + offset
    allowed = (key_slots[None, :] <= query_slots[:, None]).expand(valid_keys.valid.shape[0], -1, -1)
    if valid_keys.blocks is not None:
        blocks = valid_keys.blocks
        query_blocks = blocks[:, -query_length:, None]
        allowed = allowed | ((query_blocks == blocks[:, None, :]) & (query_blocks >= 0))
    allowed = allowed & valid_keys.valid[:, None, :]
    if windowed:
        positions = valid_keys.positions
        allowed = allowed & (positions[:, -query_length:, None] - positions[:, None, :] < window)
    # A padding query would mask every key (NaN under softmax); let it see itself. Real queries are unaffected.
    allowed |= key_slots[None, None, :] == query_slots[None, :, None]
    return _as_mask(allowed, implementation, dtype)


def _as_mask(allowed: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """(B, Q, K) allowed pairs as sdpa's bool or eager's additive (B, 1, Q, K) mask."""
    if implementation not in ("sdpa", "eager"):
        raise NotImplementedError(f"attention implementation {implementation!r} is not supported with visual exit")
    allowed = allowed.unsqueeze(1)
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def static_decode_mask(
    valid_keys: ValidKeys, new_tokens: int, steps: torch.Tensor, implementation: str, dtype: torch.dtype,
    window: int | None = None,
):
    """The mask of decode queries over a static layer: `valid_keys` spans its capacity, the last `new_tokens` slots
    for the tokens decoded; `steps` (Q,) (tensors, so a compiled step has no per-step constant) are the queries'
    indices among those. A query sees the real prefill keys and the new slots up to its own; decoded tokens are in
    no bidirectional block, so blocks play no part. The same forms as `attention_mask_for`."""
    batch, capacity = valid_keys.valid.shape
    key_slots = torch.arange(capacity, device=steps.device)
    query_slots = capacity - new_tokens + steps  # (Q,)
    allowed = (key_slots[None, :] <= query_slots[:, None])[None] & valid_keys.valid[:, None, :]  # (B, Q, K)
    if window is not None:
        positions = valid_keys.positions
        allowed = allowed & (positions[:, query_slots, None] - positions[:, None, :] < window)
    if _is_flash(implementation):
        if window is not None or steps.shape[0] > 1:
            raise NotImplementedError("a static cache under flash attention decodes one token at a time, without windows")
        return allowed[:, 0].long()
    return _as_mask(allowed, implementation, dtype)
