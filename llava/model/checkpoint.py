"""What a checkpoint folder is, read once from its files before any weights load: `Checkpoint.resolve(path)`.

One rule says which class runs it:
- `llava`: LLaVA's own layout (`LlavaLlamaForCausalLM`, model_type "llava" with `mm_vision_tower`) → our LLaVA class,
  prompted by LLaVA's conversation templates;
- `llava-hf`: a layout our class reads through `hf_layout` (llava-hf LLaVA-1.5) → our LLaVA class as well, token-exact
  with LLaVA's; its files stay in transformers' layout (init_weight.py saves them so);
- `family`: any other VLM class registered in llava.model.families → transformers' own class with the exit,
  prompted by the checkpoint's own chat template.
A gates-only artifact (`visual_gates.json`) is its base checkpoint's kind, with its gates on top.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property

import torch
from safetensors import safe_open
from transformers import AutoConfig, CLIPVisionConfig

from llava.conversation import choose_conv_mode
from llava.mm_utils import get_model_name_from_path
from llava.model.families.processing import family_module, load_processor
from llava.model.gates_artifact import read_gates_config
from llava.model.hf_layout import is_hf_layout, llava_config_from_hf
from llava.model.multimodal_encoder.clip_text import TextTowerNotFoundError, check_text_tower
from llava.model.language_model.llava_llama import LlavaConfig
from llava.model.multimodal_encoder.clip_encoder import VisionTowerNotFoundError
from llava.model.visual_exit import ExitConfig, ExitRequest
from llava.model.visual_exit.vlm import FAMILIES

KINDS = ("llava", "llava-hf", "family")
# The first gate's first weight, under whatever prefix the checkpoint's layout puts the decoder.
GATE_KEY_SUFFIX = "visual_gates_router.0.w1.weight"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken", "spiece.model", "vocab.txt")


class CheckpointError(ValueError):
    """A checkpoint folder cannot be loaded; the message names the folder."""


@dataclass(frozen=True)
class Checkpoint:
    """`path` as named; `weights`, the folder whose weights load (an artifact's base, else `path`); `kind` (see the
    module docstring); `config`, what the exit settings are checked against — our LlavaConfig, or a family's text
    config — with the gates' width, artifact's included; `gates`, the artifact folder of a gates-only checkpoint."""

    path: str
    weights: str
    kind: str
    config: object
    raw_config: dict
    model_base: str | None = None
    gates: str | None = None

    @classmethod
    def resolve(cls, path: str, model_base: str | None = None) -> Checkpoint:
        artifact = read_gates_config(path)
        weights = artifact["base_model"] if artifact is not None else path
        raw = read_config_dict(weights)
        if is_hf_layout({"architectures": raw.get("architectures") or []}) or family_module(raw) is None:
            config = llava_config_from_dict(raw, weights)
            kind = "llava-hf" if is_hf_layout(raw) else "llava"
        else:
            if model_base is not None:
                raise CheckpointError(f"{path}: model_base is for LLaVA projector checkpoints, not VLM families")
            config = AutoConfig.from_pretrained(weights).get_text_config()
            kind = "family"
        if artifact is not None:
            config.visual_gate_hidden_size = artifact["visual_gate_hidden_size"]
            if artifact.get("input_reduction"):  # gates trained after a reduction decide after it by default
                threshold = ExitRequest.from_model_config(config).threshold
                ExitRequest("stages", stages=f"{artifact['input_reduction']},gates:{threshold:g}").save_to(config)
        elif kind != "family" and not getattr(config, "visual_gate_hidden_size", None):
            config.visual_gate_hidden_size = gate_width_in_checkpoint(weights)  # reference-trained checkpoints
        return cls(path, weights, kind, config, raw, model_base, path if artifact is not None else None)

    @property
    def name(self) -> str:
        """LLaVA's model name (the folder's, or `<run>_<checkpoint-N>`), the answers' `model_id`."""
        return get_model_name_from_path(self.path)

    @property
    def is_family(self) -> bool:
        return self.kind == "family"

    @property
    def layout_class(self) -> type | None:
        """transformers' class whose layout the files hold (llava-hf included), None for LLaVA's own layout."""
        module = family_module(self.raw_config)
        return None if module is None else module.ADAPTER.model_class

    @property
    def has_gates(self) -> bool:
        return bool(getattr(self.config, "visual_gate_hidden_size", None))

    @property
    def exit_defaults(self) -> ExitRequest:
        """The exit the checkpoint saved (mode none when it saved none)."""
        return ExitRequest.from_model_config(self.config)

    @cached_property
    def family_processor(self):
        """A family checkpoint's FamilyProcessor (its tokenizer, image processor and chat template)."""
        return load_processor(self.weights)

    def template(self, conv_mode: str | None = None) -> tuple[str, str]:
        """(the template it prompts with, why). LLaVA kinds: `conv_mode` if given, else the one saved, else LLaVA's
        folder-name rule. A family prompts with its own chat template, named by a digest of its text so that answers
        made under another template are never resumed; `conv_mode` is refused there."""
        if not self.is_family:
            return choose_conv_mode(conv_mode, self.config, self.name)
        if conv_mode is not None:
            raise ValueError(f"--conv-mode {conv_mode}: {self.path} prompts with its own chat template")
        digest = hashlib.sha256(self.family_processor.chat_template.encode()).hexdigest()[:12]
        return f"chat_template:{digest}", "the checkpoint's own chat template"

    def check_exit(self, exit_config: ExitConfig) -> None:
        """ValueError when `exit_config` cannot run on this checkpoint (its depth, its gates, its image sizes)."""
        exit_config.check_model(self.config.num_hidden_layers, self.has_gates)
        stage = exit_config.vision_stage
        if stage is not None and stage.before_processor and self.kind in ("llava", "llava-hf"):
            raise ValueError(f"{stage.usage} gives a smaller image, but LLaVA-1.5 resizes every image to its tower's "
                             "size: the same tokens; pool its grid with downsample:S instead")
        if stage is not None and stage.reads_instruction:
            if self.is_family:
                raise ValueError(f"{stage.usage} ranks image tokens with CLIP's text tower beside a CLIP vision tower: "
                                 "our LLaVA class only (its official code is LLaVA-only); use divprune or visionzip here")
            try:
                check_text_tower(getattr(self.config, "mm_vision_tower", None))
            except TextTowerNotFoundError as error:
                raise ValueError(str(error)) from None


