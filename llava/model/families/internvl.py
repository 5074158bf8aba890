"""InternVL (`InternVLForConditionalGeneration`): a Qwen2 decoder; each image is `<img>`, image_seq_length
`<IMG_CONTEXT>` placeholders per tile (the only ones the model fills), `</img>`."""

from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration

from llava.model.families.processing import FamilyProcessing
from llava.model.families.qwen2_vl import CHATML_TOKENS, chatml_template
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


def tiny_image_processor(config) -> GotOcr2ImageProcessorPil:
    """Tiles of the tower's size, at most 4 of them plus the thumbnail."""
    height, width = config.vision_config.image_size
    return GotOcr2ImageProcessorPil(size={"height": height, "width": width}, max_patches=4)


def image_token_counts(image_inputs, settings: dict, image_processor) -> list[int]:
    return [tiles * settings.get("image_seq_length", 256) for tiles in image_inputs["num_patches"].tolist()]


def image_run(count: int, placeholder_id: int, tokenizer) -> list[int]:
    """`<img>`, the image's `<IMG_CONTEXT>` placeholders, `</img>`."""
    return [tokenizer.start_image_token_id, *[placeholder_id] * count, tokenizer.end_image_token_id]


PROCESSING = FamilyProcessing(
    processor_class="InternVLProcessor",
    chat_template=chatml_template("<IMG_CONTEXT>\n"),
    turn_end="<|im_end|>",
    placeholder=("context_image_token", "<IMG_CONTEXT>"),
    named_tokens={
        "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    },
    chat_tokens=CHATML_TOKENS,
    config_tokens={"image": "<IMG_CONTEXT>"},
    settings_for=lambda config: {"image_seq_length": config.image_seq_length},
    tiny_image_processor=tiny_image_processor,
    token_counts=image_token_counts,
    image_run=image_run,
    # InternVL's processor always cuts images into tiles, whatever the image processor's own default.
    image_kwargs={"crop_to_patches": True},
)
