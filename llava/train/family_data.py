"""Gate-training data for checkpoints of transformers' own VLM families: LLaVA's conversation JSON, rendered with
the checkpoint's own chat template by its `FamilyProcessor` (llava.model.families.processing), which also labels
the assistant turns and collates.

Records are checked as for LLaVA (llava.train.data: missing or unreadable image, no answer, roles out of order),
when the dataset is built. A sample is encoded when drawn (its visual-token count needs the image); one longer
than `model_max_length` cannot be cut without cutting an image, so it is counted and the next sample used instead.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from torch.utils.data import Dataset

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.mm_utils import ImageLoadError, load_image
from llava.train.data import DataError, SampleError, checked_image, conversation_turns, usable_samples

logger = logging.getLogger(__name__)


@dataclass
class FamilyRecord:
    conversation: list[dict]
    image: str | None
    words: int


@dataclass
class FamilySupervisedDataset(Dataset):
    data_path: str
    processor: object
    image_folder: str | None = None
    model_max_length: int = 2048
    skipped: Counter = field(default_factory=Counter)
    unreadable_images: int = 0
    too_long: int = 0

    def __post_init__(self):
        self.records = usable_samples(self.data_path, self._check, self.skipped)

    def _check(self, record) -> FamilyRecord:
        image = checked_image(record, self.image_folder)
        pairs = conversation_turns(record, has_image=image is not None)
        conversation = [{"from": role, "value": text} for pair in pairs for role, text in zip(("human", "gpt"), pair)]
        if image is None and any(DEFAULT_IMAGE_TOKEN in turn["value"] for turn in conversation):
            raise SampleError("<image> tag without an image")
        return FamilyRecord(conversation, image, sum(len(turn["value"].split()) for turn in conversation))

    def __len__(self) -> int:
        return len(self.records)

    @property
    def modality_lengths(self) -> list[int]:
        """As LLaVA's: positive for image samples (+128 for the image), negative for text-only ones."""
        return [r.words + 128 if r.image else -r.words for r in self.records]

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self)):
            record = self.records[(index + offset) % len(self)]
            try:
                images = [] if record.image is None else [load_image(record.image)]
            except ImageLoadError as error:
                self.unreadable_images += 1
                logger.warning("%s (unreadable images so far: %d); using the next sample", error, self.unreadable_images)
                continue
            inputs = self.processor.training_inputs(record.conversation, images)
            if inputs["input_ids"].shape[1] > self.model_max_length:
                self.too_long += 1
                logger.warning("a sample of %d tokens exceeds model_max_length %d (so far: %d); using the next sample",
                               inputs["input_ids"].shape[1], self.model_max_length, self.too_long)
                continue
            return dict(inputs)
        raise DataError(f"{self.data_path}: no usable sample among {len(self)} (unreadable images or too long)")


@dataclass
class FamilyCollator:
    """Right padding through the processor (the gate-training pass reads the answers from the labels)."""

    processor: object

    def __call__(self, batch: list[dict]) -> dict:
        return dict(self.processor.collate(batch, padding_side="right"))
