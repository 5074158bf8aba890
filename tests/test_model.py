"""Our LLaVA model against transformers' own LlavaForConditionalGeneration and across checkpoint layouts."""

import json
import os
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration

from llava.constants import IMAGE_TOKEN_INDEX
from llava.model.builder import load_pretrained_model
from llava.mm_utils import tokenizer_image_token

from batching import padded_batch

PROMPTS = [
    "USER: <image>\nWhat is shown? ASSISTANT:",
    "USER: Look at this: <image> and describe the colours in a few words, please. ASSISTANT:",
    "<image>\nshort",
]


def batch_ids(tokenizer, prompts, padding_side):
    return padded_batch(tokenizer, prompts, padding_side)


def expand_for_hf(ids, mask, image_token_id, patches):
    """transformers' layout: each placeholder becomes `patches` image tokens; left padding."""
    rows = []
    for row, row_mask in zip(ids, mask):
        expanded = []
        for token in row[row_mask.bool()].tolist():
            expanded += [image_token_id] * patches if token == IMAGE_TOKEN_INDEX else [token]
        rows.append(expanded)
    width = max(map(len, rows))
    hf_ids = torch.zeros(len(rows), width, dtype=torch.long)
    hf_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        hf_ids[b, width - len(row) :] = torch.tensor(row)
        hf_mask[b, width - len(row) :] = 1
    return hf_ids, hf_mask


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_match_transformers_llava(hf_checkpoint, images, padding_side):
    tokenizer, model, _, _ = load_pretrained_model(hf_checkpoint, device="cpu")
    reference = LlavaForConditionalGeneration.from_pretrained(hf_checkpoint).eval()
    patches = reference.config.image_seq_length
    ids, mask = batch_ids(tokenizer, PROMPTS, padding_side)
    hf_ids, hf_mask = expand_for_hf(ids, mask, reference.config.image_token_id, patches)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, images=images).logits
        position_ids = (hf_mask.cumsum(-1) - 1).clamp(min=0)
        theirs = reference(
            input_ids=hf_ids, attention_mask=hf_mask, position_ids=position_ids, pixel_values=images
        ).logits
    # Our preparation re-pads on the right (LLaVA's default); compare each sample's real tokens.
    for b in range(len(PROMPTS)):
        n = int(hf_mask[b].sum())
        assert torch.equal(torch.isfinite(ours[b, :n]), torch.ones_like(ours[b, :n], dtype=torch.bool))
        assert (ours[b, :n] - theirs[b, -n:]).abs().max() <= 1e-5


def test_both_layouts_load_identical_logits(llava_checkpoint, hf_checkpoint, images):
    logits = []
    for path in (llava_checkpoint, hf_checkpoint):
        tokenizer, model, processor, context_len = load_pretrained_model(path, device="cpu")
        assert type(model).__name__ == "LlavaLlamaForCausalLM" and context_len == 2048
        assert processor.crop_size["height"] == images.shape[-1]
        ids, mask = batch_ids(tokenizer, PROMPTS, "right")
        with torch.no_grad():
            logits.append(model(input_ids=ids, attention_mask=mask, images=images).logits)
    assert torch.equal(logits[0], logits[1])


def test_released_llava_config_and_hub_key_names_load(llava_checkpoint, hf_checkpoint, images, tmp_path):
    """The released liuhaotian config says model_type "llava"; llava-hf Hub files name the CLIP tower
    `vision_tower.vision_model.*`. Both must load to the same model."""
    original = tmp_path / "original"
    shutil.copytree(llava_checkpoint, original)
    config = json.loads((original / "config.json").read_text())
    config.update(model_type="llava", transformers_version="4.31.0", use_mm_proj=True, mm_resampler_type=None)
    (original / "config.json").write_text(json.dumps(config))

    hub = tmp_path / "hub"
    shutil.copytree(hf_checkpoint, hub)
    weights = load_file(hub / "model.safetensors")
    renamed = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in weights.items()}
    save_file(renamed, hub / "model.safetensors", metadata={"format": "pt"})

    logits = []
    for path in (llava_checkpoint, original, hub):
        tokenizer, model, _, _ = load_pretrained_model(str(path), device="cpu")
        ids, mask = batch_ids(tokenizer, PROMPTS[:1], "right")
        with torch.no_grad():
            logits.append(model(input_ids=ids, images=images[:1]).logits)
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])


def test_visual_mask_marks_image_positions(loaded, images):
    tokenizer, model, _, _ = loaded
    patches = model.get_vision_tower().num_patches
    prompts = ["<image> a <image> b", "text only, no image here at all", "c <image>"]
    ids, mask = batch_ids(tokenizer, prompts, "left")
    mm = model.prepare_inputs_labels_for_multimodal(ids, mask, ids.clone(), images, padding_side="right")
    for b, prompt in enumerate(prompts):
        real = tokenizer_image_token(prompt, tokenizer)
        expected = []
        for token in real:
            expected += [True] * patches if token == IMAGE_TOKEN_INDEX else [False]
        n = len(expected)
        assert mm.visual_mask[b, :n].tolist() == expected and not mm.visual_mask[b, n:].any()
        assert mm.attention_mask[b].sum() == n and mm.position_ids[b, :n].tolist() == list(range(n))
        assert (mm.labels[b, :n][torch.tensor(expected)] == -100).all()
    # Features land where the mask says, in image order: sample 0 holds images 0 and 1, sample 2 image 2.
    features = model.encode_images(images)
    assert torch.equal(mm.inputs_embeds[0][mm.visual_mask[0]], features[:2].flatten(0, 1))
    assert torch.equal(mm.inputs_embeds[2][mm.visual_mask[2]], features[2])


