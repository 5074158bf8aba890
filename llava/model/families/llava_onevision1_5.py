"""LLaVA-OneVision-1.5 (`LlavaOnevision15ForConditionalGeneration`, new in transformers 5.25): a Qwen3 decoder
(per-head q/k norms) with 1-D positions, each image one run of `image_token_id` pads between `<|vision_start|>` and
`<|vision_end|>` (t·h·w/4 of them, as Qwen2-VL lays them out, without rope indices or timestamps). Its RICE vision
tower prepends a class token to each image and drops it before the 2x2 merger, so the pads count merged patches
only. On a transformers release without the class `ADAPTER` is None and the family is not offered."""

import dataclasses

import transformers
from transformers import Qwen2VLImageProcessorPil

from llava.model.families import qwen2_vl
from llava.model.families.qwen2_vl import chatml_template
from llava.model.visual_exit.vlm import FamilyAdapter, register_family

MODEL_CLASS = getattr(transformers, "LlavaOnevision15ForConditionalGeneration", None)
ADAPTER = None if MODEL_CLASS is None else register_family(
    FamilyAdapter(MODEL_CLASS, visual_token_attributes=("image_token_id", "video_token_id"))
)


def tiny_config(text: dict, tokens: dict):
    return transformers.LlavaOnevision15Config(
        text_config={
            "model_type": "qwen3", **text, "head_dim": text["hidden_size"] // text["num_attention_heads"],
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
        vision_config={
            "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 14,
            "spatial_merge_size": 2, "out_hidden_size": text["hidden_size"],
        },
        image_token_id=tokens["image"],
        video_token_id=tokens["video"],
        vision_start_token_id=tokens["vision_start"],
        vision_end_token_id=tokens["vision_end"],
    )


def tiny_image_processor(config) -> Qwen2VLImageProcessorPil:
    """Qwen2-VL's image processor on single frames (its patch embedding has no temporal depth)."""
    vision = config.vision_config
    unit = vision.patch_size * vision.spatial_merge_size
    return Qwen2VLImageProcessorPil(
        min_pixels=unit * unit, max_pixels=16 * unit * unit, patch_size=vision.patch_size, temporal_patch_size=1,
        merge_size=vision.spatial_merge_size,
    )


# Qwen2-VL's tokens and counts; its processor (Exaone 4.5's, by transformers' mapping) returns no token types.
PROCESSING = dataclasses.replace(
    qwen2_vl.PROCESSING,
    processor_class="Exaone4_5_Processor",
    chat_template=chatml_template("<|vision_start|><|image_pad|><|vision_end|>"),
    tiny_image_processor=tiny_image_processor,
    token_type_ids=None,
    video_markup=None,
    video_inputs=None,
)
