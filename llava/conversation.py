"""Conversation templates that turn chat turns into LLaVA prompt strings.

Behaviour follows LLaVA-1.5's templates byte for byte (see LLAVA_FORMATS.md, section 2).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

from llava.constants import DEFAULT_IMAGE_TOKEN

# A turn's text: a string, None ("generate here"), or a web-UI tuple (text, image, mode).
Message = str | tuple[Any, ...] | None


class SeparatorStyle(Enum):
    """How turns are joined into a prompt."""

    SINGLE = auto()
    TWO = auto()
    MPT = auto()
    PLAIN = auto()
    LLAMA_2 = auto()


@dataclass
class Conversation:
    """A template plus the turns appended to it."""

    system: str
    roles: tuple[str, str]
    messages: list[list[Any]] = field(default_factory=list)
    offset: int = 0
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: str | None = None
    version: str = "Unknown"

    def append_message(self, role: str, message: Message) -> None:
        """Add a turn; a message of None marks where the model should answer."""
        self.messages.append([role, message])

    @property
    def stop_str(self) -> str | None:
        """The string that ends an assistant answer (used by the CLI to stop generation)."""
        return self.sep2 if self.sep_style is SeparatorStyle.TWO else self.sep

    def get_prompt(self) -> str:
        """Render the system text and all turns as one prompt string."""
        messages = self._text_messages()
        if self.sep_style is SeparatorStyle.LLAMA_2:
            return self._llama_2_prompt(messages)
        return self._flat_prompt(messages)

    def copy(self) -> Conversation:
        """A copy whose turn list can be changed without touching this one."""
        return dataclasses.replace(self, messages=[[role, msg] for role, msg in self.messages])

    def dict(self) -> dict[str, Any]:
        """A plain serialisable view (tuple messages reduced to their text)."""
        return {
            "system": self.system,
            "roles": self.roles,
            "messages": [[role, _text(msg)] for role, msg in self.messages],
            "offset": self.offset,
            "sep": self.sep,
            "sep2": self.sep2,
        }

    def _text_messages(self) -> list[tuple[str, str | None]]:
        messages = [(role, _text(msg)) for role, msg in self.messages]
        if not messages or not isinstance(self.messages[0][1], tuple):
            return messages
        # A web-UI image turn: the marker may sit anywhere in the text, so move it to the front.
        role, text = messages[0]
        text = (text or "").replace(DEFAULT_IMAGE_TOKEN, "").strip()
        if "mmtag" in self.version:
            messages[0:1] = [
                (self.roles[0], "<Image>" + DEFAULT_IMAGE_TOKEN + "</Image>"),
                (self.roles[1], "Received."),
                (role, text),
            ]
        else:
            messages[0] = (role, DEFAULT_IMAGE_TOKEN + "\n" + text)
        return messages

    def _flat_prompt(self, messages: list[tuple[str, str | None]]) -> str:
        """SINGLE, TWO, MPT and PLAIN: a header, then one chunk per turn."""
        style = self.sep_style
        plain = style is SeparatorStyle.PLAIN
        colon = ":" if style in (SeparatorStyle.SINGLE, SeparatorStyle.TWO) else ""
        # TWO and PLAIN close user turns with sep and assistant turns with sep2; the others always use sep.
        alternating = style in (SeparatorStyle.TWO, SeparatorStyle.PLAIN)
        parts = [self.system if plain else self.system + self.sep]
        for i, (role, text) in enumerate(messages):
            head = "" if plain else role + colon
            if not text:
                parts.append(head)
                continue
            sep = self.sep2 if alternating and i % 2 else self.sep
            if sep is None:
                raise ValueError(f"{style.name} template has no separator for turn {i} (sep2 is None)")
            parts.append(head + (" " if colon else "") + text + sep)
        return "".join(parts)

    def _llama_2_prompt(self, messages: list[tuple[str, str | None]]) -> str:
        if messages and (not messages[0][1] or messages[0][0] != self.roles[0]):
            raise ValueError("a LLAMA_2 prompt must start with a non-empty user turn")
        out = ""
        for i, (_, text) in enumerate(messages):
            if not text:
                continue
            if i == 0 and self.system:
                text = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n{text}"
            if i % 2 == 0:
                out += f"{self.sep}[INST] {text} [/INST]"
            else:
                out += f" {text} {self.sep2}"
        # Character-set strip, as in the reference: drops the leading "<s>" of the first turn.
        return out.lstrip(self.sep)


def _text(message: Message) -> str | None:
    return message[0] if isinstance(message, tuple) else message


_HUMAN_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_MMTAG_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant is able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
    "The visual content will be provided with the following format: <Image>visual content</Image>."
)
_LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)
_USER_ASSISTANT = ("USER", "ASSISTANT")
_CHATML_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")

conv_vicuna_v0 = Conversation(
    system=_HUMAN_SYSTEM,
    roles=("Human", "Assistant"),
    messages=[
        ["Human", "How do renewable and non-renewable energy sources differ?"],
        [
            "Assistant",
            "Renewable sources such as sunlight, wind and flowing water are replenished naturally and "
            "pollute little, while non-renewable ones such as coal, oil and gas exist in finite amounts, "
            "take millions of years to form and release greenhouse gases when burned.",
        ],
    ],
    offset=2,
)
conv_vicuna_v1 = Conversation(
    system=(
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
    roles=_USER_ASSISTANT,
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
    version="v1",
)
conv_llama_2 = Conversation(
    system=_LLAMA_2_SYSTEM,
    roles=_USER_ASSISTANT,
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
    version="llama_v2",
)
conv_llava_llama_2 = Conversation(
    system=(
        "You are a helpful language and vision assistant. You are able to understand the visual content "
        "that the user provides, and assist the user with a variety of tasks using natural language."
    ),
    roles=_USER_ASSISTANT,
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
    version="llama_v2",
)
conv_mistral_instruct = Conversation(
    system="",
    roles=_USER_ASSISTANT,
    sep_style=SeparatorStyle.LLAMA_2,
    sep="",
    sep2="</s>",
    version="llama_v2",
)
conv_chatml_direct = Conversation(
    system="<|im_start|>system\nAnswer the questions.",
    roles=_CHATML_ROLES,
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
    version="mpt",
)
conv_mpt = Conversation(
    system=(
        "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
        "The assistant gives helpful and honest answers."
    ),
    roles=_CHATML_ROLES,
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
    version="mpt",
)
conv_llava_plain = Conversation(system="", roles=("", ""), sep_style=SeparatorStyle.PLAIN, sep="\n")
conv_llava_v0 = Conversation(system=_HUMAN_SYSTEM, roles=("Human", "Assistant"))
conv_llava_v0_mmtag = Conversation(system=_MMTAG_SYSTEM, roles=("Human", "Assistant"), version="v0_mmtag")
conv_llava_v1 = Conversation(
    system=_HUMAN_SYSTEM,
    roles=_USER_ASSISTANT,
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
    version="v1",
)
conv_llava_v1_mmtag = dataclasses.replace(conv_llava_v1, system=_MMTAG_SYSTEM, version="v1_mmtag", messages=[])

default_conversation = conv_vicuna_v1

conv_templates: dict[str, Conversation] = {
    "default": conv_vicuna_v0,
    "v0": conv_vicuna_v0,
    "v1": conv_vicuna_v1,
    "vicuna_v1": conv_vicuna_v1,
    "llama_2": conv_llama_2,
    "mistral_instruct": conv_mistral_instruct,
    "chatml_direct": conv_chatml_direct,
    "mistral_direct": conv_chatml_direct,
    "plain": conv_llava_plain,
    "v0_plain": conv_llava_plain,
    "llava_v0": conv_llava_v0,
    "v0_mmtag": conv_llava_v0_mmtag,
    "llava_v1": conv_llava_v1,
    "v1_mmtag": conv_llava_v1_mmtag,
    "llava_llama_2": conv_llava_llama_2,
    "mpt": conv_mpt,
}


def infer_conv_mode(model_name: str) -> str:
    """LLaVA's rule for checkpoints that do not say: pick the template from the model's folder name."""
    name = model_name.lower()
    for marker, mode in (("llama-2", "llava_llama_2"), ("mistral", "mistral_instruct"), ("v1.6-34b", "chatml_direct")):
        if marker in name:
            return mode
    if "v1" in name:
        return "llava_v1"
    return "mpt" if "mpt" in name else "llava_v0"


def choose_conv_mode(requested: str | None, model_config, model_name: str) -> tuple[str, str]:
    """The template to prompt with, and why: `--conv-mode` if given, else the one the checkpoint saved
    (`conv_mode` in its config, written by our tools), else LLaVA's folder-name rule for foreign checkpoints."""
    if requested:
        mode, reason = requested, "given with --conv-mode"
    elif getattr(model_config, "conv_mode", None):
        mode, reason = model_config.conv_mode, "saved in the checkpoint's config"
    else:
        mode = infer_conv_mode(model_name)
        reason = f"the checkpoint saves none: LLaVA's rule for the folder name {model_name!r}"
    get_conv_template(mode)  # an unknown name fails here, before any model work
    return mode, reason


def get_conv_template(name: str) -> Conversation:
    """A fresh copy of the named template."""
    try:
        return conv_templates[name].copy()
    except KeyError:
        raise ValueError(f"unknown conv mode {name!r}; known: {', '.join(conv_templates)}") from None
