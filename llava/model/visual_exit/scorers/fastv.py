"""`fastv` scorer (Chen et al., 2024, the training-free baseline): a visual token is worth what the last prompt
token attends to it, head-averaged, in the layer just run.

Only that one query row is computed, from the layer's input and the keys the layer cached: the layer itself keeps
its fast attention kernel and no (T x T) attention map is ever materialised.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from llava.model.visual_exit.stages.base import LayerStep
from llava.model.visual_exit.tokens import TokenLayout


def fastv_scores(step: LayerStep, layout: TokenLayout) -> torch.Tensor:
    """(B, T): the last prompt token's attention in the step's layer."""
    return last_token_attention(step.layer, step.input, layout.position_embeddings, layout.valid_keys.valid, step.cached_keys)


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
    normed_last = layer.input_layernorm(hidden[rows, last][:, None])  # a per-token norm: the query row needs only its own
    query = projected_heads(attention, normed_last, "q")
    cos, sin = position_embeddings
    query, _ = apply_rotary_pos_emb(query, query, cos[rows, last][:, None], sin[rows, last][:, None])
    if keys is None:
        keys = rotated_keys(layer, hidden, position_embeddings)
    key = repeat_kv(keys, attention.num_key_value_groups)
    scores = (query.float() @ key.float().transpose(-1, -2)).squeeze(2) * attention.scaling
    # The last token is the last valid slot, so the valid keys are exactly those its causal mask allows.
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return scores.softmax(dim=-1).mean(dim=1)


def rotated_keys(layer, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
    """(B, kv heads, T, head dim): the keys `layer` (Llama interface) caches for its input `hidden`, after RoPE."""
    keys = projected_heads(layer.self_attn, layer.input_layernorm(hidden), "k")
    cos, sin = position_embeddings
    return apply_rotary_pos_emb(keys, keys, cos, sin)[0]


def projected_heads(attention, normed: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, heads, T, head dim): the query (`kind` "q") or key ("k") heads of `normed` (B, T, H), the layer's normed
    input, with the per-head norm some families apply before RoPE (Qwen3's and Gemma 3's `q_norm` / `k_norm`)."""
    heads = getattr(attention, f"{kind}_proj")(normed).view(*normed.shape[:2], -1, attention.head_dim)
    norm = getattr(attention, f"{kind}_norm", None)
    return (heads if norm is None else norm(heads)).transpose(1, 2)
