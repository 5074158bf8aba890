"""Training data: LLaVA's conversation JSON → token ids with answer-only labels, images loaded lazily. One dataset
class for every checkpoint; its encoder makes the samples: LLaVA's templates for our LLaVA class (`LlavaTurns`), the
checkpoint's own chat template for transformers' VLM classes (`FamilyTurns`).

Records: `{"id", "image" (optional, relative to the image folder), "conversations": [{"from": "human"|"gpt",
"value"}, ...]}` in a JSON list or JSON lines. Labels are IGNORE_INDEX everywhere except the assistant answers and
the separator that closes each (`</s>` for vicuna_v1), as LLaVA supervises them. Which tokens those are is read
from the tokenizer's character offsets, so it holds for any tokenizer.

Bad records never stop a run midway: they are found when the dataset is built, skipped, counted by reason and
reported in one warning (missing or unreadable image, no answer, roles out of order, answer cut off by
model_max_length). Malformed JSON, or a file without one usable record, stops before training with one error naming
the file (and line, or the reason counts).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from llava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.conversation import SeparatorStyle, get_conv_template
from llava.mm_utils import ImageLoadError, load_image, process_images

logger = logging.getLogger(__name__)

ROLES = {"human": 0, "gpt": 1}
_ANSWER = "\x00answer{}\x00"  # placeholder that no template or answer contains


class DataError(ValueError):
    """The data file cannot be read at all; the message names the file (and line)."""


class SampleError(ValueError):
    """One record cannot be used; the message says why."""


def load_records(path: str) -> list[dict]:
    """A JSON list, or JSON lines; malformed input raises DataError with file and line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: data file not found")
    with open(path) as handle:
        text = handle.read()
    if path.endswith(".jsonl"):
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number}: invalid JSON ({error.msg})") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of samples, got {type(records).__name__}")
    return records


def _opens_as_image(path: str) -> bool:
    """Whether PIL recognises the file from its header: cheap, the pixels are read when the sample is drawn."""
    try:
        with Image.open(path):
            return True
    except (UnidentifiedImageError, OSError):
        return False


def conversation_turns(record: dict, has_image: bool) -> list[tuple[str, str]]:
    """(human, gpt) pairs, `<image>` moved to the front of the first human turn as LLaVA does."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise SampleError("no 'conversations' list")
    if turns and turns[0].get("from") != "human":
        turns = turns[1:]  # LLaVA drops a leading non-human turn
    pairs = []
    for index in range(0, len(turns) - 1, 2):
        human, gpt = turns[index], turns[index + 1]
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            raise SampleError("roles do not alternate human/gpt")
        if not isinstance(human.get("value"), str) or not isinstance(gpt.get("value"), str):
            raise SampleError("a turn has no text value")
        pairs.append((human["value"], gpt["value"]))
    if not pairs or not any(answer.strip() for _, answer in pairs):
        raise SampleError("no answer")
    if has_image:
        first = pairs[0][0].replace(DEFAULT_IMAGE_TOKEN, "").strip()
        pairs[0] = (f"{DEFAULT_IMAGE_TOKEN}\n{first}", pairs[0][1])
    return pairs


def render_prompt(pairs: list[tuple[str, str]], conv_version: str) -> tuple[str, list[tuple[int, int]]]:
    """The template's prompt string and the character spans it supervises (answer + closing separator)."""
    conv = get_conv_template(conv_version)
    if conv.sep_style is SeparatorStyle.PLAIN:  # pretraining: <image> + caption + "\n", the human text dropped
        caption = pairs[0][1]
        prompt = DEFAULT_IMAGE_TOKEN + caption + conv.sep
        return prompt, [(len(DEFAULT_IMAGE_TOKEN), len(prompt))]
    for index, (human, _) in enumerate(pairs):
        conv.append_message(conv.roles[0], human)
        conv.append_message(conv.roles[1], _ANSWER.format(index))
    prompt, spans = conv.get_prompt(), []
    for index, (_, answer) in enumerate(pairs):
        placeholder = _ANSWER.format(index)
        start = prompt.index(placeholder)
        prompt = prompt[:start] + answer + prompt[start + len(placeholder) :]
        end = start + len(answer)
        closing = conv.sep2 or conv.sep  # the separator that ends an assistant turn
        gap = len(prompt[end:]) - len(prompt[end:].lstrip(" "))
        if closing and prompt.startswith(closing, end + gap):
            end += gap + len(closing)
        # The space after the role ("ASSISTANT: ") belongs to the answer, as LLaVA masks it: the generation
        # prompt ends before it, so a lone "▁" token there (before digits, say) is the first token to predict.
        lead = len(prompt[:start]) - len(prompt[:start].rstrip(" "))
        spans.append((start - lead, end))
    return prompt, spans


