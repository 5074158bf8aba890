"""FastV's ranking (Chen et al., 2024, the training-free baseline): the visual tokens that the last prompt token
attends to least, in one layer, leave the sequence.

Only that one query row is computed, from the layer's input: the layer itself keeps its fast attention kernel and
no (T x T) attention map is ever materialised.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv


def last_token_attention(
    layer, hidden: torch.Tensor, position_embeddings, valid: torch.Tensor, keys: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, T) fp32: the head-averaged attention probabilities of each sample's last valid token over its valid
    keys, in `layer` (Llama interface) given the layer's input `hidden`. `keys`: the layer's cached (rotated)
    keys of these T slots when a cache holds them; otherwise they are projected again."""
    attention = layer.self_attn
    batch, length = valid.shape
    slots = torch.arange(length, device=valid.device)
    last = torch.where(valid, slots, -1).amax(dim=1)
    rows = torch.arange(batch, device=valid.device)
    normed = layer.input_layernorm(hidden)
    query = attention.q_proj(normed[rows, last]).view(batch, 1, -1, attention.head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    query, _ = apply_rotary_pos_emb(query, query, cos[rows, last][:, None], sin[rows, last][:, None])
    if keys is None:
        keys = attention.k_proj(normed).view(batch, length, -1, attention.head_dim).transpose(1, 2)
        keys, _ = apply_rotary_pos_emb(keys, keys, cos, sin)
    key = repeat_kv(keys, attention.num_key_value_groups)
    scores = (query.float() @ key.float().transpose(-1, -2)).squeeze(2) * attention.scaling
    # The last token is the last valid slot, so the valid keys are exactly those its causal mask allows.
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return scores.softmax(dim=-1).mean(dim=1)


def fastv_pruned(scores: torch.Tensor, visual: torch.Tensor, ratio: float) -> torch.Tensor:
    """(B, T) bool: the visual slots outside each sample's top round((1 - ratio) * its visual count) by score."""
    keep = ((1.0 - ratio) * visual.sum(dim=1).double()).round().long()
    order = scores.masked_fill(~visual, float("-inf")).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return visual & (rank >= keep[:, None])
