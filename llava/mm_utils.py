"""Prompt tokenisation and image preprocessing with LLaVA's conventions."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from PIL import Image, UnidentifiedImageError
from transformers import StoppingCriteria

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX


class ImageLoadError(ValueError):
    """An image file is missing or unreadable; the message names the file."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image as RGB, with a one-line error naming the file when that fails."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise ImageLoadError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ImageLoadError(f"{path}: cannot read image ({type(error).__name__}: {error})") from None


def expand2square(image: Image.Image, background_color: tuple[int, ...]) -> Image.Image:
    """Pad to a square of side max(w, h), the image centred on the background colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background_color)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def select_best_resolution(image_size: tuple[int, int], resolutions: Sequence[Sequence[int]]) -> tuple[int, int]:
    """LLaVA-NeXT's canvas for an image of (width, height): of the (width, height) `resolutions`, the one that keeps
    the most of the image's pixels once it is scaled to fit, then the one that wastes the least area; the first
    listed wins a tie. (The same float arithmetic as LLaVA and transformers, so borderline sizes agree.)"""
    width, height = image_size

    def fit(resolution):
        scale = min(resolution[0] / width, resolution[1] / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        return kept, kept - resolution[0] * resolution[1]

    best = max(resolutions, key=fit)  # max() keeps the first of equal keys
    return best[0], best[1]


def anyres_views(image: Image.Image, resolutions: Sequence[Sequence[int]], tile: int, base: int) -> list[Image.Image]:
    """LLaVA-NeXT's views of one image: the whole image squashed to base x base, then the tiles of its canvas.

    The canvas is the best resolution; the image is scaled to fit it, keeping its aspect ratio, and pasted in the
    middle on black. Tiles of tile x tile are cut row by row. Resizing is bicubic (PIL's default, which LLaVA uses).
    """
    canvas_width, canvas_height = select_best_resolution(image.size, resolutions)
    width, height = image.size
    scale_width, scale_height = canvas_width / width, canvas_height / height
    if scale_width < scale_height:
        size = (canvas_width, min(math.ceil(height * scale_width), canvas_height))
    else:
        size = (min(math.ceil(width * scale_height), canvas_width), canvas_height)
    canvas = Image.new("RGB", (canvas_width, canvas_height), (0, 0, 0))
    offset = ((canvas_width - size[0]) // 2, (canvas_height - size[1]) // 2)
    canvas.paste(image.resize(size, Image.Resampling.BICUBIC), offset)
    tiles = [
        canvas.crop((left, top, left + tile, top + tile))
        for top in range(0, canvas_height, tile)
        for left in range(0, canvas_width, tile)
    ]
    return [image.resize((base, base), Image.Resampling.BICUBIC), *tiles]


def process_images(images: Sequence[Image.Image], image_processor, model_cfg) -> torch.Tensor | list[torch.Tensor]:
    """Images → pixel tensors, following the config's `image_aspect_ratio`: 'pad' (LLaVA-1.5) gives one
    3 x S x S view per image, 'anyres' (LLaVA-NeXT) a (1 + tiles) x 3 x S x S stack of views per image. The
    result is stacked when all images have the same shape, else a list."""
    aspect_ratio = getattr(model_cfg, "image_aspect_ratio", None)
    if aspect_ratio == "pad":
        background = tuple(int(mean * 255) for mean in image_processor.image_mean)
        pixels = [
            image_processor(expand2square(image, background), return_tensors="pt")["pixel_values"][0]
            for image in images
        ]
    elif aspect_ratio == "anyres":
        tile, base = image_processor.crop_size["height"], image_processor.size["shortest_edge"]
        views = [anyres_views(image, model_cfg.image_grid_pinpoints, tile, base) for image in images]
        pixels = [image_processor(image_views, return_tensors="pt")["pixel_values"] for image_views in views]
    else:
        pixels = list(image_processor(list(images), return_tensors="pt")["pixel_values"])
    if all(p.shape == pixels[0].shape for p in pixels):
        return torch.stack(pixels)
    return pixels


def tokenizer_image_token(
    prompt: str, tokenizer, image_token_index: int = IMAGE_TOKEN_INDEX, return_tensors: str | None = None
) -> list[int] | torch.Tensor:
    """Tokenise a prompt with one `image_token_index` per `<image>` marker.

    Each text piece is tokenised on its own (as LLaVA does), so each would start with BOS: one BOS is kept at
    the front and the others are dropped.
    """
    pieces = [tokenizer(piece).input_ids for piece in prompt.split(DEFAULT_IMAGE_TOKEN)]
    bos = tokenizer.bos_token_id
    keeps_bos = bos is not None and len(pieces[0]) > 0 and pieces[0][0] == bos
    input_ids = [bos] if keeps_bos else []
    for index, piece in enumerate(pieces):
        if index > 0:
            input_ids.append(image_token_index)
        input_ids.extend(piece[1:] if keeps_bos and piece[:1] == [bos] else piece)
    if return_tensors is None:
        return input_ids
    if return_tensors == "pt":
        return torch.tensor(input_ids, dtype=torch.long)
    raise ValueError(f"Unsupported tensor type: {return_tensors}")


def get_model_name_from_path(model_path: str) -> str:
    """LLaVA's model name: the last path part, or `<parent>_<checkpoint-N>` for Trainer checkpoints."""
    parts = model_path.strip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]


class KeywordsStoppingCriteria(StoppingCriteria):
    """Stop a row once its generated text ends with one of the keywords.

    It sees the ids that `generate` produces; LLaVA's `generate` feeds embeddings, so these are the new tokens only.
    """

    def __init__(self, keywords: Sequence[str], tokenizer):
        self.keywords = list(keywords)
        self.tokenizer = tokenizer
        keyword_lengths = [len(tokenizer(keyword, add_special_tokens=False).input_ids) for keyword in self.keywords]
        # A keyword may be split differently in context: look a few tokens further back than its own length.
        self.window = max(keyword_lengths, default=1) + 2

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        tails = self.tokenizer.batch_decode(input_ids[:, -self.window :], skip_special_tokens=False)
        done = [any(keyword in tail for keyword in self.keywords) for tail in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
