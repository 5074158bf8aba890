"""Loading a resolved checkpoint (llava.model.checkpoint): `load_model(Checkpoint.resolve(path))` gives a
`LoadedModel` — the model with the exit, its tokenizer, its question processor, its context length — for LLaVA's
layouts (our `LlavaLlamaForCausalLM`) and the other VLM families (transformers' own classes) alike.
`load_pretrained_model` is LLaVA's function of that name, its four-tuple included, on top."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer

from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN
from llava.model.checkpoint import Checkpoint, CheckpointError, read_config_dict, require_tokenizer
from llava.model.families.processing import FamilyProcessor, family_module, load_processor
from llava.model.gates_artifact import load_gates, read_gates_config
from llava.model.hf_layout import HF_CHECKPOINT_TO_LLAVA
from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
from llava.model.llava_processor import LlavaProcessor
from llava.model.multimodal_encoder.clip_encoder import load_image_processor
from llava.model.visual_exit import enable_visual_exit, exit_decoder_of
from llava.model.visual_exit.vlm import FAMILIES, visual_exit_class

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT_LEN = 2048


@dataclass
class LoadedModel:
    """A checkpoint's model, ready to answer. `image_processor`: LLaVA's tower image processor (what
    `process_images` takes), or a family's FamilyProcessor."""

    checkpoint: Checkpoint
    model: torch.nn.Module
    tokenizer: object
    image_processor: object
    context_len: int

    def processor(self, template: str) -> LlavaProcessor | FamilyProcessor:
        """The question processor for prompts in `template` (`Checkpoint.template`): one interface for both kinds."""
        if isinstance(self.image_processor, FamilyProcessor):
            return self.image_processor  # its own chat template
        visual_tokens = self.model.get_vision_tower().num_patches
        return LlavaProcessor(self.tokenizer, self.image_processor, self.model.config, template, visual_tokens)

    def as_tuple(self) -> tuple:
        """LLaVA's `(tokenizer, model, image_processor, context_len)`."""
        return self.tokenizer, self.model, self.image_processor, self.context_len


def load_model(
    checkpoint: Checkpoint,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict | None = "auto",
    load_8bit: bool = False,
    load_4bit: bool = False,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """LLaVA kinds: our `LlavaLlamaForCausalLM` (llava-hf weights mapped into it); `model_base` with a projector-only
    checkpoint (`mm_projector.bin`) takes the LLM from the base, as LLaVA does. A family: transformers' own class with
    the visual exit, gates loaded when saved. A gates-only artifact: its base plus its gates. `device` defaults to
    CUDA when present, else CPU; `dtype` to fp16 on CUDA, fp32 on CPU."""
    device = resolve_device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    load_kwargs = {"dtype": dtype, "attn_implementation": attn_implementation}
    load_kwargs["device_map"] = device_map if device.type == "cuda" else {"": str(device)}
    if load_8bit or load_4bit:
        load_kwargs["quantization_config"] = _quantization_config(load_8bit, dtype)
    if checkpoint.is_family:
        tokenizer, model, processor, context_len = load_family_model(checkpoint.weights, **load_kwargs)
        if checkpoint.gates is not None:
            _load_gates_artifact(model, checkpoint.gates)
            checkpoint.exit_defaults.save_to(exit_decoder_of(model).config)  # the artifact's exit, as for LLaVA
        return LoadedModel(checkpoint, model, tokenizer, processor, context_len)

    if checkpoint.kind == "llava-hf":
        load_kwargs["key_mapping"] = HF_CHECKPOINT_TO_LLAVA
    weights_path = checkpoint.model_base or checkpoint.weights
    require_tokenizer(weights_path)
    tokenizer = AutoTokenizer.from_pretrained(weights_path)
    model = LlavaLlamaForCausalLM.from_pretrained(weights_path, config=checkpoint.config, **load_kwargs)
    if checkpoint.model_base is not None:
        _load_projector(model, checkpoint.weights)
    if checkpoint.gates is not None:
        load_gates(model, checkpoint.gates)

    _add_mm_tokens(model, tokenizer)
    tower = model.get_vision_tower()
    if not tower.is_loaded:
        tower.load_model(dtype=dtype, device=model.device)
    image_processor = tower.image_processor or load_image_processor(tower.vision_tower_name or checkpoint.weights)
    context_len = getattr(model.config, "max_sequence_length", None) or getattr(
        model.config, "max_position_embeddings", DEFAULT_CONTEXT_LEN
    )
    return LoadedModel(checkpoint, model, tokenizer, image_processor, context_len)


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
    """LLaVA's `(tokenizer, model, processor, context_len)`: `load_model(Checkpoint.resolve(model_path,
    model_base))` as LLaVA's callers take it (`processor` is LLaVA's image processor, or a family's
    FamilyProcessor). `model_name` is accepted and unused: the checkpoint's files say what it is."""
    del model_name
    return load_model(
        Checkpoint.resolve(model_path, model_base), device=device, dtype=dtype, device_map=device_map,
        load_8bit=load_8bit, load_4bit=load_4bit,
        attn_implementation="flash_attention_2" if use_flash_attn else attn_implementation,
    ).as_tuple()


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
    module = family_module(config_dict)
    model_class = None if module is None else module.ADAPTER.model_class
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
