"""Model inputs for transformers' own VLM families from LLaVA conversations, rendered with the checkpoint's own
chat template.

`load_processor(path)` gives a `FamilyProcessor`: `.tokenizer`, `prompt_inputs(conversation, images, videos)` (the
generation prompt added, for eval; each video a `Video` of pre-extracted frames, one per `<video>` tag), `training_inputs(conversation, images)` (with `labels`: the assistant turns'
tokens, each with its end-of-turn token; -100 elsewhere) and `collate(inputs, padding_side)`. A conversation is
LLaVA's list of `{"from": "human" | "gpt" | "system", "value": "...<image>..."}` turns, one image per `<image>` tag.

Where transformers' processor constructs (`AutoProcessor`), it encodes. Where it does not (Qwen2-VL, Qwen2.5-VL,
OneVision and InternVL need torchvision for their video processor), the fallback does the same from the tokenizer,
the saved image processor and the family's placeholder expansion (`FamilyProcessing`, one per family file), which
counts each image's visual tokens from the image processor's outputs as transformers' processor does.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType

import torch
import transformers
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, BatchFeature

from llava.constants import DEFAULT_IMAGE_TOKEN, DEFAULT_VIDEO_TOKEN, IGNORE_INDEX

logger = logging.getLogger(__name__)

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
CHAT_TEMPLATE_FILE = "chat_template.jinja"
PROCESSOR_CONFIG_FILE = "processor_config.json"


def repeat_placeholder(count: int, placeholder_id: int, tokenizer) -> list[int]:
    return [placeholder_id] * count


@dataclass(frozen=True)
class Video:
    """A video as pre-extracted frames (PIL images of one size, in order) sampled at `fps` frames per second, what
    the families' video positions and timestamps are computed from."""

    frames: Sequence
    fps: float = 2.0


@dataclass(frozen=True)
class FamilyProcessing:
    """What building inputs needs to know of one family (and what a tiny checkpoint of it must hold).

    `placeholder`: the tokenizer attribute naming the token the chat template writes once per image, and that
    token when the attribute is absent; `image_run(count, placeholder_id, tokenizer)` is what replaces it, holding
    `count` visual tokens. `token_counts(image_inputs, settings, image_processor)`: each image's count, from the
    image processor's outputs and `settings` (the processor's own arguments, processor_config.json, over the
    defaults `settings_for(model_config)`). `named_tokens`: tokenizer attributes its processor reads;
    `chat_tokens`: further special tokens of its template; `config_tokens`: the model config's token roles
    (`tiny_config`'s `tokens`). `image_kwargs`: what its processor passes to the image processor;
    `token_type_ids(input_ids, tokenizer)`: `mm_token_type_ids`, for the families whose processor returns them.
    `expands_in_text`: its processor writes each image's run into the text before tokenizing, where it merges with
    the template's tokens (Gemma 3's blank lines), so no token-level fallback reproduces it: transformers'
    processor is required. `video_markup`: what its template writes for a video, and `video_inputs(video,
    image_processor, tokenizer)` -> (the text that replaces it, the video's model inputs), for the families that
    take videos. `byte_level_tokenizer`: a tiny checkpoint gets a byte-level (Qwen-style) tokenizer, for a
    family whose tokenizer class transformers imposes (Qwen3.5)."""

    processor_class: str
    chat_template: str
    turn_end: str
    placeholder: tuple[str, str]
    named_tokens: dict[str, str]
    config_tokens: dict[str, str]
    settings_for: Callable[..., dict]
    tiny_image_processor: Callable
    token_counts: Callable[..., list[int]]
    chat_tokens: tuple[str, ...] = ()
    image_run: Callable[[int, int, object], list[int]] = repeat_placeholder
    image_kwargs: dict = field(default_factory=dict)
    token_type_ids: Callable | None = None
    expands_in_text: bool = False
    video_markup: str | None = None
    video_inputs: Callable | None = None
    byte_level_tokenizer: bool = False


