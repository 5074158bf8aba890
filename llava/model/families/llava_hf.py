"""llava-hf LLaVA-1.5 (`LlavaForConditionalGeneration`): a Llama decoder; each image is one run of
`image_token_id` placeholders, (image / patch)^2 of them."""

from transformers import LlavaConfig, LlavaForConditionalGeneration

from llava.model.visual_exit.vlm import FamilyAdapter, register_family

ADAPTER = register_family(FamilyAdapter(LlavaForConditionalGeneration))


def tiny_config(text: dict, tokens: dict) -> LlavaConfig:
    return LlavaConfig(
        text_config={"model_type": "llama", **text},
        vision_config={
            "model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
        },
        image_token_id=tokens["image"],
        image_seq_length=4,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
