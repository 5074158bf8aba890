"""Build the vision tower a LLaVA config names."""

from __future__ import annotations

from transformers import CLIPVisionConfig

from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower


def build_vision_tower(config) -> CLIPVisionTower:
    """`mm_vision_config` (tower weights in the checkpoint) wins; else delay-load from `mm_vision_tower`."""
    vision_config = getattr(config, "mm_vision_config", None)
    if vision_config is not None:
        vision_config = CLIPVisionConfig(**vision_config) if isinstance(vision_config, dict) else vision_config
    name = getattr(config, "mm_vision_tower", None) or getattr(config, "vision_tower", None)
    if vision_config is None and not name:
        raise ValueError("config has neither mm_vision_tower nor mm_vision_config: no vision tower to build")
    return CLIPVisionTower(name, config, vision_config=vision_config)