def content_jinja(image_markup: str, separator: str = "", video_markup: str | None = None) -> str:
    """Jinja writing `message.content`: a string as it is, a list of parts in order (each image as
    `image_markup`, each video as `video_markup`), joined by `separator`."""
    video = "" if video_markup is None else "{%- elif part.type == 'video' -%}{{ " + repr(video_markup) + " }}"
    between = "{%- if not loop.first -%}{{ " + repr(separator) + " }}{%- endif -%}" if separator else ""
    return (
        "{%- if message.content is string -%}{{ message.content }}{%- else -%}"
        "{%- for part in message.content -%}" + between
        + "{%- if part.type == 'image' -%}{{ " + repr(image_markup) + " }}" + video
        + "{%- else -%}{{ part.text }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
    )


def chat_messages(conversation: Sequence[dict], image_count: int, video_count: int = 0) -> list[dict]:
    """LLaVA's turns as chat-template messages: `<image>` and `<video>` tags become image and video parts in place,
    the text around them text parts (stripped: the template decides the separators)."""
    if not conversation:
        raise ValueError("empty conversation: expected LLaVA turns {'from': 'human' | 'gpt', 'value': ...}")
    messages, tags = [], {DEFAULT_IMAGE_TOKEN: 0, DEFAULT_VIDEO_TOKEN: 0}
    for index, turn in enumerate(conversation):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"conversation turn {index}: expected {{'from': ..., 'value': ...}}, got {turn!r}")
        role = ROLES.get(turn["from"])
        if role is None:
            raise ValueError(
                f"conversation turn {index}: unknown speaker {turn['from']!r}; expected one of {sorted(ROLES)}"
            )
        pieces = re.split(f"({re.escape(DEFAULT_IMAGE_TOKEN)}|{re.escape(DEFAULT_VIDEO_TOKEN)})", str(turn["value"]))
        if len(pieces) > 1 and role != "user":
            raise ValueError(
                f"conversation turn {index}: a {turn['from']!r} turn holds {pieces[1]}; only human turns show images "
                "and videos"
            )
        parts = []
        for piece in pieces:
            if piece in tags:
                tags[piece] += 1
                parts.append({"type": "image" if piece == DEFAULT_IMAGE_TOKEN else "video"})
            elif piece.strip():
                parts.append({"type": "text", "text": piece.strip()})
        messages.append({"role": role, "content": parts})
    for tag, given, kind in ((DEFAULT_IMAGE_TOKEN, image_count, "image"), (DEFAULT_VIDEO_TOKEN, video_count, "video")):
        if tags[tag] != given:
            raise ValueError(f"the conversation has {tags[tag]} {tag} tag(s) but {given} {kind}(s) were given")
    return messages


