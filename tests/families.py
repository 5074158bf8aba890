"""Test helpers for transformers' own VLM families: tiny stock models, hand-built multimodal batches (what each
family's processor would emit: placeholders expanded, pixel values, grids), and the masked stock oracle."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from llava.model.families import FAMILY_MODULES
from llava.model.visual_exit import enable_visual_exit

TEXT = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
TOKENS = dict(image=250, video=251, vision_start=252, vision_end=253, boi=252, eoi=253)  # boi, eoi: Gemma 3's
FAMILIES = list(FAMILY_MODULES)
ANYRES = ("llava-next", "llava-onevision")
# Families whose images are runs of pads between vision_start and vision_end, fed as flat patches with a (t, h, w)
# grid: their towers' (patch size, temporal patch size) in tiny_config.
FLAT_PATCHES = {
    "qwen2-vl": (14, 2), "qwen2.5-vl": (14, 2), "qwen3-vl": (16, 2), "qwen3-vl-moe": (16, 2), "qwen3.5": (16, 2),
    "llava-onevision-1.5": (14, 1),
}
M_ROPE = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe", "qwen3.5")  # 3-row positions
# Decoders with linear-attention layers, where masking a token is not removing it: the masked stock oracle does not
# apply, the stock layers run on the shortened sequence instead (test_hybrid_linear.py).
HYBRID = ("qwen3.5",)
# Per-token type inputs of the families whose processors return them: Qwen's (M-RoPE rows), Gemma 3's (image blocks).
TOKEN_TYPES = {**{name: "mm_token_type_ids" for name in M_ROPE}, "gemma3": "token_type_ids"}
TYPE_KEYS = ("mm_token_type_ids", "token_type_ids")


def stock_model(family: str, seed: int = 0, attn: str = "eager"):
    config = FAMILY_MODULES[family].tiny_config(dict(TEXT), TOKENS)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return FAMILY_MODULES[family].ADAPTER.model_class(config).eval()


def exit_model(stock, gate_hidden_size: int | None = 16):
    """A copy of `stock` with the visual exit (the stock one stays the oracle)."""
    return enable_visual_exit(copy.deepcopy(stock), gate_hidden_size=gate_hidden_size)


@dataclass
class Sample:
    """Text tokens before and after the images, then the videos; each image a size: (h, w) pixels (anyres),
    patches (Qwen), tiles (InternVL), ignored (llava-hf); each video (Qwen families) a (t, h, w) grid of temporal
    patch groups and patches."""

    before: int
    images: list = field(default_factory=list)
    after: int = 5
    videos: list = field(default_factory=list)


def _image(family, model, size, generator):
    """(placeholder run, pixel inputs of this one image)."""
    config = model.config
    if family == "llava-hf":
        return [TOKENS["image"]] * 4, {"pixel_values": torch.randn(1, 3, 28, 28, generator=generator)}
    if family == "gemma3":
        run = [TOKENS["boi"]] + [TOKENS["image"]] * config.mm_tokens_per_image + [TOKENS["eoi"]]
        return run, {"pixel_values": torch.randn(1, 3, 56, 56, generator=generator)}
    if family in ANYRES:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        patches = image_size_to_num_patches(size, config.image_grid_pinpoints, 28)
        pixels = {"pixel_values": torch.randn(1, patches, 3, 28, 28, generator=generator), "image_sizes": torch.tensor([size])}
        with torch.no_grad():
            count = model.model.get_image_features(**pixels, return_dict=True).pooler_output[0].shape[0]
        return [TOKENS["image"]] * count, pixels
    if family in FLAT_PATCHES:
        (h, w), (patch, frames) = size, FLAT_PATCHES[family]
        pixels = torch.randn(h * w, 3 * frames * patch * patch, generator=generator)
        run = [TOKENS["vision_start"]] + [TOKENS["image"]] * (h * w // 4) + [TOKENS["vision_end"]]
        return run, {"pixel_values": pixels, "image_grid_thw": torch.tensor([[1, h, w]])}
    if family == "internvl":
        return [TOKENS["image"]] * (config.image_seq_length * size), {"pixel_values": torch.randn(size, 3, 28, 28, generator=generator)}
    raise KeyError(family)


# Qwen3-VL and Qwen3.5 write a timestamp ("<1.0 seconds>", text) before each frame group's own vision_start ...
# vision_end run; Qwen2-VL and Qwen2.5-VL one run for the whole video.
TIMESTAMPED_VIDEO = ("qwen3-vl", "qwen3-vl-moe", "qwen3.5")


def _video(family, grid, generator):
    """(placeholder tokens, pixel inputs of this one video): flat patches of t temporal groups, random pixels."""
    (t, h, w), (patch, frames) = grid, FLAT_PATCHES[family]
    pixels = {"pixel_values_videos": torch.randn(t * h * w, 3 * frames * patch * patch, generator=generator),
              "video_grid_thw": torch.tensor([[t, h, w]])}
    if family == "qwen2.5-vl":
        pixels["second_per_grid_ts"] = torch.tensor([1.0])
    frame = [TOKENS["vision_start"]] + [TOKENS["video"]] * (h * w // 4) + [TOKENS["vision_end"]]
    if family not in TIMESTAMPED_VIDEO:
        return [TOKENS["vision_start"]] + [TOKENS["video"]] * (t * h * w // 4) + [TOKENS["vision_end"]], pixels
    run = []
    for _ in range(t):
        run += torch.randint(3, 200, (2,), generator=generator).tolist() + frame  # the timestamp's text, the frame
    return run, pixels


def _collate(family, pixel_inputs):
    if not pixel_inputs:
        return {}
    if family in ANYRES:
        widest = max(p["pixel_values"].shape[1] for p in pixel_inputs)
        padded = [torch.nn.functional.pad(p["pixel_values"], (0, 0, 0, 0, 0, 0, 0, widest - p["pixel_values"].shape[1])) for p in pixel_inputs]
        return {"pixel_values": torch.cat(padded), "image_sizes": torch.cat([p["image_sizes"] for p in pixel_inputs])}
    keys = dict.fromkeys(key for p in pixel_inputs for key in p)  # images' and videos' own keys
    return {key: torch.cat([p[key] for p in pixel_inputs if key in p]) for key in keys}


def batch(family, model, samples: list[Sample], padding_side: str = "left", seed: int = 0) -> dict:
    """Model inputs for `samples`, padded to one length; text tokens are random, the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    rows, pixel_inputs = [], []
    for sample in samples:
        row = torch.randint(3, 200, (sample.before,), generator=generator).tolist()
        for size in sample.images:
            run, pixels = _image(family, model, size, generator)
            row += run
            pixel_inputs.append(pixels)
        row += torch.randint(3, 200, (sample.after,), generator=generator).tolist()
        for grid in sample.videos:
            run, pixels = _video(family, grid, generator)
            row += run + torch.randint(3, 200, (2,), generator=generator).tolist()
            pixel_inputs.append(pixels)
        rows.append(row)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), TEXT["pad_token_id"])
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        ids[b, span], mask[b, span] = torch.tensor(row), 1
    inputs = {"input_ids": ids, "attention_mask": mask, **_collate(family, pixel_inputs)}
    if family in TOKEN_TYPES:
        inputs[TOKEN_TYPES[family]] = (ids == TOKENS["image"]).int() + 2 * (ids == TOKENS["video"]).int()
    return inputs


