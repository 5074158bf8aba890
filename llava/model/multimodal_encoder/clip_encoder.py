"""The CLIP vision tower: transformers' CLIPVisionModel, features from one hidden layer."""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.utils import logging as transformers_logging

try:  # transformers >= 5.2x names the PIL-backed processor explicitly; it is LLaVA's (bicubic PIL) path
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:  # older 5.x: the plain name is the PIL-backed processor
    from transformers import CLIPImageProcessor


class VisionTowerNotFoundError(FileNotFoundError):
    """The configured vision tower cannot be loaded from disk."""


def load_image_processor(path: str) -> CLIPImageProcessor:
    if not os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        raise VisionTowerNotFoundError(f"{path}: no preprocessor_config.json (CLIP image processor) in this folder")
    return CLIPImageProcessor.from_pretrained(path)


@contextmanager
def one_half_of_clip():
    """Loading one tower of a full CLIP checkpoint leaves the other's weights unused, by design: transformers'
    load report of them (a warning per run) is kept to errors."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)


class CLIPVisionTower(nn.Module):
    """Images → patch features of `select_layer`.

    Either built from a CLIP config whose weights come with the checkpoint (llava-hf layout), or delay-loaded
    from the folder named by `mm_vision_tower` (original LLaVA layout: the checkpoint's tower weights are ignored).
    """

    def __init__(self, vision_tower: str | None, config, vision_config: CLIPVisionConfig | None = None):
        super().__init__()
        self.vision_tower_name = vision_tower
        self.select_layer = getattr(config, "mm_vision_select_layer", -2)
        self.select_feature = getattr(config, "mm_vision_select_feature", "patch")
        if self.select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"mm_vision_select_feature must be 'patch' or 'cls_patch', not {self.select_feature!r}")
        self.image_processor: CLIPImageProcessor | None = None
        self.is_loaded = vision_config is not None
        if self.is_loaded:
            self.vision_tower = CLIPVisionModel(vision_config)
            self.vision_tower.requires_grad_(False)

    def load_model(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> None:
        """Load CLIP weights and image processor from `mm_vision_tower` (a local folder: there is no model hub)."""
        path = self.vision_tower_name
        if not path or not os.path.isfile(os.path.join(path, "config.json")):
            raise VisionTowerNotFoundError(
                f"vision tower {path!r} (mm_vision_tower in config.json) is not a local CLIP folder with config.json"
            )
        self.image_processor = load_image_processor(path)
        with one_half_of_clip():
            self.vision_tower = CLIPVisionModel.from_pretrained(path, dtype=dtype, device_map=device)
        self.vision_tower.requires_grad_(False)
        self.is_loaded = True

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) pixels → (N, patches[+1], hidden) features. Frozen (as in LLaVA) unless a caller sets
        requires_grad on the tower, as the tiny world's trainer does; frozen weights build no autograd graph."""
        hidden_states = self.hidden_states(images)[self.select_layer]
        return hidden_states[:, 1:] if self.select_feature == "patch" else hidden_states

    def hidden_states(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(N, 3, H, W) pixels → the (N, 1 + patches, hidden) states of the embeddings (after CLIP's pre-layernorm),
        then of each encoder layer's output: what `select_layer` indexes."""
        images = images.to(device=self.device, dtype=self.dtype)
        return self.vision_tower(images, output_hidden_states=True).hidden_states

    @property
    def config(self) -> CLIPVisionConfig:
        return self.vision_tower.config

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.device

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_patches(self) -> int:
        return (self.config.image_size // self.config.patch_size) ** 2