def test_saved_model_reloads(loaded, images, tmp_path):
    tokenizer, model, processor, _ = loaded
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    _, reloaded, _, _ = load_pretrained_model(str(tmp_path), device="cpu")
    ids, _ = batch_ids(tokenizer, PROMPTS[:1], "right")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, images=images[:1]).logits, reloaded(input_ids=ids, images=images[:1]).logits)
    assert os.path.isabs(reloaded.config.mm_vision_tower)


def test_attention_implementation_and_dtype_are_selectable(llava_checkpoint):
    _, model, _, _ = load_pretrained_model(llava_checkpoint, device="cpu", attn_implementation="eager", dtype=torch.bfloat16)
    assert model.config._attn_implementation == "eager"
    assert model.dtype == torch.bfloat16 and model.get_vision_tower().dtype == torch.bfloat16


@pytest.mark.parametrize(
    "projector_type, linears", [("linear", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3), ("identity", 0)]
)
def test_projector_types(projector_type, linears):
    from types import SimpleNamespace

    from llava.model.multimodal_projector.builder import build_vision_projector

    hidden = 32 if projector_type == "identity" else 48
    projector = build_vision_projector(SimpleNamespace(mm_projector_type=projector_type, mm_hidden_size=32, hidden_size=hidden))
    assert sum(isinstance(m, torch.nn.Linear) for m in projector.modules()) == linears
    assert projector(torch.zeros(2, 5, 32)).shape == (2, 5, hidden)
    with pytest.raises(ValueError, match="unknown mm_projector_type 'mlp_relu'"):
        build_vision_projector(SimpleNamespace(mm_projector_type="mlp_relu", mm_hidden_size=32, hidden_size=48))


def test_cls_patch_keeps_the_class_token(loaded, images):
    _, model, _, _ = loaded
    tower = model.get_vision_tower()
    patches = tower(images)
    tower.select_feature = "cls_patch"
    try:
        with_cls = tower(images)
    finally:
        tower.select_feature = "patch"
    assert patches.shape[1] == tower.num_patches and with_cls.shape[1] == tower.num_patches + 1
    assert torch.equal(with_cls[:, 1:], patches)
    # Oracle: the features are CLIP's hidden states of the selected layer (-2), computed independently.
    reference = tower.vision_tower(images, output_hidden_states=True).hidden_states
    assert torch.equal(with_cls, reference[len(reference) - 2])


def test_asking_the_decoder_for_hidden_states_leaves_the_image_features_alone(loaded, images):
    """The CLIP tower sits inside the decoder (LLaVA's layout) and reads its hidden_states[-2] on every call; a
    decoder call with output_hidden_states must not make the tower record its layers twice."""
    tokenizer, model, _, _ = loaded
    ids, _ = batch_ids(tokenizer, PROMPTS[:1], "right")
    with torch.no_grad():
        features = model.encode_images(images[:1])
        logits = model(input_ids=ids, images=images[:1]).logits
        mm = model.prepare_inputs_labels_for_multimodal(ids, None, None, images[:1])
        states = model.get_model()(inputs_embeds=mm.inputs_embeds, output_hidden_states=True).hidden_states
        tower_states = model.get_vision_tower().vision_tower(images[:1], output_hidden_states=True).hidden_states
        assert torch.equal(model.encode_images(images[:1]), features)
        assert torch.equal(model(input_ids=ids, images=images[:1]).logits, logits)
    assert len(states) == model.config.num_hidden_layers + 1
    assert len(tower_states) == model.get_vision_tower().config.num_hidden_layers + 1


def test_a_training_sample_cut_at_the_model_max_length_says_so(loaded, images):
    """LLaVA cuts a sample at tokenizer_model_max_length once its image is spliced in; answers past the cut are never
    trained, which a warning says (a prompt cut without answer tokens past it is not worth one)."""
    tokenizer, model, _, _ = loaded
    ids, mask = padded_batch(tokenizer, ["USER: <image>\nWhat is it? ASSISTANT: A red square, small and bright."], "right")
    labels = ids.clone()
    labels[:, :-4] = -100
    model.config.tokenizer_model_max_length = 16 + 6  # the image's 16 tokens and a few of the prompt's
    try:
        with pytest.warns(UserWarning, match="cut there, as LLaVA cuts it: the answers past it are not trained"):
            cut = model.prepare_inputs_labels_for_multimodal(ids, mask, labels, images[:1])
        assert cut.inputs_embeds.shape[1] == 22
        model.config.tokenizer_model_max_length = 200
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model.prepare_inputs_labels_for_multimodal(ids, mask, labels, images[:1])
    finally:
        del model.config.tokenizer_model_max_length
