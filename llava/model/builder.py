"""`load_pretrained_model`: LLaVA's loader, for original LLaVA and llava-hf checkpoints alike, and for checkpoints
of the other VLM families the visual exit runs on (Qwen2-VL, Qwen2.5-VL, LLaVA-NeXT, OneVision, InternVL)."""

from __future__ import annotations

import json
import logging
import os

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, CLIPVisionConfig

from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN
from llava.model.families.processing import family_module, load_processor
from llava.model.gates_artifact import load_gates, read_gates_config
from llava.model.hf_layout import HF_CHECKPOINT_TO_LLAVA, is_hf_layout, llava_config_from_hf
from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
from llava.model.multimodal_encoder.clip_encoder import VisionTowerNotFoundError, load_image_processor
from llava.model.visual_exit import enable_visual_exit, exit_decoder_of
from llava.model.visual_exit.vlm import FAMILIES, visual_exit_class

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT_LEN = 2048
# The first gate's first weight, under whatever prefix the checkpoint's layout puts the decoder.
GATE_KEY_SUFFIX = "visual_gates_router.0.w1.weight"


class CheckpointError(ValueError):
    """A checkpoint folder cannot be loaded; the message names the folder."""


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
    """Our config for either layout. Original LLaVA configs say model_type "llava" (transformers' own llava
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


def load_pretrained_model(
    model_path: str,
    model_base: str | None = None,
    model_name: str | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    device_map: str | dict | None = "auto",
    device: str | None = None,
    use_flash_attn: bool = False,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
):
    """`(tokenizer, model, processor, context_len)`.

    LLaVA checkpoints (original and llava-hf layouts): `model` is our `LlavaLlamaForCausalLM` and `processor` its
    image processor (for `process_images`). A checkpoint of another VLM family (config.json naming e.g.
    `Qwen2VLForConditionalGeneration`; see `family_class`): `model` is transformers' own class with the visual exit
    (`visual_exit_class`, gates loaded when saved) and `processor` a `FamilyProcessor`, which builds its inputs from
    LLaVA conversations (llava.model.families.processing); `tokenizer` is the processor's.

    `model_base` with a projector-only checkpoint (`mm_projector.bin`) takes the LLM from the base, as LLaVA does.
    A gates-only artifact (`visual_gates.json`) loads its base checkpoint plus the trained gates.
    `device` defaults to CUDA when present, else CPU; `dtype` to fp16 on CUDA, fp32 on CPU.
    """
    del model_name  # LLaVA dispatches on the name; here the config says which layout a checkpoint has
    device = resolve_device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    if use_flash_attn:
        attn_implementation = "flash_attention_2"
    load_kwargs = {"dtype": dtype, "attn_implementation": attn_implementation}
    load_kwargs["device_map"] = device_map if device.type == "cuda" else {"": str(device)}
    if load_8bit or load_4bit:
        load_kwargs["quantization_config"] = _quantization_config(load_8bit, dtype)

    family_path = family_checkpoint(model_path)
    if family_path is not None:
        if model_base is not None:
            raise CheckpointError(f"{model_path}: model_base is for LLaVA projector checkpoints, not VLM families")
        loaded = load_family_model(family_path, **load_kwargs)
        if family_path != model_path:
            _load_gates_artifact(loaded[1], model_path)
        return loaded

    gates_path = model_path
    config, config_dict, model_path = read_llava_config(model_path)
    gates_only = model_path != gates_path
    if is_hf_layout(config_dict):
        load_kwargs["key_mapping"] = HF_CHECKPOINT_TO_LLAVA
    weights_path = model_base or model_path
    require_tokenizer(weights_path)
    tokenizer = AutoTokenizer.from_pretrained(weights_path)
    model = LlavaLlamaForCausalLM.from_pretrained(weights_path, config=config, **load_kwargs)
    if model_base is not None:
        _load_projector(model, model_path)
    if gates_only:
        load_gates(model, gates_path)

    _add_mm_tokens(model, tokenizer)
    tower = model.get_vision_tower()
    if not tower.is_loaded:
        tower.load_model(dtype=dtype, device=model.device)
    image_processor = tower.image_processor or load_image_processor(tower.vision_tower_name or model_path)
    context_len = getattr(model.config, "max_sequence_length", None) or getattr(
        model.config, "max_position_embeddings", DEFAULT_CONTEXT_LEN
    )
    return tokenizer, model, image_processor, context_len


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken", "spiece.model", "vocab.txt")


def require_tokenizer(folder: str) -> None:
    """A checkpoint's tokenizer must be in its folder: without its files transformers may build an empty one."""
    if not any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): copy them from the model it "
            "was trained from"
        )


def registered_family_class(config_dict: dict) -> type | None:
    """The registered VLM class (llava.model.families) that config.json names, or None."""
    module = family_module(config_dict)
    return None if module is None else module.ADAPTER.model_class