def read_config_dict(model_path: str) -> dict:
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{model_path}: no config.json here, not a checkpoint folder")
    with open(path) as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None


def llava_config_from_dict(config_dict: dict, model_path: str) -> LlavaConfig:
    """Our config for either LLaVA layout. Original LLaVA configs say model_type "llava" (transformers' own llava
    type), so the dict is read with our class explicitly, never through AutoConfig."""
    if is_hf_layout(config_dict):
        return llava_config_from_hf(config_dict)
    architectures = config_dict.get("architectures") or []
    if architectures and not any(name.startswith("Llava") for name in architectures):
        known = ", ".join(sorted(cls.__name__ for cls in FAMILIES))
        raise CheckpointError(
            f"{model_path}: config.json names {', '.join(architectures)}: neither a LLaVA checkpoint nor a VLM "
            f"family the exit runs on ({known})"
        )
    config = LlavaConfig.from_dict({k: v for k, v in config_dict.items() if k != "model_type"})
    tower = getattr(config, "mm_vision_tower", None)
    if tower is None and getattr(config, "mm_vision_config", None) is None:
        raise CheckpointError(f"{model_path}: config.json has no mm_vision_tower, not a LLaVA checkpoint")
    # A relative tower path that does not exist from here is read relative to the checkpoint folder.
    if tower and not os.path.isabs(tower) and not os.path.exists(tower):
        local = os.path.join(model_path, tower)
        if os.path.exists(local):
            config.mm_vision_tower = os.path.abspath(local)
    # LLaVA builds a tower it trained (llava-v1.6 sets unfreeze_mm_vision_tower) before it reads the shards, so the
    # shards' tuned tower weights replace the folder's: the tower takes the folder's config and the shards' weights.
    if getattr(config, "unfreeze_mm_vision_tower", False) and getattr(config, "mm_vision_config", None) is None:
        if not os.path.isfile(os.path.join(config.mm_vision_tower, "config.json")):
            raise VisionTowerNotFoundError(
                f"{config.mm_vision_tower}: no config.json (the CLIP tower that mm_vision_tower names)"
            )
        config.mm_vision_config = CLIPVisionConfig.from_pretrained(config.mm_vision_tower).to_dict()
    return config


def require_tokenizer(folder: str) -> None:
    """A checkpoint's tokenizer must be in its folder: without its files transformers may build an empty one."""
    if not any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): copy them from the model it "
            "was trained from"
        )


def gate_width_in_checkpoint(model_path: str) -> int | None:
    """G of the first gate's `w1` (G x 2H) if the checkpoint holds gates, else None; found by its name's end,
    since each layout puts the decoder under its own prefix (`model.`, `language_model.model.`, ...)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = os.path.join(model_path, index_name)
        if os.path.isfile(index_path):
            with open(index_path) as handle:
                weight_map = json.load(handle)["weight_map"]
            key = _gate_key(weight_map)
            return None if key is None else _tensor_rows(os.path.join(model_path, weight_map[key]), key)
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = os.path.join(model_path, name)
        if os.path.isfile(path):
            return _tensor_rows(path)
    return None


def _gate_key(keys) -> str | None:
    return next((key for key in keys if key.endswith(GATE_KEY_SUFFIX)), None)


def _tensor_rows(path: str, key: str | None = None) -> int | None:
    """Rows of tensor `key` (default: the gate key the file holds) in one weights file, None if absent."""
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as handle:
            key = key or _gate_key(handle.keys())
            return handle.get_slice(key).get_shape()[0] if key in handle.keys() else None
    weights = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    key = key or _gate_key(weights)
    return weights[key].shape[0] if key in weights else None