class FamilyProcessor:
    """Inputs for one family's checkpoint (see the module docstring); `stock` is transformers' processor when
    it constructs, else None (the fallback)."""

    def __init__(
        self, family: FamilyProcessing, tokenizer, image_processor, settings: dict, chat_template: str, stock=None
    ):
        self.family = family
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.settings = settings
        self.chat_template = chat_template
        self.stock = stock
        attribute, default = family.placeholder
        self.placeholder = getattr(tokenizer, attribute, None) or default
        self.placeholder_id = tokenizer.convert_tokens_to_ids(self.placeholder)
        self.run_ids = set(family.image_run(1, self.placeholder_id, tokenizer))

    def prompt_inputs(self, conversation: Sequence[dict], images: Sequence = (), videos: Sequence[Video] = ()) -> BatchFeature:
        """input_ids, attention_mask and the pixel inputs, batch of one, ending in the generation prompt."""
        messages = chat_messages(conversation, len(images), len(videos))
        if messages[-1]["role"] == "assistant":
            raise ValueError("the conversation ends with a gpt turn: drop it to prompt for the answer")
        return self._encode(self._render(messages, add_generation_prompt=True), images, videos)

    def question_inputs(self, question: str, images: Sequence = (), tagged: bool = False,
                        videos: Sequence[Video] = ()) -> BatchFeature:
        """One question as a human turn (LlavaProcessor's interface): its image's (video's) tag goes first unless
        the question places it; ValueError when the tags and the images (videos) disagree."""
        del tagged  # the question's own tag is kept wherever it stands
        for media, tag in ((videos, DEFAULT_VIDEO_TOKEN), (images, DEFAULT_IMAGE_TOKEN)):
            if media and tag not in question:
                question = f"{tag}\n{question}"
        return self.prompt_inputs([{"from": "human", "value": question}], images, videos)

    def prompt_length(self, inputs: dict) -> int:
        return inputs["input_ids"].shape[-1]  # the image placeholders are expanded already

    def new_tokens(self, sequences: torch.Tensor, batch: dict) -> torch.Tensor:
        """transformers' generate returns the prompt too: the tokens after it."""
        return sequences[:, batch["input_ids"].shape[1] :]

    def training_inputs(self, conversation: Sequence[dict], images: Sequence = ()) -> BatchFeature:
        """prompt_inputs' keys for the whole conversation plus `labels` (same length as input_ids): each
        assistant turn's tokens up to its end-of-turn token, -100 elsewhere (text, images, template)."""
        messages = chat_messages(conversation, len(images))
        text = self._render(messages, add_generation_prompt=False)
        spans = self._assistant_spans(messages, text)
        if not spans:
            raise ValueError("the conversation has no gpt turn: nothing to supervise")
        inputs = self._encode(text, images)
        inputs["labels"] = torch.tensor([self._labels(text, spans, inputs["input_ids"][0].tolist())])
        return inputs

    def collate(self, inputs: Sequence[dict], padding_side: str = "left") -> BatchFeature:
        """One batch: per-token keys padded to the longest sample (left for generation, so every row ends in its
        last prompt token), the pixel inputs concatenated along dim 0 as the family's forward takes them (anyres
        tile stacks padded to the most tiles; the model reads the real count from image_sizes)."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if not inputs:
            raise ValueError("collate needs at least one sample")
        pad_values = dict(
            input_ids=self.tokenizer.pad_token_id, attention_mask=0, labels=IGNORE_INDEX, mm_token_type_ids=0,
            token_type_ids=0,
        )
        width = max(sample["input_ids"].shape[-1] for sample in inputs)
        batch = {}
        for key in dict.fromkeys(key for sample in inputs for key in sample):
            tensors = [sample[key] for sample in inputs if key in sample]
            if key in pad_values:
                if len(tensors) != len(inputs):
                    raise ValueError(f"collate: {key} is missing from some samples")
                batch[key] = torch.cat([_pad_tokens(t, width, pad_values[key], padding_side) for t in tensors])
            else:
                batch[key] = torch.cat([_pad_to(t, tensors) for t in tensors])
        return BatchFeature(batch)

    def save_pretrained(self, folder: str) -> None:
        """Tokenizer, image processor, chat template and processor_config.json (processor class and arguments),
        the files `AutoProcessor.from_pretrained` reads."""
        os.makedirs(folder, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)
        with open(os.path.join(folder, CHAT_TEMPLATE_FILE), "w") as handle:
            handle.write(self.chat_template)
        with open(os.path.join(folder, PROCESSOR_CONFIG_FILE), "w") as handle:
            json.dump({"processor_class": self.family.processor_class, **self.settings}, handle, indent=2)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _assistant_spans(self, messages: list[dict], text: str) -> list[tuple[int, int]]:
        """Character spans of each assistant turn in `text`, the rendered conversation: what follows the
        generation prompt of the turns before it, without the whitespace the template puts before the next turn."""
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._render(messages[:index], add_generation_prompt=True)
            turn = self._render(messages[: index + 1], add_generation_prompt=False)
            if not (turn.startswith(prompt) and text.startswith(turn)):
                raise ValueError(
                    "the chat template does not render a conversation as the prompt of its answer followed by the "
                    f"answer (turn {index}), so the answer's tokens cannot be told apart"
                )
            spans.append((len(prompt), len(prompt) + len(turn[len(prompt) :].rstrip())))
        return spans

    def _add_special_tokens(self, text: str) -> bool:
        """As transformers' processors decide it: a template writing the BOS itself gets none added."""
        bos = self.tokenizer.bos_token
        return not (bos and text.startswith(bos))

    def _encode(self, text: str, images: Sequence, videos: Sequence[Video] = ()) -> BatchFeature:
        add_special_tokens = self._add_special_tokens(text)
        if videos:  # from pre-extracted frames, by our code on every install (transformers' needs torchvision)
            return self._fallback_encode(text, images, add_special_tokens, videos)
        if self.stock is not None:
            return self.stock(
                text=[text], images=[list(images)] if images else None, return_tensors="pt",
                add_special_tokens=add_special_tokens,
            )
        return self._fallback_encode(text, images, add_special_tokens)

    def _fallback_encode(self, text: str, images: Sequence, add_special_tokens: bool, videos: Sequence[Video] = ()) -> BatchFeature:
        """What transformers' processor returns, without it: the text's tokens with each placeholder expanded
        into its image's run (each video's markup into its own text first), the image processor's model inputs and,
        for Qwen, mm_token_type_ids."""
        if self.family.expands_in_text:
            raise ValueError(f"{self.family.processor_class} writes image runs into the text: only it encodes them")
        text, video_inputs = self._expand_videos(text, videos)
        ids = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        inputs = {}
        counts = []
        if images:
            # One sample: a nested list, so families that treat several images of one sample alike (OneVision) do.
            outputs = self.image_processor([list(images)], return_tensors="pt", **self.family.image_kwargs)
            counts = self.family.token_counts(outputs, self.settings, self.image_processor)
            inputs = {key: outputs[key] for key in self.image_processor.model_input_names if key in outputs}
        written = ids.count(self.placeholder_id)
        if written != len(counts):
            raise ValueError(
                f"the chat template wrote {written} image placeholder(s) {self.placeholder!r} for {len(counts)} "
                f"image(s) (does the text itself hold {self.placeholder!r}?)"
            )
        runs = iter(counts)
        expanded = []
        for token in ids:
            is_image = token == self.placeholder_id
            expanded += self.family.image_run(next(runs), token, self.tokenizer) if is_image else [token]
        input_ids = torch.tensor([expanded])
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **inputs, **video_inputs}
        if self.family.token_type_ids is not None:
            inputs["mm_token_type_ids"] = self.family.token_type_ids(input_ids, self.tokenizer)
        return BatchFeature(inputs)

    def _expand_videos(self, text: str, videos: Sequence[Video]) -> tuple[str, dict]:
        """`text` with each video's markup replaced by the family's text for it (its frames' tokens, timestamps
        where the family writes them, in the text as its processor does), and the videos' model inputs."""
        if not videos:
            return text, {}
        if self.family.video_inputs is None:
            raise ValueError(f"{self.family.processor_class}: this family takes no videos")
        pieces = text.split(self.family.video_markup)
        if len(pieces) - 1 != len(videos):
            raise ValueError(f"the chat template wrote {len(pieces) - 1} video markup(s) for {len(videos)} video(s)")
        encoded = [self.family.video_inputs(video, self.image_processor, self.tokenizer) for video in videos]
        expanded = pieces[0] + "".join(run + piece for (run, _), piece in zip(encoded, pieces[1:]))
        keys = dict.fromkeys(key for _, tensors in encoded for key in tensors)
        return expanded, {key: torch.cat([tensors[key] for _, tensors in encoded]) for key in keys}

    def _labels(self, text: str, spans: list[tuple[int, int]], input_ids: list[int]) -> list[int]:
        """Labels for `input_ids` (placeholders expanded): the text's tokens, each kept where it overlaps an
        assistant span, walked alongside input_ids; each placeholder's image run gets -100."""
        encoded = self.tokenizer(text, add_special_tokens=self._add_special_tokens(text), return_offsets_mapping=True)
        labels, position = [], 0
        for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
            if token == self.placeholder_id:
                run_start = position
                while position < len(input_ids) and input_ids[position] in self.run_ids:
                    position += 1
                labels += [IGNORE_INDEX] * (position - run_start)
                continue
            if position >= len(input_ids) or input_ids[position] != token:
                raise ValueError(f"input_ids differ from the text's tokens outside the image runs at {position}")
            supervised = end > start and any(start < span_end and end > span_start for span_start, span_end in spans)
            labels.append(token if supervised else IGNORE_INDEX)
            position += 1
        if position != len(input_ids):
            raise ValueError(f"input_ids hold {len(input_ids) - position} token(s) beyond the text and its image runs")
        return labels


