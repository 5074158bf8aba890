"""LLaVA's `group_by_modality_length`: batches hold one modality (image or text-only) and similar lengths."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


def _megabatches(indices: list[int], lengths: list[int], size: int, generator: torch.Generator) -> list[list[int]]:
    shuffled = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
    chunks = [shuffled[i : i + size] for i in range(0, len(shuffled), size)]
    return [sorted(chunk, key=lambda i: -abs(lengths[i])) for chunk in chunks]


def modality_length_grouped_indices(lengths: list[int], megabatch_size: int, generator: torch.Generator) -> list[int]:
    """`lengths` > 0 for image samples, < 0 for text-only ones. Each modality is shuffled and cut into
    megabatches (batch size x world size) sorted by length; full megabatches are shuffled together and the two
    partial ones close the epoch."""
    image = [i for i, length in enumerate(lengths) if length > 0]
    text = [i for i, length in enumerate(lengths) if length < 0]
    groups = _megabatches(image, lengths, megabatch_size, generator) + _megabatches(text, lengths, megabatch_size, generator)
    full = [group for group in groups if len(group) == megabatch_size]
    partial = [i for group in groups if len(group) < megabatch_size for i in group]
    order = torch.randperm(len(full), generator=generator).tolist()
    return [i for position in order for i in full[position]] + partial


class ModalityLengthGroupedSampler(Sampler[int]):
    def __init__(self, lengths: list[int], batch_size: int, world_size: int, seed: int):
        self.lengths, self.megabatch_size, self.seed, self.epoch = lengths, batch_size * world_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(modality_length_grouped_indices(self.lengths, self.megabatch_size, generator))
