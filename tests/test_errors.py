"""Bad input gives a clear one-line error that names what is wrong."""

import json
import shutil

import pytest
import torch

from llava.conversation import get_conv_template
from llava.mm_utils import tokenizer_image_token
from llava.model.builder import CheckpointError, load_pretrained_model
from llava.model.multimodal_encoder.clip_encoder import VisionTowerNotFoundError


def one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message
    return message


def test_checkpoint_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError) as caught:
        load_pretrained_model(str(tmp_path), device="cpu")
    assert one_line(caught.value) == f"{tmp_path}: no config.json here, not a checkpoint folder"


def test_corrupt_config_names_file_and_line(tmp_path):
    (tmp_path / "config.json").write_text('{\n  "hidden_size": 64,\n  oops\n}')
    with pytest.raises(CheckpointError, match=r"config.json:3: invalid JSON"):
        load_pretrained_model(str(tmp_path), device="cpu")


def test_missing_vision_tower_path(llava_checkpoint, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(llava_checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    config["mm_vision_tower"] = "/nowhere/clip-vit-large-patch14-336"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(VisionTowerNotFoundError) as caught:
        load_pretrained_model(str(broken), device="cpu")
    assert "'/nowhere/clip-vit-large-patch14-336' (mm_vision_tower in config.json)" in one_line(caught.value)


def test_more_image_tags_than_images(loaded, images):
    tokenizer, model, _, _ = loaded
    ids = tokenizer_image_token("<image> and <image>", tokenizer, return_tensors="pt")[None]
    with pytest.raises(ValueError) as caught:
        model(input_ids=ids, images=images[:1])
    assert one_line(caught.value) == "the prompts hold 2 <image> tags but 1 images were given"
    with pytest.raises(ValueError, match="hold 2 <image> tags but 0 images"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="hold 2 <image> tags but 0 images"):
        model.generate(ids, max_new_tokens=1)


def test_unknown_conv_mode():
    with pytest.raises(ValueError) as caught:
        get_conv_template("vicuna_v9")
    assert one_line(caught.value).startswith("unknown conv mode 'vicuna_v9'; known:")


def test_dummy_images_for_text_only_samples_are_accepted(loaded, images):
    """LLaVA's training batches carry one (unused) image per text-only sample."""
    tokenizer, model, _, _ = loaded
    rows = [tokenizer_image_token(p, tokenizer) for p in ("<image> x", "plain text")]
    width = max(map(len, rows))
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.bool)
    for b, row in enumerate(rows):
        ids[b, : len(row)], mask[b, : len(row)] = torch.tensor(row), True
    with torch.no_grad():
        with_dummy = model(input_ids=ids, attention_mask=mask, images=images[:2]).logits
        without = model(input_ids=ids, attention_mask=mask, images=images[:1]).logits
    assert torch.equal(with_dummy, without)


@pytest.mark.parametrize("architecture, model_type", [
    ("Idefics3ForConditionalGeneration", "idefics3"), ("Mistral3ForConditionalGeneration", "mistral3"),
])
def test_an_unknown_architecture_is_named_not_taken_for_llava_hf(tmp_path, architecture, model_type):
    """A VLM config nesting a text config (as llava-hf's do) that no family of ours runs: the loader and
    init_weight.py name it, instead of a traceback from reading it as llava-hf."""
    import subprocess
    import sys

    config = {"architectures": [architecture], "model_type": model_type, "text_config": {"hidden_size": 8},
              "vision_config": {}, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as caught:
        load_pretrained_model(str(tmp_path), device="cpu")
    assert one_line(caught.value).startswith(f"{tmp_path}: config.json names {architecture}: neither a LLaVA checkpoint")
    result = subprocess.run([sys.executable, "init_weight.py", "--model-path", str(tmp_path), "--output-dir",
                             str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"config.json names {architecture}" in result.stderr


@pytest.mark.parametrize("kind", ["llava", "qwen2-vl"])
def test_a_checkpoint_without_tokenizer_files_is_refused(tmp_path, kind):
    """Without them transformers built an empty tokenizer for a family checkpoint (one token)."""
    from llava.tiny.llava import TinyGeometry, write_tiny_checkpoint
    from llava.tiny.families import write_tiny_family

    geometry = TinyGeometry(seed=3)
    folder = write_tiny_checkpoint(str(tmp_path / kind), "llava", geometry) if kind == "llava" else \
        write_tiny_family(str(tmp_path / kind), kind, geometry)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / kind / name).unlink()
    with pytest.raises(CheckpointError) as caught:
        load_pretrained_model(folder, device="cpu")
    assert one_line(caught.value).startswith(f"{folder}: no tokenizer files")
