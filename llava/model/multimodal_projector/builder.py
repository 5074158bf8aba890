"""The projector from vision features to LLM embeddings: `linear`, `mlp{N}x_gelu` or `identity`."""

from __future__ import annotations

import re

from torch import nn


def build_vision_projector(config) -> nn.Module:
    projector_type = getattr(config, "mm_projector_type", "linear")
    vision_size, text_size = config.mm_hidden_size, config.hidden_size
    if projector_type == "linear":
        return nn.Linear(vision_size, text_size)
    if projector_type == "identity":
        return nn.Identity()
    match = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if match is None:
        raise ValueError(f"unknown mm_projector_type {projector_type!r} (expected linear, mlpNx_gelu or identity)")
    layers: list[nn.Module] = [nn.Linear(vision_size, text_size)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(text_size, text_size)]
    return nn.Sequential(*layers)
