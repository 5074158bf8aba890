"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): Qwen2-VL's text side and M-RoPE (see qwen2_vl.py), a
windowed-attention vision encoder whose merger outputs the text width."""

import dataclasses

import torch

from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from llava.model.families import qwen2_vl
from llava.model.families.qwen2_vl import text_config
from llava.model.visual_exit.vlm import register_family

ADAPTER = register_family(dataclasses.replace(qwen2_vl.ADAPTER, model_class=Qwen2_5_VLForConditionalGeneration))


def tiny_config(text: dict, tokens: dict) -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(
        text_config=text_config(text, tokens),
        vision_config={
            "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 14,
            "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": text["hidden_size"],
            "window_size": 56, "fullatt_block_indexes": [1],
        },
        image_token_id=tokens["image"],
        video_token_id=tokens["video"],
        vision_start_token_id=tokens["vision_start"],
        vision_end_token_id=tokens["vision_end"],
    )


# Qwen2-VL's template, tokens and image processor.
def video_inputs(video, image_processor, tokenizer) -> tuple[str, dict]:
    """Qwen2-VL's, with the seconds each temporal group spans (`second_per_grid_ts`), which its M-RoPE time row
    advances by."""
    text, inputs = qwen2_vl.video_inputs(video, image_processor, tokenizer)
    return text, {**inputs, "second_per_grid_ts": torch.tensor([image_processor.temporal_patch_size / video.fps])}


PROCESSING = dataclasses.replace(qwen2_vl.PROCESSING, processor_class="Qwen2_5_VLProcessor", video_inputs=video_inputs)
