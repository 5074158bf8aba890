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
    return last_token_attention(step.layer, step.input, layout, step.index, step.window(step.index), step.cached_keys)


def last_token_attention(
    layer, hidden: torch.Tensor, layout: TokenLayout, index: int, window: int | None, keys: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, T) fp32: the head-averaged attention probabilities of each sample's last valid token over the valid
    keys it sees (those less than `window` positions before it in a sliding layer), in `layer` (Llama interface,
    decoder layer `index`) given the layer's input `hidden`. `keys`: the layer's cached (rotated) keys of these T
    slots when a cache holds them; otherwise they are projected again."""
    position_embeddings, valid = layout.rotation(index), layout.valid_keys.valid
    attention = attention_of(layer)
    batch, length = valid.shape
    slots = torch.arange(length, device=valid.device)
    last = torch.where(valid, slots, -1).amax(dim=1)
    rows = torch.arange(batch, device=valid.device)
    normed_last = layer.input_layernorm(hidden[rows, last][:, None])  # a per-token norm: the query row needs only its own
    query = projected_heads(attention, normed_last, "q")
    cos, sin = position_embeddings
    query = rotated(query, cos[rows, last][:, None], sin[rows, last][:, None])
    if keys is None:
        keys = rotated_keys(layer, hidden, position_embeddings)
    key = repeat_kv(keys, attention.num_key_value_groups)
    scores = (query.float() @ key.float().transpose(-1, -2)).squeeze(2) * attention.scaling
    # The last token is the last valid slot, so the valid keys are exactly those its causal mask allows.
    positions = layout.valid_keys.positions  # what the layer's own mask measures windows in (masks.py)
    seen = valid if window is None else valid & (positions[rows, last][:, None] - positions < window)
    scores = scores.masked_fill(~seen[:, None, :], float("-inf"))
    return scores.softmax(dim=-1).mean(dim=1)


def rotated_keys(layer, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
    """(B, kv heads, T, head dim): the keys `layer` (Llama interface) caches for its input `hidden`, after RoPE."""
    keys = projected_heads(attention_of(layer), layer.input_layernorm(hidden), "k")
    cos, sin = position_embeddings
    return rotated(keys, cos, sin)


def rotated(heads: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (B, heads, T, head dim): on its first cos.shape[-1] dims, all of them unless the model rotates part of
    each head (Qwen3.5's partial rotary factor)."""
    dims = cos.shape[-1]
    turned = apply_rotary_pos_emb(heads[..., :dims], heads[..., :dims], cos, sin)[0]
    return turned if dims == heads.shape[-1] else torch.cat([turned, heads[..., dims:]], dim=-1)


def attention_of(layer):
    """The layer's softmax attention module; a method that ranks tokens by attention cannot run on a layer without one."""
    attention = getattr(layer, "self_attn", None)
    if attention is None:
        index = next((module.layer_idx for module in layer.modules() if hasattr(module, "layer_idx")), "?")
        raise ValueError(
            f"decoder layer {index} (0-based) has no softmax attention (linear attention): a method that ranks tokens "
            "by attention or keys needs a full-attention layer there"
        )
    return attention


def projected_heads(attention, normed: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, heads, T, head dim): the query (`kind` "q") or key ("k") heads of `normed` (B, T, H), the layer's normed
    input, with the per-head norm some families apply before RoPE (Qwen3's and Gemma 3's `q_norm` / `k_norm`). A
    query projection twice as wide also holds an output gate after each head's query (Qwen3.5): left out here."""
    projection = getattr(attention, f"{kind}_proj")
    heads = projection(normed).view(*normed.shape[:2], -1, attention.head_dim)
    if kind == "q" and projection.out_features == 2 * attention.config.num_attention_heads * attention.head_dim:
        heads = heads.view(*normed.shape[:2], -1, 2 * attention.head_dim)[..., : attention.head_dim]
    norm = getattr(attention, f"{kind}_norm", None)
    return (heads if norm is None else norm(heads)).transpose(1, 2)