def family_class(config_dict: dict) -> type | None:
    """The VLM class `load_pretrained_model` loads a checkpoint into through the family path: a registered one,
    unless our LLaVA class loads that layout (hf_layout decides: llava-hf LLaVA-1.5, and what else it maps)."""
    if is_hf_layout({"architectures": config_dict.get("architectures") or []}):
        return None
    return registered_family_class(config_dict)


def family_checkpoint(model_path: str) -> str | None:
    """The folder of the VLM-family checkpoint `model_path` is (itself) or builds on (a gates-only artifact's
    base); None for LLaVA checkpoints."""
    artifact = read_gates_config(model_path)
    base = artifact["base_model"] if artifact is not None else model_path
    return base if family_class(read_config_dict(base)) is not None else None


def read_family_decoder_config(model_path: str):
    """The decoder (text) config of a VLM-family checkpoint, the gates' width of an artifact on it included — what
    the exit settings and their checks read before any weights load; None for LLaVA checkpoints."""
    family_path = family_checkpoint(model_path)
    if family_path is None:
        return None
    config = AutoConfig.from_pretrained(family_path).get_text_config()
    artifact = read_gates_config(model_path)
    if artifact is not None:
        config.visual_gate_hidden_size = artifact["visual_gate_hidden_size"]
    return config


def _load_gates_artifact(model, gates_path: str) -> None:
    """An artifact's gates into a family model, replacing any gates it was saved with."""
    width = read_gates_config(gates_path)["visual_gate_hidden_size"]
    if getattr(exit_decoder_of(model).config, "visual_gate_hidden_size", None) != width:
        enable_visual_exit(model, gate_hidden_size=width)
    load_gates(model, gates_path)


def load_family_model(model_path: str, **from_pretrained_kwargs):
    """`(tokenizer, model, processor, context_len)` of a checkpoint of a registered VLM family (llava-hf ones
    too): transformers' own class with the visual exit, its gates loaded when the checkpoint holds them, and the
    family's `FamilyProcessor`. Keyword arguments go to `from_pretrained` (dtype, attn_implementation,
    device_map, ...)."""
    config_dict = read_config_dict(model_path)
    model_class = registered_family_class(config_dict)
    if model_class is None:
        known = ", ".join(sorted(cls.__name__ for cls in FAMILIES))
        raise CheckpointError(f"{model_path}: config.json names {config_dict.get('architectures')}, none of {known}")
    require_tokenizer(model_path)
    processor = load_processor(model_path)
    model = visual_exit_class(model_class).from_pretrained(model_path, **from_pretrained_kwargs)
    text_config = model.config.get_text_config()
    context_len = getattr(text_config, "max_position_embeddings", None) or DEFAULT_CONTEXT_LEN
    return processor.tokenizer, model, processor, context_len


def resolve_device(device: str | None) -> torch.device:
    """The device asked for (default: CUDA when present, else CPU); CUDA without a CUDA device is an error,
    never a silent run elsewhere."""
    resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA device here")
    return resolved


def read_llava_config(model_path: str) -> tuple[LlavaConfig, dict, str]:
    """The model's config without loading weights: (config, its raw dict, the folder holding the weights).

    For a gates-only artifact the weights are its base checkpoint's and the config is the base's with the gates'
    width; a checkpoint whose config does not name its gates' width gets it from the weights (reference-trained
    checkpoints)."""
    gates_only = read_gates_config(model_path)
    if gates_only is not None:
        model_path = gates_only["base_model"]
    config_dict = read_config_dict(model_path)
    config = llava_config_from_dict(config_dict, model_path)
    if gates_only is not None:
        config.visual_gate_hidden_size = gates_only["visual_gate_hidden_size"]
    elif not getattr(config, "visual_gate_hidden_size", None):
        config.visual_gate_hidden_size = gate_width_in_checkpoint(model_path)
    return config, config_dict, model_path


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


def _quantization_config(load_8bit: bool, dtype: torch.dtype):
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ImportError("--load-8bit/--load-4bit need bitsandbytes: pip install bitsandbytes") from None
    if load_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4"
    )


def _load_projector(model: LlavaLlamaForCausalLM, model_path: str) -> None:
    path = os.path.join(model_path, "mm_projector.bin")
    if not os.path.isfile(path):
        raise CheckpointError(f"{model_path}: model_base given but no mm_projector.bin here")
    weights = torch.load(path, map_location="cpu", weights_only=True)
    weights = {k.split("mm_projector.", 1)[1]: v.to(model.dtype) for k, v in weights.items()}
    model.get_model().mm_projector.load_state_dict(weights)


def _add_mm_tokens(model: LlavaLlamaForCausalLM, tokenizer) -> None:
    """LLaVA's optional patch/start/end tokens (all off for LLaVA-1.5; the patch flag defaults to on)."""
    if getattr(model.config, "mm_use_im_patch_token", True):
        tokenizer.add_tokens([DEFAULT_IMAGE_PATCH_TOKEN], special_tokens=True)
    if getattr(model.config, "mm_use_im_start_end", False):
        tokenizer.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
