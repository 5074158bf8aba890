"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): a Llama decoder; anyres images are base features, then the
unpadded tile grid with an `image_newline` after each row, all one run of `image_token_id` placeholders."""

from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

from llava.model.visual_exit.vlm import FamilyAdapter, register_family

ADAPTER = register_family(FamilyAdapter(LlavaNextForConditionalGeneration))


def tiny_config(text: dict, tokens: dict) -> LlavaNextConfig:
    return LlavaNextConfig(
        text_config={"model_type": "llama", **text},
        vision_config={
            "model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
        },
        image_token_id=tokens["image"],
        image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
