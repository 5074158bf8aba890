"""`load_pretrained_model`: LLaVA's loader, for original LLaVA and llava-hf checkpoints alike."""

from __future__ import annotations

import json
import logging
import os

import torch
from safetensors import safe_open
from transformers import AutoTokenizer, CLIPVisionConfig

from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN
from llava.model.gates_artifact import load_gates, read_gates_config
from llava.model.hf_layout import HF_CHECKPOINT_TO_LLAVA, is_hf_layout, llava_config_from_hf
from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
from llava.model.multimodal_encoder.clip_encoder import VisionTowerNotFoundError, load_image_processor

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT_LEN = 2048
GATE_KEY = "model.visual_gates_router.0.w1.weight"


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
    """Load tokenizer, model (our `LlavaLlamaForCausalLM`), image processor and context length.

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

    gates_path = model_path
    config, config_dict, model_path = read_llava_config(model_path)
    gates_only = model_path != gates_path
    if is_hf_layout(config_dict):
        load_kwargs["key_mapping"] = HF_CHECKPOINT_TO_LLAVA
    weights_path = model_base or model_path
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
    """G of `model.visual_gates_router.0.w1.weight` (G x 2H) if the checkpoint holds gates, else None."""
    key = GATE_KEY
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = os.path.join(model_path, index_name)
        if os.path.isfile(index_path):
            with open(index_path) as handle:
                shard = json.load(handle)["weight_map"].get(key)
            return None if shard is None else _tensor_rows(os.path.join(model_path, shard), key)
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = os.path.join(model_path, name)
        if os.path.isfile(path):
            return _tensor_rows(path, key)
    return None


def _tensor_rows(path: str, key: str) -> int | None:
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as handle:
            return handle.get_slice(key).get_shape()[0] if key in handle.keys() else None
    weights = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
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
