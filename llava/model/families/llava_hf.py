"""llava-hf LLaVA-1.5 (`LlavaForConditionalGeneration`): a Llama decoder; each image is one run of
`image_token_id` placeholders, (image / patch)^2 of them."""

from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration

from llava.model.families.processing import FamilyProcessing, content_jinja
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


# LLaVA-1.5's conversation (vicuna_v1 without its default system line): "USER: <image>\nQ ASSISTANT: A</s>USER: ...",
# the parts of a turn joined by a newline as LLaVA's "<image>\nQ" values are, a system message's text in front.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}" + content_jinja("<image>", "\n") + "{{ ' ' }}"
    "{%- else -%}{{ message.role.upper() + ': ' }}" + content_jinja("<image>", "\n")
    + "{{ '</s>' if message.role == 'assistant' else ' ' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def processor_settings(config) -> dict:
    """LlavaProcessor's arguments for this model: CLIP towers add a class token, which strategy "default" drops."""
    return {
        "patch_size": config.vision_config.patch_size,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "num_additional_image_tokens": int(config.vision_config.model_type == "clip_vision_model"),
    }


def feature_offset(settings: dict) -> int:
    """Visual tokens per image beyond its patches: the tower's extra tokens, less the class token "default" drops."""
    dropped_class_token = settings.get("vision_feature_select_strategy") == "default"
    return settings.get("num_additional_image_tokens", 0) - dropped_class_token


def tiny_image_processor(config) -> CLIPImageProcessorPil:
    side = config.vision_config.image_size
    return CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def image_token_counts(image_inputs, settings: dict, image_processor) -> list[int]:
    """One tile per image: its patch grid plus the tower's extra tokens."""
    height, width = image_inputs["pixel_values"].shape[-2:]
    patch = settings["patch_size"]
    return [(height // patch) * (width // patch) + feature_offset(settings)] * len(image_inputs["pixel_values"])


PROCESSING = FamilyProcessing(
    processor_class="LlavaProcessor",
    chat_template=CHAT_TEMPLATE,
    turn_end="</s>",
    placeholder=("image_token", "<image>"),
    named_tokens={"image_token": "<image>"},
    config_tokens={"image": "<image>"},
    settings_for=processor_settings,
    tiny_image_processor=tiny_image_processor,
    token_counts=image_token_counts,
)
