"""Tiny random checkpoints of transformers' own VLM families, offline:
`python -m llava.tiny --family qwen2-vl --out DIR [--seed S] [--gate-hidden-size G]`.

The model is transformers' own class, built from the family's `tiny_config` with the text sizes of TinyGeometry
(the vision tower is the family's own tiny one) and written by `save_pretrained`. Beside it: a tokenizer built
here (LLaMA-style pieces plus the family's special tokens, whose ids the config names), the family's image
processor, chat template and processor_config.json, the files `load_processor` reads (and `AutoProcessor`, where
it constructs). With a gate width the model gets fresh exit gates first, so they are in the checkpoint.
"""

from __future__ import annotations

import os

import torch
from tokenizers import pre_tokenizers
from transformers import GenerationConfig, PreTrainedTokenizerFast

from llava.model.families import FAMILY_MODULES
from llava.model.families.processing import FamilyProcessing, FamilyProcessor
from llava.tiny.llava import TinyGeometry
from llava.tiny.tokenizer import build_byte_level_tokenizer, build_tokenizer
from llava.model.visual_exit import enable_visual_exit


def build_family_tokenizer(processing: FamilyProcessing, vocab_size: int) -> PreTrainedTokenizerFast:
    """The tiny LLaMA-style tokenizer (byte-level Qwen-style where the family's transformers class imposes one:
    `byte_level_tokenizer`), its family's tokens added as special tokens; the named ones become attributes
    (`tokenizer.image_token`, `..._id`) as the family's processor expects. Newlines are pieces of their own, as in
    Qwen's and LLaMA's tokenizers: a learned piece such as "\nA" would fuse a template's newline with the answer's
    first letter, and the prompt's tokens would no longer begin its answer's sequence."""
    if processing.byte_level_tokenizer:  # Qwen's pattern splits newlines off already
        base = build_byte_level_tokenizer(vocab_size=vocab_size)
        backend = base.backend_tokenizer
    else:
        base = build_tokenizer(vocab_size=vocab_size)
        backend = base.backend_tokenizer
        newlines = pre_tokenizers.Split("\n", behavior="isolated")
        backend.pre_tokenizer = pre_tokenizers.Sequence([newlines, backend.pre_tokenizer])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=base.bos_token,
        eos_token=base.eos_token,
        unk_token=base.unk_token,
        pad_token=base.pad_token,
        padding_side=base.padding_side,
        model_max_length=base.model_max_length,
        extra_special_tokens=processing.named_tokens,
    )
    tokenizer.add_tokens(list(processing.chat_tokens), special_tokens=True)
    return tokenizer


def build_tiny_family(family: str, geometry: TinyGeometry | None = None, gate_hidden_size: int | None = None):
    """(model, FamilyProcessor): a randomly initialised model of `family` (a key of FAMILY_MODULES) and what
    builds its inputs."""
    if family not in FAMILY_MODULES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILY_MODULES)}")
    geometry = geometry or TinyGeometry()
    module = FAMILY_MODULES[family]
    processing = module.PROCESSING
    tokenizer = build_family_tokenizer(processing, geometry.vocab_size)
    text = dict(
        vocab_size=len(tokenizer), hidden_size=geometry.hidden, intermediate_size=geometry.intermediate,
        num_hidden_layers=geometry.layers, num_attention_heads=geometry.heads, num_key_value_heads=geometry.kv_heads,
        max_position_embeddings=geometry.max_positions, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    tokens = {role: tokenizer.convert_tokens_to_ids(token) for role, token in processing.config_tokens.items()}
    config = module.tiny_config(text, tokens)
    torch.manual_seed(geometry.seed)
    model = module.ADAPTER.model_class(config).eval()
    # Generation stops at the end of an assistant turn, as the template writes it.
    stops = list(dict.fromkeys([tokenizer.convert_tokens_to_ids(processing.turn_end), tokenizer.eos_token_id]))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id
    )
    if gate_hidden_size is not None:
        enable_visual_exit(model, gate_hidden_size)
    image_processor = processing.tiny_image_processor(config)
    settings = processing.settings_for(config)
    processor = FamilyProcessor(processing, tokenizer, image_processor, settings, processing.chat_template)
    return model, processor


def write_tiny_family(
    out: str, family: str, geometry: TinyGeometry | None = None, gate_hidden_size: int | None = None
) -> str:
    model, processor = build_tiny_family(family, geometry, gate_hidden_size)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
