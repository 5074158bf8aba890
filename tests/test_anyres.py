"""LLaVA-NeXT's anyres (llava-v1.6) in our LLaVA class, against transformers' own LlavaNextForConditionalGeneration
and LlavaNextImageProcessor (Pil) with the same weights, fp32 at 1e-5.

LLaVA lists `image_grid_pinpoints` as (width, height) and passes `image_sizes` as (width, height); transformers
reads both as (height, width), so the matching transformers config holds the pinpoints transposed."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
)

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava.mm_utils import process_images, select_best_resolution, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from llava.model.hf_layout import hf_config_from_llava, llava_state_dict_to_hf_modules
from llava.tiny.__main__ import main as write_tiny
from llava.model.visual_exit import ExitRequest

from batching import padded_batch
from test_visual_exit import masked_reference_logits, text_positions

PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
# (width, height): wide and tall (two tiles side by side, two stacked), one smaller than every canvas (a tie that
# the list order breaks), and a near-square one (2x2 tiles).
SIZES = [(100, 40), (40, 100), (50, 30), (200, 190)]


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def v1_6_checkpoint(tmp_path_factory) -> str:
    """A tiny llava-v1.6-style checkpoint (original layout) from the tiny writer's command line, then made like a
    released one: its shards name the trained tower as LLaVA does (`...vision_tower.vision_model.*`), and the tower
    folder holds other, untrained CLIP weights (openai's, for a real one)."""
    out = str(tmp_path_factory.mktemp("tiny-llava-v1.6"))
    write_tiny(["--out", out, "--anyres"])
    shards, tower = f"{out}/model.safetensors", "model.vision_tower.vision_tower."
    renamed = {key.replace(tower, tower + "vision_model."): value for key, value in load_file(shards).items()}
    save_file(renamed, shards, metadata={"format": "pt"})
    torch.manual_seed(123)
    CLIPVisionModel(CLIPVisionConfig.from_pretrained(f"{out}/vision_tower")).save_pretrained(f"{out}/vision_tower")
    return out


@pytest.fixture(scope="module")
def loaded(v1_6_checkpoint):
    return load_pretrained_model(v1_6_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def reference(loaded):
    """transformers' LlavaNextForConditionalGeneration with our loaded model's weights and a matching config."""
    tokenizer, model, _, _ = loaded
    tower = model.get_vision_tower().config
    image_token_id = tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    config = hf_config_from_llava(model.config, tower, image_token_id, (tower.image_size // tower.patch_size) ** 2)
    next_model = LlavaNextForConditionalGeneration(config).eval()
    next_model.load_state_dict(llava_state_dict_to_hf_modules(model.state_dict()), strict=True)
    return next_model


@pytest.fixture(scope="module")
def hf_processor(loaded, reference):
    """transformers' LlavaNextProcessor for the reference: its pixels, image sizes and image-token counts."""
    tokenizer, _, image_processor, _ = loaded
    size = image_processor.crop_size["height"]
    return LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_grid_pinpoints=reference.config.image_grid_pinpoints,
        ),
        tokenizer=tokenizer,
        patch_size=reference.config.vision_config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, which the "default" strategy drops
    )


def processed_by_transformers(hf_processor, images: list[Image.Image]) -> tuple[dict, list[int]]:
    """transformers' processor output for the images, and the image tokens it gives each image."""
    processed = hf_processor(images=images, text=[DEFAULT_IMAGE_TOKEN] * len(images), return_tensors="pt", padding=True)
    return processed, (processed["input_ids"] == hf_processor.image_token_id).sum(dim=1).tolist()


def reference_inputs(hf_processor, token_rows: list[list[int]], images: list[Image.Image]) -> dict:
    """The reference's inputs: each sample's ids with its `IMAGE_TOKEN_INDEX` replaced by as many image tokens as
    transformers' processor gives that image, left-padded; pixels and (height, width) sizes from that processor."""
    processed, counts = processed_by_transformers(hf_processor, images)
    counts, image_token_id, rows = iter(counts), hf_processor.image_token_id, []
    for row in token_rows:
        expanded = []
        for token in row:
            expanded += [image_token_id] * next(counts) if token == IMAGE_TOKEN_INDEX else [token]
        rows.append(expanded)
    width = max(map(len, rows))
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, width - len(row) :], attention_mask[b, width - len(row) :] = torch.tensor(row), 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
        "pixel_values": processed["pixel_values"],
        "image_sizes": processed["image_sizes"],
    }