def _pad_tokens(tensor: torch.Tensor, width: int, value: int, side: str) -> torch.Tensor:
    missing = width - tensor.shape[-1]
    return torch.nn.functional.pad(tensor, (missing, 0) if side == "left" else (0, missing), value=value)


def _pad_to(tensor: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """`tensor` zero-padded at the end of every dim but the first to the largest of `tensors` (only anyres tile
    stacks differ there)."""
    padding = []
    for dim in range(tensor.dim() - 1, 0, -1):
        padding += [0, max(t.shape[dim] for t in tensors) - tensor.shape[dim]]
    return torch.nn.functional.pad(tensor, padding) if any(padding) else tensor


def family_module(config_dict: dict) -> ModuleType | None:
    """The family file (llava.model.families: its ADAPTER and PROCESSING) of the registered class config.json
    names, None for any other checkpoint."""
    from llava.model.families import FAMILY_MODULES  # the family files import this module

    by_class = {module.ADAPTER.model_class.__name__: module for module in FAMILY_MODULES.values()}
    return next((by_class[name] for name in config_dict.get("architectures") or () if name in by_class), None)


def load_processor(model_path: str) -> FamilyProcessor:
    """The FamilyProcessor of a family checkpoint folder (config.json naming a registered family class)."""
    config_dict = _read_json(os.path.join(model_path, "config.json"))
    if config_dict is None:
        raise ValueError(f"{model_path}: no config.json here, not a checkpoint folder")
    module = family_module(config_dict)
    if module is None:
        names = config_dict.get("architectures")
        raise ValueError(f"{model_path}: config.json names {names}, not one of the VLM families")
    family = module.PROCESSING
    saved = _read_json(os.path.join(model_path, PROCESSOR_CONFIG_FILE)) or {}
    settings = {**family.settings_for(AutoConfig.from_pretrained(model_path)), **_processor_arguments(saved)}
    try:
        stock = AutoProcessor.from_pretrained(model_path)
    except (ImportError, AttributeError, TypeError, ValueError, OSError) as error:
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        if family.expands_in_text:
            raise ValueError(f"{model_path}: {family.processor_class} does not construct ({reason}), and its image "
                             "runs are written into the text, which only it reproduces") from error
        logger.info("%s: transformers' processor does not construct here (%s); using the fallback", model_path, reason)
        stock = None
    tokenizer = stock.tokenizer if stock is not None else AutoTokenizer.from_pretrained(model_path)
    image_processor = stock.image_processor if stock is not None else _load_image_processor(model_path, saved)
    template = getattr(stock, "chat_template", None) or _saved_chat_template(model_path, saved, tokenizer)
    return FamilyProcessor(family, tokenizer, image_processor, settings, template, stock)


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None


def _processor_arguments(saved: dict) -> dict:
    """processor_config.json without what is not an argument of the processor itself (its class, template, and
    the sub-processors' configs that transformers nests there)."""
    return {k: v for k, v in saved.items() if k not in ("processor_class", "chat_template") and not isinstance(v, dict)}


def _load_image_processor(model_path: str, saved: dict):
    """The saved image processor, as its Pillow class: without torchvision the default classes do not construct
    (on transformers 5.17 not even AutoImageProcessor)."""
    config = saved.get("image_processor") or _read_json(os.path.join(model_path, "preprocessor_config.json"))
    if not config or "image_processor_type" not in config:
        raise ValueError(f"{model_path}: no image processor saved (preprocessor_config.json or processor_config.json)")
    name = config["image_processor_type"].removesuffix("Fast")
    image_processor_class = getattr(transformers, name + "Pil", None) or getattr(transformers, name)
    return image_processor_class.from_pretrained(model_path)


def _saved_chat_template(model_path: str, saved: dict, tokenizer) -> str:
    """The processor's template (its own file, chat_template.json of older saves, processor_config.json), else
    the tokenizer's."""
    path = os.path.join(model_path, CHAT_TEMPLATE_FILE)
    if os.path.isfile(path):
        with open(path) as handle:
            return handle.read()
    older = _read_json(os.path.join(model_path, "chat_template.json")) or {}
    template = older.get("chat_template") or saved.get("chat_template") or tokenizer.chat_template
    if not template:
        raise ValueError(
            f"{model_path}: no chat template saved ({CHAT_TEMPLATE_FILE}, chat_template.json or the tokenizer's)"
        )
    return template
