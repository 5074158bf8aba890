"""Pretrain the tiny world's vision tower on dense scene labels: the world's stand-in for CLIP's pretraining.

LLaVA starts from a pretrained CLIP and keeps it frozen while the language model learns to read it. No pretrained
tower exists offline, and a tower learned only through the answer loss learns the world poorly (the first world
model answered shape questions at chance). So the tower first learns, for every patch of freshly drawn scenes,
the object covering it (or that it is background) from the features LLaVA feeds the projector
(`mm_vision_select_layer`): its colour, shape and size, its name (colour and shape at once, so "is there a red
circle" reads one feature instead of matching two), and the column of its centre (so "left of" compares two
features instead of working out columns from the order of 196 tokens).
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from llava.world.generate import COLOURS, IMAGE_SIZE, SHAPES, SIZES, Shape, object_map, random_scene, render

COLUMNS = 14  # bins of an object's centre x, 8 px each
# Per patch, one label per attribute; class 0 is "no object covers this patch".
ATTRIBUTES = {
    "colour": ("none", *COLOURS),
    "shape": ("none", *SHAPES),
    "size": ("none", *SIZES),
    "name": ("none", *(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)),
    "column": ("none", *(str(column) for column in range(COLUMNS))),
}
MIN_COVER = 0.25  # share of a patch's pixels an object needs to name the patch


def centre_column(shape: Shape) -> int:
    return min(shape.x * COLUMNS // IMAGE_SIZE, COLUMNS - 1)


def attribute_values(shape: Shape) -> tuple[str, ...]:
    """The object's class name for each of ATTRIBUTES, in order."""
    return shape.colour, shape.kind, shape.size, shape.name, str(centre_column(shape))


def patch_labels(shapes: list[Shape], patch_size: int) -> torch.Tensor:
    """(len(ATTRIBUTES), patches) long: each attribute's class of the object covering most of each patch."""
    objects = np.asarray(object_map(shapes))
    grid = objects.shape[0] // patch_size
    patches = objects.reshape(grid, patch_size, grid, patch_size).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    cover = np.stack([(patches == i + 1).mean(axis=1) for i in range(len(shapes))])  # (objects, patches)
    owner = np.where(cover.max(axis=0) >= MIN_COVER, cover.argmax(axis=0), -1)
    labels = torch.zeros(len(ATTRIBUTES), grid * grid, dtype=torch.long)
    for i, shape in enumerate(shapes):
        at = torch.from_numpy(owner == i)
        for row, (classes, value) in enumerate(zip(ATTRIBUTES.values(), attribute_values(shape))):
            labels[row, at] = classes.index(value)
    return labels


def scene_batch(rng: random.Random, image_processor, batch_size: int, patch_size: int):
    scenes = [random_scene(rng) for _ in range(batch_size)]
    pixels = image_processor([render(s) for s in scenes], return_tensors="pt")["pixel_values"]
    return pixels, torch.stack([patch_labels(s, patch_size) for s in scenes])


class PatchHeads(torch.nn.Module):
    """One linear classifier per attribute on each patch's feature."""

    def __init__(self, hidden: int):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, len(classes)) for classes in ATTRIBUTES.values())

    def forward(self, features: torch.Tensor) -> list[torch.Tensor]:
        return [head(features) for head in self.heads]


def take_step(loss: torch.Tensor, parameters: list, optimizer, schedule) -> None:
    """One optimiser step on `loss`, gradients clipped to norm 1, then the schedule's step."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)


def pretrain_tower(tower, image_processor, steps: int, batch_size: int = 64, learning_rate: float = 2e-3, seed: int = 0) -> dict:
    """Train `tower` (a `CLIPVisionTower`) in place; returns per-attribute patch accuracy on 512 unseen scenes."""
    rng = random.Random(f"tower-{seed}")
    patch_size = tower.config.patch_size
    heads = PatchHeads(tower.config.hidden_size)
    tower.vision_tower.requires_grad_(True)
    parameters = [*tower.vision_tower.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.05)
    progress = tqdm(range(steps), desc="pretraining the world's vision tower", unit="step")
    for _ in progress:
        pixels, labels = scene_batch(rng, image_processor, batch_size, patch_size)
        logits = heads(tower(pixels))
        loss = sum(F.cross_entropy(l.flatten(0, 1), labels[:, row].flatten()) for row, l in enumerate(logits))
        take_step(loss, parameters, optimizer, schedule)
        progress.set_postfix(loss=f"{loss.item():.3f}")
    tower.vision_tower.requires_grad_(False)
    return patch_accuracy(tower, heads, image_processor, random.Random(f"tower-test-{seed}"), patch_size)


@torch.no_grad()
def patch_accuracy(tower, heads: PatchHeads, image_processor, rng: random.Random, patch_size: int) -> dict:
    """Per attribute, the share of object-covered patches classified right (background is most patches and easy)."""
    pixels, labels = scene_batch(rng, image_processor, 512, patch_size)
    logits = heads(tower(pixels))
    covered = labels[:, 0] > 0
    return {
        attribute: round((l.argmax(-1) == labels[:, row])[covered].float().mean().item(), 4)
        for row, (attribute, l) in enumerate(zip(ATTRIBUTES, logits))
    }