def test_preprocessing_equals_llava_next_image_processor(loaded, hf_processor):
    _, model, image_processor, _ = loaded
    for width, height in SIZES:
        image = random_image(width, height)
        ours = process_images([image], image_processor, model.config)
        theirs = hf_processor.image_processor([image], return_tensors="pt")
        assert theirs["image_sizes"].tolist() == [[height, width]]
        assert ours.shape == theirs["pixel_values"].shape, (width, height)
        assert (ours - theirs["pixel_values"]).abs().max() <= 1e-6, (width, height)
    # Different tile counts cannot be stacked: one (1 + tiles, 3, S, S) tensor per image.
    mixed = process_images([random_image(100, 40), random_image(200, 190)], image_processor, model.config)
    assert [tuple(views.shape[:2]) for views in mixed] == [(3, 3), (5, 3)]
    # LLaVA's tie rule: a wide image smaller than every canvas fits the tall and the wide canvas alike; the first
    # listed, (width, height) = (S, 2S), wins (transformers, reading the list as (height, width), picks the wide one).
    tile = image_processor.crop_size["height"]
    assert select_best_resolution((50, 30), model.config.image_grid_pinpoints) == (tile, 2 * tile)


@pytest.mark.parametrize("size", SIZES)
def test_logits_equal_llava_next(loaded, reference, hf_processor, size):
    tokenizer, model, image_processor, _ = loaded
    image = random_image(*size)
    ids = tokenizer_image_token(PROMPT, tokenizer, return_tensors="pt")[None]
    pixels = process_images([image], image_processor, model.config)
    with torch.no_grad():
        ours = model(input_ids=ids, images=pixels, image_sizes=[image.size])
        theirs = reference(**reference_inputs(hf_processor, ids.tolist(), [image]))
    assert ours.logits.shape == theirs.logits.shape
    assert (ours.logits - theirs.logits).abs().max() <= 1e-5


