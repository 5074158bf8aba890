"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): a Llama decoder; anyres images are base features, then the
unpadded tile grid with an `image_newline` after each row, all one run of `image_token_id` placeholders."""

import dataclasses

from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil
from transformers.image_processing_utils import select_best_resolution

from llava.model.families import llava_hf
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


def unpadded_grid(height: int, width: int, rows: int, columns: int) -> tuple[int, int]:
    """The rows and columns of a `rows` x `columns` feature grid that show a `height` x `width` image: anyres
    resizes it to fit the tiles and pads the shorter relative side evenly, which the model cuts off again."""
    if width / height > columns / rows:
        shown = int(round(height * (columns / width), 7))
        rows -= (rows - shown) // 2 * 2
    else:
        shown = int(round(width * (rows / height), 7))
        columns -= (columns - shown) // 2 * 2
    return rows, columns


def tile_grid(image_size: list[int], tile_height: int, tile_width: int, pinpoints) -> tuple[int, int]:
    """Tiles down and across for an image of `image_size` (height, width): the pinpoint resolution that shows it
    best, in tiles."""
    best_height, best_width = select_best_resolution(image_size, pinpoints)
    return best_height // tile_height, best_width // tile_width


def tiny_image_processor(config) -> LlavaNextImageProcessorPil:
    side = config.vision_config.image_size
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side},
        image_grid_pinpoints=config.image_grid_pinpoints,
    )


def image_token_counts(image_inputs, settings: dict, image_processor) -> list[int]:
    """Per image: the base tile's features, the unpadded grid of the other tiles' features and a newline after
    each of its rows."""
    tile_height, tile_width = image_inputs["pixel_values"].shape[-2:]
    patch = settings["patch_size"]
    per_tile_rows, per_tile_columns = tile_height // patch, tile_width // patch
    counts = []
    for size in image_inputs["image_sizes"].tolist():
        down, across = tile_grid(size, tile_height, tile_width, image_processor.image_grid_pinpoints)
        rows, columns = unpadded_grid(*size, per_tile_rows * down, per_tile_columns * across)
        counts.append(per_tile_rows * per_tile_columns + llava_hf.feature_offset(settings) + rows * columns + rows)
    return counts


# llava-v1.6-vicuna's conversation is LLaVA-1.5's.
PROCESSING = dataclasses.replace(
    llava_hf.PROCESSING,
    processor_class="LlavaNextProcessor",
    tiny_image_processor=tiny_image_processor,
    token_counts=image_token_counts,
)
