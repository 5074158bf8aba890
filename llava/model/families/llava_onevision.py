"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): a Qwen2 decoder; images (anyres, NeXT's layout)
and videos (pooled frames, one newline) are runs of `image_token_id` / `video_token_id` placeholders."""

import math

from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessorPil

from llava.model.families.llava_next import tile_grid, unpadded_grid
from llava.model.families.processing import FamilyProcessing
from llava.model.families.qwen2_vl import CHATML_TOKENS, chatml_template
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


def processor_settings(config) -> dict:
    """LlavaOnevisionProcessor's arguments: a tile's feature count (SigLIP has no class token), the anyres limit."""
    vision = config.vision_config
    return {
        "num_image_tokens": (vision.image_size // vision.patch_size) ** 2,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "vision_aspect_ratio": config.vision_aspect_ratio,
    }


def tiny_image_processor(config) -> LlavaOnevisionImageProcessorPil:
    side = config.vision_config.image_size
    return LlavaOnevisionImageProcessorPil(
        size={"height": side, "width": side}, image_grid_pinpoints=config.image_grid_pinpoints
    )


def image_token_counts(image_inputs, settings: dict, image_processor) -> list[int]:
    """A sample's only image: the base tile, NeXT's unpadded grid (scaled down past `anyres_max_N` tiles' worth)
    with a newline per row. Each of a sample's several images: its base tile and one newline."""
    per_tile = settings["num_image_tokens"]
    side = math.isqrt(per_tile)
    max_tiles = int(settings.get("vision_aspect_ratio", "anyres_max_9").removeprefix("anyres_max_"))
    dropped_class_token = int(settings.get("vision_feature_select_strategy") == "default")
    tile_height, tile_width = image_inputs["pixel_values"].shape[-2:]
    images_of_sample = [n for n in image_inputs["batch_num_images"].tolist() for _ in range(n)]
    counts = []
    for size, images in zip(image_inputs["image_sizes"].tolist(), images_of_sample):
        if images > 1:
            counts.append(per_tile + 1 - dropped_class_token)
            continue
        down, across = tile_grid(size, tile_height, tile_width, image_processor.image_grid_pinpoints)
        rows, columns = unpadded_grid(*size, side * down, side * across)
        ratio = math.sqrt(rows * columns / (max_tiles * side**2))
        if ratio > 1.1:
            rows, columns = int(rows // ratio), int(columns // ratio)
        counts.append(per_tile + rows * columns + rows - dropped_class_token)
    return counts


PROCESSING = FamilyProcessing(
    processor_class="LlavaOnevisionProcessor",
    chat_template=chatml_template("<image>\n"),
    turn_end="<|im_end|>",
    placeholder=("image_token", "<image>"),
    named_tokens={"image_token": "<image>", "video_token": "<video>"},
    chat_tokens=CHATML_TOKENS,
    config_tokens={"image": "<image>", "video": "<video>"},
    settings_for=processor_settings,
    tiny_image_processor=tiny_image_processor,
    token_counts=image_token_counts,
)