def test_left_padded_batch_equals_each_alone_and_llava_next(loaded, reference, hf_processor):
    """Two images with different tile counts (3 and 5 views) and different prompt lengths."""
    tokenizer, model, image_processor, _ = loaded
    prompts = [PROMPT, "USER: Look: <image> Describe the colours in a few words, please. ASSISTANT:"]
    images = [random_image(100, 40, seed=1), random_image(200, 190, seed=2)]
    ids, mask = padded_batch(tokenizer, prompts, "left")
    pixels = process_images(images, image_processor, model.config)
    sizes = [image.size for image in images]
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, images=pixels, image_sizes=sizes).logits
        rows = [row[row_mask.bool()].tolist() for row, row_mask in zip(ids, mask)]
        theirs = reference(**reference_inputs(hf_processor, rows, images))
        for b, prompt in enumerate(prompts):
            row = tokenizer_image_token(prompt, tokenizer, return_tensors="pt")[None]
            alone = model(input_ids=row, images=pixels[b : b + 1], image_sizes=sizes[b : b + 1]).logits[0]
            n = len(alone)
            # Our forward re-pads on the right (LLaVA's default); the reference keeps the left padding.
            assert (batched[b, :n] - alone).abs().max() <= 1e-5
            assert (batched[b, :n] - theirs.logits[b, -n:]).abs().max() <= 1e-5


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_fixed_exit_equals_masked_oracle(loaded, hf_processor, padding_side):
    """Every image slot, the newline ones included, is visual: after the first K layers they all leave."""
    tokenizer, model, image_processor, _ = loaded
    prompts = [PROMPT, "USER: compare <image> with <image> please ASSISTANT:"]
    images = [random_image(100, 40, seed=3), random_image(40, 100, seed=4), random_image(200, 190, seed=5)]
    ids, mask = padded_batch(tokenizer, prompts, padding_side)
    pixels = process_images(images, image_processor, model.config)
    sizes = [image.size for image in images]
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        mm = model.prepare_inputs_labels_for_multimodal(ids, mask, None, pixels, sizes)
        counts = processed_by_transformers(hf_processor, images)[1]
        assert mm.visual_mask.sum(dim=1).tolist() == [counts[0], counts[1] + counts[2]]
        text = text_positions(mm)
        for k in sorted({0, 1, layers // 2, layers}):
            exit_config = ExitRequest("fixed", k).expand()
            out = model(input_ids=ids, attention_mask=mask, images=pixels, image_sizes=sizes, exit_config=exit_config)
            oracle = masked_reference_logits(model, mm, torch.full((len(prompts),), k))
            assert (out.logits[text] - oracle[text]).abs().max() <= 1e-5, f"K={k}"
            assert out.exit_stats.exit_layer.tolist() == [k, k]
            assert out.exit_stats.num_visual_tokens.tolist() == mm.visual_mask.sum(dim=1).tolist()


def test_v1_6_checkpoint_loads_and_generates(v1_6_checkpoint, loaded, reference, hf_processor):
    tokenizer, model, image_processor, _ = loaded
    assert model.config.image_aspect_ratio == "anyres" and model.config.mm_patch_merge_type == "spatial_unpad"
    saved = load_file(f"{v1_6_checkpoint}/model.safetensors")
    assert torch.equal(model.get_model().image_newline, saved["model.image_newline"])
    # The tower is the shards' trained one, not the folder's.
    key = "embeddings.patch_embedding.weight"
    tower = model.get_vision_tower().vision_tower.state_dict()[key]
    assert torch.equal(tower, saved[f"model.vision_tower.vision_tower.vision_model.{key}"])
    assert not torch.equal(tower, load_file(f"{v1_6_checkpoint}/vision_tower/model.safetensors")[key])
    image = random_image(100, 40, seed=6)
    ids = tokenizer_image_token(PROMPT, tokenizer, return_tensors="pt")[None]
    pixels, sizes = process_images([image], image_processor, model.config), [image.size]
    inputs = reference_inputs(hf_processor, ids.tolist(), [image])
    image_tokens = int((inputs["input_ids"] == hf_processor.image_token_id).sum())
    greedy = {"do_sample": False, "max_new_tokens": 6, "min_new_tokens": 6}
    for exit_config in (ExitRequest("none").expand(), ExitRequest("fixed", 1).expand()):
        out = model.generate(
            ids, images=pixels, image_sizes=sizes, exit_config=exit_config, return_dict_in_generate=True, **greedy
        )
        assert out.sequences.shape == (1, 6)
        assert out.exit_stats.num_visual_tokens.tolist() == [image_tokens]
        assert out.exit_stats.exit_layer.tolist() == [exit_config.request.layer or model.config.num_hidden_layers]
    theirs = reference.generate(**inputs, **greedy)[:, inputs["input_ids"].shape[1] :]
    assert model.generate(ids, images=pixels, image_sizes=sizes, **greedy).tolist() == theirs.tolist()


def test_llava_hf_next_layout_loads_identically(v1_6_checkpoint, loaded, tmp_path):
    """transformers' LlavaNext layout of the same seed loads into our class with the same logits."""
    write_tiny(["--out", str(tmp_path), "--anyres", "--format", "hf"])
    tokenizer, model, image_processor, _ = load_pretrained_model(str(tmp_path), device="cpu")
    original = loaded[1]
    assert model.config.image_grid_pinpoints == original.config.image_grid_pinpoints
    image = random_image(40, 100, seed=7)
    ids = tokenizer_image_token(PROMPT, tokenizer, return_tensors="pt")[None]
    with torch.no_grad():
        logits = [
            m(input_ids=ids, images=process_images([image], image_processor, m.config), image_sizes=[image.size]).logits
            for m in (model, original)
        ]
    assert torch.equal(logits[0], logits[1])


def test_spatial_merge_without_unpad_lays_the_tiles_out_row_by_row(loaded):
    """`spatial` (no unpad, no newline): the whole image's patches, then the canvas's patch rows left to right."""
    tokenizer, model, image_processor, _ = loaded
    image = random_image(100, 40)  # two tiles side by side
    ids = tokenizer_image_token(PROMPT, tokenizer, return_tensors="pt")[None]
    pixels = process_images([image], image_processor, model.config)
    model.config.mm_patch_merge_type = "spatial"
    try:
        with torch.no_grad():
            mm = model.prepare_inputs_labels_for_multimodal(ids, None, None, pixels, [image.size])
            views = model.encode_images(pixels[0])
    finally:
        model.config.mm_patch_merge_type = "spatial_unpad"
    side = int(len(views[0]) ** 0.5)
    left, right = views[1:].unflatten(1, (side, side))
    expected = torch.cat([views[0], torch.cat([left, right], dim=1).flatten(0, 1)])
    assert torch.equal(mm.inputs_embeds[0][mm.visual_mask[0]], expected)


def test_anyres_needs_image_sizes(loaded):
    tokenizer, model, image_processor, _ = loaded
    ids = tokenizer_image_token(PROMPT, tokenizer, return_tensors="pt")[None]
    pixels = process_images([random_image(100, 40)], image_processor, model.config)
    with pytest.raises(ValueError, match="need image_sizes"):
        model(input_ids=ids, images=pixels)
    with pytest.raises(ValueError, match="has 2x2 tiles under image_grid_pinpoints, but 2 came"):
        model(input_ids=ids, images=pixels, image_sizes=[(200, 200)])
