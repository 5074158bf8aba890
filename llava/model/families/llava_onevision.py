"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): a Qwen2 decoder; images (anyres, NeXT's layout)
and videos (pooled frames, one newline) are runs of `image_token_id` / `video_token_id` placeholders."""

from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

from llava.model.visual_exit.vlm import FamilyAdapter, register_family

ADAPTER = register_family(
    FamilyAdapter(LlavaOnevisionForConditionalGeneration, visual_token_attributes=("image_token_id", "video_token_id"))
)


def tiny_config(text: dict, tokens: dict) -> LlavaOnevisionConfig:
    return LlavaOnevisionConfig(
        text_config={"model_type": "qwen2", **text},
        vision_config={
            "model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
        },
        image_token_id=tokens["image"],
        video_token_id=tokens["video"],
        image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
