"""CLIP's text side, paired with LLaVA's CLIP vision tower, for CDPruner (arXiv 2506.10967): instruction embeddings
from transformers' `CLIPTextModelWithProjection` and `CLIPTokenizerFast`, and image embeddings from the tower's
feature-layer patches through its own `post_layernorm` and the checkpoint's `visual_projection` — all read from the
folder `mm_vision_tower` names, as its official code reads them (a full CLIP checkpoint such as
clip-vit-large-patch14-336; a vision-only folder has no text side and is refused).

Text: each instruction is tokenised whole (BOS ... EOS), zero-padded (ids and mask) to a multiple of the text model's
position count and cut into rows of that length; each row gives one projected embedding (`text_embeds`), so a
long instruction has several. Rows after the first start without BOS and only the last holds EOS: the installed
text model's own pooling rule picks each row's state, as it does for the official code.
"""

from __future__ import annotations

import copy
import json
import os

import torch
from transformers import CLIPTextModelWithProjection, CLIPTokenizerFast, CLIPVisionModelWithProjection

from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower, one_half_of_clip


class TextTowerNotFoundError(FileNotFoundError):
    """The vision tower's folder holds no CLIP text model or tokenizer."""


def check_text_tower(path: str | None) -> None:
    """TextTowerNotFoundError unless `path` is a full CLIP checkpoint: a config with a text part and a tokenizer."""
    config_file = os.path.join(path or "", "config.json")
    if not path or not os.path.isfile(config_file):
        raise TextTowerNotFoundError(f"CDPruner reads CLIP's text tower from the vision tower's folder, but {path!r} "
                                     "(mm_vision_tower) is not a local folder with config.json")
    with open(config_file) as handle:
        config = json.load(handle)
    if config.get("model_type") != "clip" or "text_config" not in config:
        raise TextTowerNotFoundError(f"{config_file}: a vision-only CLIP config; CDPruner needs the full CLIP "
                                     "checkpoint (text_config, text weights and tokenizer) in the tower's folder")
    if not any(os.path.isfile(os.path.join(path, name)) for name in ("tokenizer.json", "vocab.json")):
        raise TextTowerNotFoundError(f"{path}: no CLIP tokenizer (tokenizer.json or vocab.json) for CDPruner's text")


class InstructionEncoder:
    """Loaded once per tower, on its device; not a module of the model (its weights are never saved with it)."""

    def __init__(self, tower: CLIPVisionTower):
        path = tower.vision_tower_name
        check_text_tower(path)
        self.tokenizer = CLIPTokenizerFast.from_pretrained(path)
        # All fp32, whatever the model's dtype: the official loader (device_map="auto") never casts its CLIP modules.
        with one_half_of_clip():
            self.text_model = CLIPTextModelWithProjection.from_pretrained(path, dtype=torch.float32).to(tower.device)
            projection = CLIPVisionModelWithProjection.from_pretrained(path, dtype=torch.float32).visual_projection
        self.text_model.requires_grad_(False).eval()
        self.visual_projection = projection.to(tower.device).requires_grad_(False)
        self.post_layernorm = copy.deepcopy(tower.vision_tower.post_layernorm).float()
        self.row_length = self.text_model.config.max_position_embeddings

    @property
    def device(self) -> torch.device:
        return self.text_model.device

    @torch.no_grad()
    def text_embeds(self, instructions: list[str]) -> list[torch.Tensor]:
        """One (rows, projection_dim) tensor per instruction; all rows of all instructions in one call."""
        rows, masks, counts = [], [], []
        for text in instructions:
            encoded = self.tokenizer(text=text, return_tensors="pt", verbose=False)  # rows, not truncation
            ids, mask = encoded.input_ids[0], encoded.attention_mask[0]
            count = (len(ids) - 1) // self.row_length + 1
            padding = count * self.row_length - len(ids)
            rows.append(torch.cat([ids, ids.new_zeros(padding)]).view(count, self.row_length))
            masks.append(torch.cat([mask, mask.new_zeros(padding)]).view(count, self.row_length))
            counts.append(count)
        device = self.text_model.device
        embeds = self.text_model(input_ids=torch.cat(rows).to(device), attention_mask=torch.cat(masks).to(device)).text_embeds
        return list(torch.split(embeds, counts))

    def text_flops(self, rows: int) -> int:
        """The text tower on `rows` rows of L positions (2 x multiply-adds; attention as the full square): per layer
        8Ld² + 4L²d + 4Ldm, and the projection of each row's pooled state."""
        config = self.text_model.config
        length, d, m = self.row_length, config.hidden_size, config.intermediate_size
        layer = 8 * length * d * d + 4 * length * length * d + 4 * length * d * m
        return rows * (config.num_hidden_layers * layer + 2 * d * config.projection_dim)

    def image_embed_flops(self, tokens: int) -> int:
        """`visual_projection` on `tokens` states (the layer norm is not counted, as nowhere else)."""
        return 2 * tokens * self.visual_projection.in_features * self.visual_projection.out_features

    @torch.no_grad()
    def image_embeds(self, features: torch.Tensor) -> torch.Tensor:
        """(V, N, width) feature-layer states → (V, N, projection_dim) fp32 image embeddings."""
        return self.visual_projection(self.post_layernorm(features.float()))