def tokenize_with_labels(prompt: str, spans: list[tuple[int, int]], tokenizer) -> tuple[list[int], list[int]]:
    """Ids as `tokenizer_image_token` gives them, labels = ids on tokens overlapping a supervised span."""
    ids, labels, offset = [], [], 0
    for index, piece in enumerate(prompt.split(DEFAULT_IMAGE_TOKEN)):
        if index > 0:
            ids.append(IMAGE_TOKEN_INDEX)
            labels.append(IGNORE_INDEX)
            offset += len(DEFAULT_IMAGE_TOKEN)
        encoded = tokenizer(piece, return_offsets_mapping=True)
        for position, (token, (start, end)) in enumerate(zip(encoded.input_ids, encoded.offset_mapping)):
            if position == 0 and token == tokenizer.bos_token_id and index > 0:
                continue  # one BOS for the whole prompt, as tokenizer_image_token keeps it
            supervised = end > start and any(offset + end > a and offset + start < b for a, b in spans)
            ids.append(token)
            labels.append(token if supervised else IGNORE_INDEX)
        offset += len(piece)
    return ids, labels


def usable_samples(data_path: str, prepare, skipped: Counter) -> list:
    """`prepare(record)` of every record of the file; records it refuses (SampleError) are counted by reason in
    `skipped` and reported in one warning, and a file without one usable record is a DataError."""
    samples, examples = [], {}
    records = load_records(data_path)
    for number, record in enumerate(records):
        try:
            samples.append(prepare(record))
        except SampleError as error:
            skipped[str(error)] += 1
            examples.setdefault(str(error), str(record.get("id", f"#{number}")) if isinstance(record, dict) else f"#{number}")
    detail = "; ".join(f"{count} × {reason} (e.g. {examples[reason]})" for reason, count in skipped.items())
    if not samples:
        reasons = f": {detail}" if detail else ""
        raise DataError(f"{data_path}: no usable sample among {len(records)}{reasons}")
    if skipped:
        logger.warning("%s: skipped %d of %d samples: %s", data_path, sum(skipped.values()), len(records), detail)
    return samples


def checked_image(record, image_folder: str | None) -> str | None:
    """The path of the record's image (None without one), which must exist and open as an image."""
    if not isinstance(record, dict):
        raise SampleError("not a JSON object")
    image = record.get("image")
    if image is None:
        return None
    image = os.path.join(image_folder or "", image)
    if not os.path.isfile(image):
        raise SampleError("missing image")
    if not _opens_as_image(image):
        raise SampleError("unreadable image")
    return image


class SampleTooLong(ValueError):
    """A sample that encodes to more tokens than model_max_length and cannot be cut (its image would be)."""


@dataclass
class Sample:
    text: object  # what the encoder prepared of the turns when the dataset was built
    image: str | None
    words: int  # LLaVA's length proxy for grouping


@dataclass
class SupervisedDataset(Dataset):
    """Validated records with their text prepared by `encoder` (`LlavaTurns` for our LLaVA class, `FamilyTurns` for
    transformers' VLM classes) when the dataset is built; images are read and the sample encoded when drawn, and
    `encoder.collate` batches them."""

    data_path: str
    encoder: object
    image_folder: str | None = None
    model_max_length: int = 2048
    skipped: Counter = field(default_factory=Counter)
    unreadable_images: int = 0
    too_long: int = 0

    def __post_init__(self):
        self.samples = usable_samples(self.data_path, self._prepare, self.skipped)

    def _prepare(self, record) -> Sample:
        image = checked_image(record, self.image_folder)
        pairs = conversation_turns(record, has_image=image is not None)
        if image is None and any(DEFAULT_IMAGE_TOKEN in turn for pair in pairs for turn in pair):
            raise SampleError("<image> tag without an image")
        words = sum(len(turn.split()) for pair in pairs for turn in pair)
        return Sample(self.encoder.prepare(pairs, self.model_max_length), image, words)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def modality_lengths(self) -> list[int]:
        """Positive for image samples (+128 for the image, as LLaVA counts), negative for text-only ones."""
        return [s.words + 128 if s.image else -s.words for s in self.samples]

    def __getitem__(self, index: int) -> dict:
        # An image whose header reads but whose data does not is found only now, as is a family's sample too long
        # to encode: count it and use the next sample instead of stopping the run, unless not one can be used.
        failed = Counter()
        for offset in range(len(self)):
            sample = self.samples[(index + offset) % len(self)]
            try:
                images = [] if sample.image is None else [load_image(sample.image)]
            except ImageLoadError as error:
                self.unreadable_images += 1
                failed["unreadable image data"] += 1
                logger.warning("%s (unreadable images so far: %d); using the next sample", error, self.unreadable_images)
                continue
            try:
                return self.encoder.encode(sample.text, images, self.model_max_length)
            except SampleTooLong as error:
                self.too_long += 1
                failed["longer than model_max_length"] += 1
                logger.warning("%s (so far: %d); using the next sample", error, self.too_long)
        reasons = ", ".join(f"{count} × {reason}" for reason, count in failed.items())
        raise DataError(f"{self.data_path}: no usable sample among {len(self)}: {reasons}")


