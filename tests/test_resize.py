"""The downsampling control for dynamic-resolution families (BASELINES.md §10.6): VTC-Bench's smaller image — bicubic
to (⌊w / r⌋, ⌊h / r⌋), JPEG, then the model's own processor — chosen by `--exit-method downsample` on an M-RoPE
family, applied where the loader reads the images, recorded in the settings, refused for LLaVA-1.5."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from llava.eval.answering import Answerer, RunSpec
from llava.model.builder import load_model
from llava.model.checkpoint import Checkpoint
from llava.model.visual_exit.budget import Budget
from llava.model.visual_exit.stages import parse_stages
from llava.model.visual_exit.stages.resize import Resize
from llava.tiny.families import write_tiny_family


def picture(width: int, height: int) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def vtc_bench(image: Image.Image, ratio: int) -> Image.Image:
    """Its lmms-eval wrapper's steps, in plain PIL: integer division of the size, bicubic, JPEG bytes, decoded."""
    width, height = image.size
    smaller = image.resize((width // ratio, height // ratio), Image.BICUBIC)
    buffer = io.BytesIO()
    smaller.save(buffer, format="JPEG")
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def test_the_smaller_image_is_vtc_benchs_and_the_budgets_its_mapping():
    image = picture(101, 67)
    for ratio in (1, 2, 3):
        ours = Resize(float(ratio)).apply(image)
        assert ours.size == (101 // ratio, 67 // ratio)
        assert np.array_equal(np.asarray(ours), np.asarray(vtc_bench(image, ratio)))
    assert parse_stages("resize:2") == (Resize(2.0),)
    with pytest.raises(ValueError, match="0.5 lies outside"):
        parse_stages("resize:0.5")
    # r = √(n / T): 1/r² of the tokens (VTC-Bench's factor ↔ share), at any rule
    assert Resize.at_budget(Budget(64, "paper", layers=32, visual=576)) == "resize:3.0000"
    assert Resize.at_budget(Budget(144, "equal", layers=32, visual=576)) == "resize:2.0000"


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Checkpoint:
    return Checkpoint.resolve(write_tiny_family(str(tmp_path_factory.mktemp("qwen2-vl")), "qwen2-vl"))


def test_a_native_resolution_family_answers_on_the_smaller_image(qwen, tmp_path):
    picture(112, 112).save(tmp_path / "big.png")
    record = {"question_id": "q", "image": "big.png", "text": "What is it?"}
    spec = RunSpec.build(qwen, device="cpu", image_folder=str(tmp_path), exit_method="downsample", visual_budget=4.0, budget_rule="equal",
                         visual_tokens=16)
    assert spec.exit_config.vision_stage == Resize(2.0)  # √(16 / 4)
    assert spec.settings()["exit"] == {"mode": "stages", "stages": "resize:2.0000"}
    assert spec.settings()["budget"] == {"method": "downsample", "visual_budget": 4.0, "rule": "equal"}
    smaller = Resize(2.0).apply(picture(112, 112))
    smaller.save(tmp_path / "small.png")  # lossless: the same pixels
    plain = RunSpec.build(qwen, device="cpu", image_folder=str(tmp_path), exit_mode="none")
    loaded = load_model(qwen, device="cpu")
    with Answerer(loaded, spec) as answerer, torch.inference_mode():
        ours = answerer.prepare(record)
        reference = answerer.with_spec(plain).prepare({**record, "image": "small.png"})
        whole = answerer.with_spec(plain).prepare(record)
        assert torch.equal(ours.inputs["pixel_values"], reference.inputs["pixel_values"])
        assert torch.equal(ours.inputs["input_ids"], reference.inputs["input_ids"])
        assert whole.inputs["image_grid_thw"].prod() == 4 * ours.inputs["image_grid_thw"].prod()  # 1/r² of the patches
        answered = answerer.answer([ours])[0]
        expected = answerer.with_spec(plain).answer([reference])[0]
    assert answered["text"] == expected["text"] and answered["visual_tokens_avg"] == expected["visual_tokens_avg"]


def test_llava_is_refused_a_smaller_image(llava_checkpoint):
    with pytest.raises(ValueError, match="LLaVA-1.5 resizes every image to its tower's size: the same tokens; pool its "
                                         "grid with downsample:S instead"):
        RunSpec.build(Checkpoint.resolve(llava_checkpoint), device="cpu", exit_stages="resize:2")
