"""InternVL (`InternVLForConditionalGeneration`): a Qwen2 decoder; each image is `<img>`, image_seq_length
`<IMG_CONTEXT>` placeholders per tile (the only ones the model fills), `</img>`."""

from transformers import InternVLConfig, InternVLForConditionalGeneration

from llava.model.visual_exit.vlm import FamilyAdapter, register_family

ADAPTER = register_family(FamilyAdapter(InternVLForConditionalGeneration))


def tiny_config(text: dict, tokens: dict) -> InternVLConfig:
    return InternVLConfig(
        text_config={"model_type": "qwen2", **text},
        vision_config={
            "model_type": "internvl_vision", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "image_size": [28, 28], "patch_size": [14, 14],
        },
        image_token_id=tokens["image"],
        image_seq_length=1,
        downsample_ratio=0.5,
    )