@dataclass
class LlavaText:
    input_ids: list[int]
    labels: list[int]
    instruction: str  # the first question, which CDPruner ranks image tokens by when the gates train after it


@dataclass
class LlavaTurns:
    """Our LLaVA class's samples, as LLaVA's training makes them: `conv_version`'s template, ids and answer-only
    labels cut at model_max_length when the dataset is built, the image through `process_images` when drawn."""

    tokenizer: object
    image_processor: object
    model_config: object
    conv_version: str = "v1"

    def prepare(self, pairs: list[tuple[str, str]], max_length: int) -> LlavaText:
        prompt, spans = render_prompt(pairs, self.conv_version)
        ids, labels = tokenize_with_labels(prompt, spans, self.tokenizer)
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise SampleError("answer cut off by model_max_length")
        return LlavaText(ids, labels, pairs[0][0])

    def encode(self, text: LlavaText, images: list, max_length: int) -> dict:
        pixels = process_images(images, self.image_processor, self.model_config)[0] if images else None
        return {"input_ids": text.input_ids, "labels": text.labels, "pixels": pixels, "instruction": text.instruction}

    def collate(self, batch: list[dict]) -> dict:
        crop = self.image_processor.crop_size
        return DataCollator(self.tokenizer.pad_token_id, (3, crop["height"], crop["width"]))(batch)


@dataclass
class FamilyTurns:
    """A family checkpoint's samples: LLaVA's conversation rendered with its own chat template by its
    `FamilyProcessor` (llava.model.families.processing), which labels the assistant turns and collates. A sample is
    encoded when drawn (its visual-token count needs the image); one longer than model_max_length cannot be cut
    without cutting an image, so the dataset counts it and uses the next."""

    processor: object

    def prepare(self, pairs: list[tuple[str, str]], max_length: int) -> list[dict]:
        return [{"from": role, "value": text} for pair in pairs for role, text in zip(("human", "gpt"), pair)]

    def encode(self, conversation: list[dict], images: list, max_length: int) -> dict:
        inputs = self.processor.training_inputs(conversation, images)
        if inputs["input_ids"].shape[1] > max_length:
            raise SampleTooLong(f"a sample of {inputs['input_ids'].shape[1]} tokens exceeds model_max_length {max_length}")
        return dict(inputs)

    def collate(self, batch: list[dict]) -> dict:
        """Right padding (the gate-training pass reads the answers from the labels)."""
        return dict(self.processor.collate(batch, padding_side="right"))


@dataclass
class DataCollator:
    """Right-pads ids and labels; text-only samples get a zero image, LLaVA's convention for mixed batches."""

    pad_token_id: int
    image_shape: tuple[int, int, int]

    def __call__(self, batch: list[dict]) -> dict:
        width = max(len(item["input_ids"]) for item in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, item in enumerate(batch):
            n = len(item["input_ids"])
            input_ids[row, :n] = torch.tensor(item["input_ids"])
            labels[row, :n] = torch.tensor(item["labels"])
            attention_mask[row, :n] = 1
        out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        if any(item["pixels"] is not None for item in batch):
            zeros = torch.zeros(self.image_shape)
            out["images"] = torch.stack([item["pixels"] if item["pixels"] is not None else zeros for item in batch])
            out["instructions"] = [item.get("instruction", "") for item in batch]
        return out