def sample_inputs(family, model, inputs: dict, samples: list[Sample], b: int) -> dict:
    """Sample b of a batch on its own, unpadded (its images' pixel inputs sliced out)."""
    valid = inputs["attention_mask"][b].bool()
    alone = {"input_ids": inputs["input_ids"][b, valid][None], "attention_mask": inputs["attention_mask"][b, valid][None]}
    for key in TYPE_KEYS:
        if key in inputs:
            alone[key] = inputs[key][b, valid][None]
    if family in FLAT_PATCHES:
        kinds = (("pixel_values", "image_grid_thw", "images"), ("pixel_values_videos", "video_grid_thw", "videos"))
        for pixels, grid_key, kind in kinds:
            first = sum(len(getattr(s, kind)) for s in samples[:b])
            count = len(getattr(samples[b], kind))
            if count:
                grids = inputs[grid_key]
                start = int(grids[:first].prod(dim=1).sum())
                alone[pixels] = inputs[pixels][start : start + int(grids[first : first + count].prod(dim=1).sum())]
                alone[grid_key] = grids[first : first + count]
                if kind == "videos" and "second_per_grid_ts" in inputs:
                    alone["second_per_grid_ts"] = inputs["second_per_grid_ts"][first : first + count]
        return alone
    first = sum(len(s.images) for s in samples[:b])
    count = len(samples[b].images)
    if not count:
        return alone
    if family == "internvl":
        tiles = [size for s in samples for size in s.images]
        start = sum(tiles[:first])
        alone["pixel_values"] = inputs["pixel_values"][start : start + sum(tiles[first : first + count])]
    else:
        for key in ("pixel_values", "image_sizes"):
            if key in inputs:
                alone[key] = inputs[key][first : first + count]
    return alone


def visual_mask(inputs: dict) -> torch.Tensor:
    return torch.isin(inputs["input_ids"], torch.tensor([TOKENS["image"], TOKENS["video"]])) & inputs["attention_mask"].bool()


def masked_stock_forward(stock, inputs: dict, gone_from: torch.Tensor, **kwargs):
    """The stock model, its own positions (3-D for Qwen), with key t of sample b masked for every query in layers
    >= gone_from[b, t]: a hook narrows each decoder layer's own eager mask (windows and Gemma 3's image blocks
    included) by the gone keys; a layer given no mask gets causal and padding."""
    decoder = stock.model.language_model
    valid = inputs["attention_mask"].bool()
    batch_size, length = valid.shape
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    itself = torch.eye(length, dtype=torch.bool)
    handles = []
    for index, layer in enumerate(decoder.layers):
        gone = index >= gone_from
        def swap(module, args, layer_kwargs, gone=gone):
            stock_mask = layer_kwargs.get("attention_mask")
            if isinstance(stock_mask, torch.Tensor) and stock_mask.dim() == 4:
                allowed = (stock_mask[:, 0] == 0) & ~gone[:, None, :]
            else:
                allowed = causal & valid[:, None, :] & ~gone[:, None, :]
            allowed = allowed | itself
            layer_kwargs["attention_mask"] = torch.zeros(batch_size, 1, length, length).masked_fill(
                ~allowed[:, None], torch.finfo(torch.float32).min
            )
            return args, layer_kwargs

        handles.append(layer.register_forward_pre_hook(swap, with_kwargs=True))
    try:
        with torch.no_grad():
            return stock(**inputs, use_cache=False, **kwargs)
    finally:
        for handle in handles:
            handle.remove()


def greedy_with_and_without_cache(model, inputs: dict, exit_config, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ids of `steps` new tokens, with the exit cache and recomputing prompt + answer at every step."""
    settings = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=TEXT["pad_token_id"])
    with torch.no_grad():
        cached = model.generate(**inputs, exit_config=exit_config, **settings)
        recomputed = model.generate(**inputs, exit_config=exit_config, use_cache=False, **settings)
    return cached, recomputed
