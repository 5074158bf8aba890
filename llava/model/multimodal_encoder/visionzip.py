"""VisionZip (arXiv 2412.04467) on LLaVA's CLIP tower: per view, D dominant and C contextual tokens of the feature
layer (the one `mm_vision_select_layer` names) instead of its patches; the projector and the LLM get only those.

Of the feature layer's N = 1 + patches output states:
- dominant: the CLS token and the D - 1 patches the CLS query attends to most in that layer (attention summed over
  heads), CLS first, then the patches in index order;
- contextual: of the R = N - D others (index order), the C targets are every floor(R / C)-th, the first C; every
  other one joins the target whose key is most similar (cosine of the layer's keys averaged over heads), and each
  contextual token is its target's state plus the mean of the states that joined it (none: the target alone).
Output: (views, D + C, hidden), dominant then contextual. D >= N keeps every token in order; C >= R keeps all R.

CLS is kept whatever `mm_vision_select_feature` says, as VisionZip does on LLaVA-1.5 (whose `patch` features
never show the projector a CLS state): the published 64 = 54 + 10 tokens include it. So with `patch`, D = N gives
the stock `cls_patch` features, one token more than the stock model.

Only the CLS query's attention row is computed, from the layer's input through its own layer norm and q/k
projections; the tower itself keeps its attention kernel (SDPA returns no attention map).
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower


def visionzip_features(tower: CLIPVisionTower, images: torch.Tensor, dominant: int, contextual: int) -> torch.Tensor:
    """(V, 3, S, S) views → (V, min(D, N) + min(C, R), hidden): each view's dominant and contextual tokens."""
    layer_index = feature_layers(tower) - 1
    if layer_index < 0:
        raise ValueError(
            f"VisionZip reads the attention of the layer whose output the features are, but mm_vision_select_layer "
            f"{tower.select_layer} selects the embeddings"
        )
    hidden_states = tower.hidden_states(images)
    layer = tower.vision_tower.encoder.layers[layer_index]
    cls_attention, keys = cls_attention_and_keys(layer, hidden_states[layer_index])
    return dominant_and_contextual(hidden_states[layer_index + 1], cls_attention, keys, dominant, contextual)


def feature_layers(tower: CLIPVisionTower) -> int:
    """How many encoder layers the features come out of: `select_layer` indexes the hidden states, which start
    with the embeddings."""
    layers = tower.config.num_hidden_layers
    if not -(layers + 1) <= tower.select_layer <= layers:
        raise ValueError(f"mm_vision_select_layer {tower.select_layer} is outside the {layers + 1} hidden states")
    return tower.select_layer % (layers + 1)


def cls_attention_and_keys(layer: CLIPEncoderLayer, layer_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For `layer` on its (V, N, hidden) input: the CLS query's attention to the patches summed over heads
    (V, N - 1), and the keys averaged over heads (V, N, head_dim), as the layer's own attention computes them."""
    attention = layer.self_attn
    normed = layer.layer_norm1(layer_input)
    views, tokens, _ = normed.shape
    keys = attention.k_proj(normed).view(views, tokens, attention.num_heads, attention.head_dim)
    cls_query = attention.q_proj(normed[:, 0]).view(views, attention.num_heads, attention.head_dim)
    scores = torch.einsum("vhd,vnhd->vhn", cls_query, keys) * attention.scale
    # over all N keys, CLS included, in fp32 as the layer's eager softmax
    probabilities = scores.softmax(dim=-1, dtype=torch.float32)
    return probabilities[:, :, 1:].sum(dim=1), keys.mean(dim=2)


def dominant_and_contextual(
    states: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int
) -> torch.Tensor:
    """(V, N, hidden) states, (V, N - 1) CLS attention to the patches, (V, N, head_dim) keys → (V, D + C, hidden)."""
    views, tokens, width = states.shape
    dominant = min(dominant, tokens)
    is_dominant = torch.zeros(views, tokens, dtype=torch.bool, device=states.device)
    is_dominant[:, 0] = True
    is_dominant.scatter_(1, cls_attention.topk(dominant - 1, dim=1).indices + 1, True)
    # a boolean mask reads each view's tokens in index order: CLS, then the patches ascending
    dominant_states = states[is_dominant].view(views, dominant, width)
    rest = tokens - dominant
    contextual = min(contextual, rest)
    if contextual == 0:
        return dominant_states
    rest_states = states[~is_dominant].view(views, rest, width)
    rest_keys = keys[~is_dominant].view(views, rest, -1)
    rest_keys = rest_keys / rest_keys.norm(dim=-1, keepdim=True)
    is_target = torch.zeros(rest, dtype=torch.bool, device=states.device)
    is_target[torch.arange(contextual, device=states.device) * (rest // contextual)] = True
    similarity = rest_keys[:, ~is_target] @ rest_keys[:, is_target].transpose(1, 2)  # (V, R - C, C)
    joined = similarity.argmax(dim=2)  # the first of equally similar targets
    sums = states.new_zeros(views, contextual, width)
    sums.scatter_add_(1, joined[..., None].expand(-1, -1, width), rest_states[:, ~is_target])
    counts = states.new_zeros(views, contextual).scatter_add_(1, joined, states.new_ones(joined.shape))
    contextual_states = rest_states[:, is_target] + sums / counts.clamp(min=1)[..., None]
    return torch.cat([dominant_states, contextual_states], dim=1)


def tower_flops(config: CLIPVisionConfig, layers: int) -> int:
    """Theoretical FLOPs of one view through the patch embedding and the first `layers` encoder layers, counted as
    the LM's (2 x multiply-adds of the matmuls; attention as the full square): with N tokens of width d and MLP
    width m, 2·patches·3p²·d for the embedding and 8Nd² + 4N²d + 4Ndm per layer (CLIP's MLP has two matrices)."""
    patches = (config.image_size // config.patch_size) ** 2
    n, d, m = patches + 1, config.hidden_size, config.intermediate_size
    embedding = 2 * patches * config.num_channels * config.patch_size**2 * d
    return embedding + layers * (8 * n * d * d + 4 * n * n * d + 4 * n * d * m)


def merge_flops(config: CLIPVisionConfig, dominant: int, contextual: int) -> int:
    """What VisionZip adds to one view's tower: the cosine similarities of the R - C joining tokens to the C
    targets (2·(R - C)·C·head_dim) and the sums and means of their states ((R - C)·d + 2·C·d). The dominant scores
    are a row of the feature layer's attention and the metric its keys: the layer computes both (ours recomputes
    the keys and the CLS row, since SDPA returns neither; like FastV's row that is not counted)."""
    tokens = (config.image_size // config.patch_size) ** 2 + 1
    rest = tokens - min(dominant, tokens)
    contextual = min(contextual, rest)
    joining, d = rest - contextual, config.hidden_size
    return 2 * joining * contextual * (d // config.num_attention_heads) + (joining + 2 * contextual) * d
