"""Qwen3-VL-MoE (`Qwen3VLMoeForConditionalGeneration`): Qwen3-VL (DeepStack, interleaved M-RoPE, see qwen3_vl.py)
with sparse mixture-of-experts MLPs in its text layers. The experts work token by token, so a token that left routes
nowhere; the exit needs nothing beyond Qwen3-VL's adapter."""

import dataclasses

from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

from llava.model.families import qwen3_vl
from llava.model.visual_exit.vlm import register_family

ADAPTER = register_family(dataclasses.replace(qwen3_vl.ADAPTER, model_class=Qwen3VLMoeForConditionalGeneration))


def tiny_config(text: dict, tokens: dict) -> Qwen3VLMoeConfig:
    """Qwen3-VL's tiny config with 4 experts, 2 per token, in every layer."""
    dense = qwen3_vl.tiny_config(text, tokens)
    text_config = {
        **dense.text_config.to_dict(), "num_experts": 4, "num_experts_per_tok": 2,
        "moe_intermediate_size": text["intermediate_size"] // 2, "decoder_sparse_step": 1,
    }
    for key in ("model_type", "architectures", "transformers_version"):
        text_config.pop(key, None)
    vision_config = {k: v for k, v in dense.vision_config.to_dict().items() if k not in ("model_type", "transformers_version")}
    return Qwen3VLMoeConfig(
        text_config=text_config, vision_config=vision_config, image_token_id=tokens["image"],
        video_token_id=tokens["video"], vision_start_token_id=tokens["vision_start"],
        vision_end_token_id=tokens["vision_end"],
    )


PROCESSING = qwen3_vl.PROCESSING
