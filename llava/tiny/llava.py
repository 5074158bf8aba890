"""A tiny random LLaVA checkpoint, written offline (`python -m llava.tiny --out DIR [--format llava|hf]`).

The model is real (transformers' Llama decoder, CLIPVisionModel, LLaVA projector), only small and untrained.
`--format llava` writes the original layout (config with `mm_*` keys, `model.mm_projector.*`, the CLIP tower in
`DIR/vision_tower` as a full CLIP checkpoint with its text side, named by a relative `mm_vision_tower`); `--format
hf` the llava-hf layout through transformers' own `LlavaForConditionalGeneration`. The same `--seed` gives the same weights in both layouts. `--anyres` makes it
LLaVA-NeXT (llava-v1.6's anyres tiles, `spatial_unpad` merge and `image_newline`; `LlavaNextForConditionalGeneration`
in the hf layout).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from transformers import CLIPVisionConfig, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.model.hf_layout import hf_config_from_llava, llava_state_dict_to_hf_modules
from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
from llava.model.multimodal_encoder.clip_encoder import CLIPImageProcessor
from llava.tiny.clip_text import save_full_clip
from llava.tiny.tokenizer import build_tokenizer

VISION_TOWER_DIR = "vision_tower"


@dataclass
class TinyGeometry:
    layers: int = 4
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vision_layers: int = 2
    vision_hidden: int = 32
    vision_heads: int = 2
    image_size: int = 56
    patch_size: int = 14
    vocab_size: int = 1024
    max_positions: int = 2048
    seed: int = 0


# llava-v1.6's image_grid_pinpoints, (width, height) in units of its tower's image size (336).
V1_6_PINPOINTS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


def anyres_settings(image_size: int) -> dict:
    """llava-v1.6's anyres config keys, its pinpoints scaled to a tower of `image_size`; v1.6 also trained its
    tower, so its shards' tower weights are the ones to use."""
    return {
        "image_aspect_ratio": "anyres",
        "mm_patch_merge_type": "spatial_unpad",
        "image_grid_pinpoints": [[width * image_size, height * image_size] for width, height in V1_6_PINPOINTS],
        "unfreeze_mm_vision_tower": True,
    }


def build_tiny_llava(geometry: TinyGeometry, texts: tuple[str, ...] = (), anyres: bool = False):
    """A randomly initialised model with its tokenizer, image processor and CLIP config; llava-v1.6-style with
    `anyres`."""
    tokenizer = build_tokenizer(texts, vocab_size=geometry.vocab_size)
    vision_config = CLIPVisionConfig(
        hidden_size=geometry.vision_hidden,
        intermediate_size=geometry.vision_hidden * 4,
        num_hidden_layers=geometry.vision_layers,
        num_attention_heads=geometry.vision_heads,
        image_size=geometry.image_size,
        patch_size=geometry.patch_size,
    )
    config = LlavaConfig(
        vocab_size=len(tokenizer),
        hidden_size=geometry.hidden,
        intermediate_size=geometry.intermediate,
        num_hidden_layers=geometry.layers,
        num_attention_heads=geometry.heads,
        num_key_value_heads=geometry.kv_heads,
        max_position_embeddings=geometry.max_positions,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["LlavaLlamaForCausalLM"],
        mm_vision_config=vision_config.to_dict(),
        mm_hidden_size=geometry.vision_hidden,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio="pad",
        conv_mode="vicuna_v1",
    )
    if anyres:
        config.update(anyres_settings(geometry.image_size))
    torch.manual_seed(geometry.seed)
    model = LlavaLlamaForCausalLM(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": geometry.image_size},
        crop_size={"height": geometry.image_size, "width": geometry.image_size},
    )
    return model, tokenizer, image_processor, vision_config


def save_llava_layout(out: str, model, tokenizer, image_processor) -> None:
    """Original LLaVA layout: the tower goes to its own folder, named by `mm_vision_tower`."""
    tower_dir = os.path.join(out, VISION_TOWER_DIR)
    tower = model.get_vision_tower()  # as openai's CLIP: both towers, a tokenizer (the loaded text half kept)
    save_full_clip(tower_dir, tower.vision_tower, text_from=tower.vision_tower_name)
    image_processor.save_pretrained(tower_dir)
    if hasattr(model.config, "mm_vision_config"):  # a loaded model names its tower by path instead
        del model.config.mm_vision_config
    model.config.mm_vision_tower = VISION_TOWER_DIR
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def save_hf_layout(out: str, model, tokenizer, image_processor, vision_config: CLIPVisionConfig) -> None:
    """llava-hf layout, written by transformers' own class from the same weights."""
    image_token_index = tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    num_patches = (vision_config.image_size // vision_config.patch_size) ** 2
    hf_config = hf_config_from_llava(model.config, vision_config, image_token_index, num_patches)
    next_layout = hf_config.model_type == "llava_next"
    hf_model = (LlavaNextForConditionalGeneration if next_layout else LlavaForConditionalGeneration)(hf_config)
    hf_model.load_state_dict(llava_state_dict_to_hf_modules(model.state_dict()), strict=True)
    hf_model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)


def write_tiny_checkpoint(
    out: str, layout: str = "llava", geometry: TinyGeometry | None = None, anyres: bool = False
) -> str:
    geometry = geometry or TinyGeometry()
    model, tokenizer, image_processor, vision_config = build_tiny_llava(geometry, anyres=anyres)
    os.makedirs(out, exist_ok=True)
    if layout == "llava":
        save_llava_layout(out, model, tokenizer, image_processor)
    elif layout == "hf":
        save_hf_layout(out, model, tokenizer, image_processor, vision_config)
    else:
        raise ValueError(f"unknown layout {layout!r}: expected 'llava' or 'hf'")
    return out
