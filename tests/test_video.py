"""Videos on the families that take them (Qwen2.5-VL, Qwen3-VL, Qwen3.5): frames are visual tokens like an image's
(`video_token_id`), the timestamps Qwen3-VL and Qwen3.5 write between frame groups stay text. Hand-built inputs as
each processor emits them (flat patches of temporal groups, `video_grid_thw`, `mm_token_type_ids` 2 on the video
pads, Qwen2.5-VL's `second_per_grid_ts`), checked against the stock class as the image tests are."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from llava.eval.answering import QuestionError, question_video
from llava.model.builder import load_family_model
from llava.model.families.processing import Video, load_processor
from llava.model.visual_exit import ExitRequest
from llava.tiny.families import write_tiny_family

from families import (
    FAMILIES, HYBRID, TEXT, TIMESTAMPED_VIDEO, Sample, batch, exit_model, greedy_with_and_without_cache,
    masked_stock_forward, sample_inputs, stock_model, visual_mask,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAYERS = TEXT["num_hidden_layers"]
TOLERANCE = 1e-5
VIDEO_FAMILIES = [name for name in ("qwen2.5-vl", "qwen3-vl", "qwen3.5") if name in FAMILIES]
# A two-group video, a video beside an image, a text-only prompt: different lengths, so the batch is padded.
SAMPLES = [Sample(3, [], 4, videos=[(2, 2, 4)]), Sample(2, [(2, 4)], 3, videos=[(1, 4, 4)]), Sample(6, [], 3)]


@pytest.fixture(scope="module", params=VIDEO_FAMILIES)
def family(request):
    stock = stock_model(request.param)
    return request.param, stock, exit_model(stock, gate_hidden_size=None)


def forward(model, inputs, config, **kwargs):
    with torch.no_grad():
        return model(**inputs, exit_config=config, **kwargs)


def test_video_tokens_are_visual_and_none_equals_stock(family):
    name, stock, model = family
    inputs = batch(name, stock, SAMPLES)
    with torch.no_grad():
        reference = stock(**inputs).logits
    ours = forward(model, inputs, ExitRequest("none").expand())
    valid = inputs["attention_mask"].bool()
    assert (ours.logits - reference)[valid].abs().max() <= TOLERANCE
    # 2 groups x 2x4 patches / 4 = 4 video tokens; 2 image + 4 video tokens; none.
    assert ours.exit_stats.num_visual_tokens.tolist() == visual_mask(inputs).sum(dim=1).tolist() == [4, 6, 0]


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_fixed_exit_on_videos_equals_masked_stock(family, layer):
    name, stock, model = family
    if name in HYBRID:
        pytest.skip("linear-attention layers: test_hybrid_linear.py's removal oracle")
    inputs = batch(name, stock, SAMPLES)
    gone_from = torch.where(visual_mask(inputs), layer, LAYERS)
    oracle = masked_stock_forward(stock, inputs, gone_from)
    ours = forward(model, inputs, ExitRequest("fixed", layer).expand())
    text = inputs["attention_mask"].bool() & ~visual_mask(inputs)
    assert (ours.logits - oracle.logits)[text].abs().max() <= TOLERANCE
    assert ours.exit_stats.exit_layer.tolist() == [layer, layer, 0]


@pytest.mark.parametrize("config", [ExitRequest("fixed", 1).expand(), ExitRequest("stages", stages="prune:random:1:0.5").expand()],
                         ids=["fixed", "random-pruning"])
def test_padded_batch_of_videos_equals_each_alone(family, config):
    name, stock, model = family
    inputs = batch(name, stock, SAMPLES)
    batched = forward(model, inputs, config)
    valid = inputs["attention_mask"].bool()
    for b in range(len(SAMPLES)):
        alone = forward(model, sample_inputs(name, stock, inputs, SAMPLES, b), config)
        assert (batched.logits[b, valid[b]] - alone.logits[0]).abs().max() <= TOLERANCE, b
        assert batched.exit_stats.layer_tokens[b].tolist() == alone.exit_stats.layer_tokens[0].tolist()


def test_cached_decoding_with_videos_equals_recompute(family):
    name, stock, model = family
    inputs = batch(name, stock, SAMPLES)
    cached, recomputed = greedy_with_and_without_cache(model, inputs, ExitRequest("fixed", 1).expand(), steps=4)
    assert torch.equal(cached, recomputed)
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=TEXT["pad_token_id"])
    with torch.no_grad():
        stock_ids = stock.generate(**inputs, **settings)
        none_ids = model.generate(**inputs, exit_config=ExitRequest("none").expand(), **settings)
    assert torch.equal(none_ids, stock_ids)


# --- from pre-extracted frames: the processor, the loader ---------------------------------------------------------

def frames(count: int, size=(56, 56), seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module", params=VIDEO_FAMILIES)
def video_checkpoint(request, tmp_path_factory):
    return request.param, write_tiny_family(str(tmp_path_factory.mktemp(request.param)), request.param)


def test_a_video_of_one_repeated_frame_is_that_image(video_checkpoint):
    """Independent of our layout: the image processor repeats an image over each temporal patch, so a video whose
    frames are all that image has the image's pixels, grid and (through the tower) features."""
    name, folder = video_checkpoint
    processor = load_processor(folder)
    picture = frames(1)[0]
    image = processor.prompt_inputs([{"from": "human", "value": "<image>\nWhat is it?"}], [picture])
    video = processor.prompt_inputs([{"from": "human", "value": "<video>\nWhat is it?"}], videos=[Video([picture] * 2)])
    assert torch.equal(video["pixel_values_videos"], image["pixel_values"])
    assert torch.equal(video["video_grid_thw"], image["image_grid_thw"])
    model = load_family_model(folder)[1]
    with torch.no_grad():
        from_image = model.model.get_image_features(image["pixel_values"], image["image_grid_thw"], return_dict=True)
        from_video = model.model.get_video_features(video["pixel_values_videos"], video["video_grid_thw"], return_dict=True)
    assert torch.equal(torch.cat(from_image.pooler_output), torch.cat(from_video.pooler_output))


def test_frames_become_pads_timestamps_and_groups_as_the_processor_writes_them(video_checkpoint):
    """Three 56 px frames at 2 fps: padded to two temporal groups of 4x4 patches (Qwen3-VL's 16 px patches: 64 px),
    4 pads per group; Qwen3-VL and Qwen3.5 write each group's mean time before its own run (0.25 s, 1.0 s: the third
    frame repeated), Qwen2.5-VL one run and 1 s per group."""
    name, folder = video_checkpoint
    processor = load_processor(folder)
    inputs = processor.prompt_inputs([{"from": "human", "value": "<video>\nWhat shape?"}], videos=[Video(frames(3), 2.0)])
    tokenizer = processor.tokenizer
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 4]]
    pads = inputs["input_ids"][0] == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert int(pads.sum()) == 8 and torch.equal(inputs["mm_token_type_ids"][0] == 2, pads)
    text = tokenizer.decode(inputs["input_ids"][0])
    if name in TIMESTAMPED_VIDEO:
        assert "<0.2 seconds><|vision_start|>" + "<|video_pad|>" * 4 + "<|vision_end|><1.0 seconds><|vision_start|>" in text
    else:
        assert "<|vision_start|>" + "<|video_pad|>" * 8 + "<|vision_end|>" in text
        assert inputs["second_per_grid_ts"].tolist() == [1.0]
    # Each group holds its two frames side by side: group 1 is frame 2 twice (padding), group 0 frames 0 and 1.
    patch = inputs["pixel_values_videos"].view(2, 16, 3, 2, -1)
    assert torch.equal(patch[1, :, :, 0], patch[1, :, :, 1]) and not torch.equal(patch[0, :, :, 0], patch[0, :, :, 1])


def test_video_questions_through_the_loader_equal_each_alone(video_checkpoint, tmp_path):
    """model_vqa_loader with a question file naming frame folders (and a text-only question in the same batch):
    its batched answers == the model greedy on each question alone, the exit after layer 1 for those with a video."""
    name, folder = video_checkpoint
    for index, count in enumerate((2, 3)):
        clip = tmp_path / "frames" / f"clip{index}"
        clip.mkdir(parents=True)
        for number, frame in enumerate(frames(count, seed=index)):
            frame.save(clip / f"{number:03d}.png")
    questions = [{"question_id": i, "video": f"clip{i}", "fps": 1.0 + i, "text": "What moves?"} for i in range(2)]
    questions.append({"question_id": 2, "text": "Say something."})
    question_file = tmp_path / "q.jsonl"
    question_file.write_text("".join(json.dumps(q) + "\n" for q in questions))
    answers = tmp_path / "a.jsonl"
    subprocess.run(
        [sys.executable, "-m", "llava.eval.model_vqa_loader", "--model-path", folder, "--question-file", str(question_file),
         "--image-folder", str(tmp_path / "frames"), "--answers-file", str(answers), "--batch-size", "3",
         "--exit-mode", "fixed", "--exit-layer", "1", "--max_new_tokens", "4", "--temperature", "0", "--device", "cpu"],
        check=True, capture_output=True, cwd=ROOT,
    )
    records = {r["question_id"]: r for r in map(json.loads, answers.read_text().splitlines())}
    assert [records[i]["exit_layer"] for i in range(3)] == [1, 1, 0]
    processor = load_processor(folder)
    model = load_family_model(folder)[1]
    for question in questions:
        videos = [question_video(question, str(tmp_path / "frames"))] if "video" in question else []
        inputs = processor.question_inputs(question["text"], videos=videos)
        with torch.no_grad():
            out = model.generate(**inputs, exit_config=ExitRequest("fixed", 1).expand(), do_sample=False, max_new_tokens=4)
        expected = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert records[question["question_id"]]["text"] == expected, (question, records[question["question_id"]])


def test_bad_video_records_are_named(tmp_path):
    with pytest.raises(QuestionError, match="question 7: its 'video'"):
        question_video({"question_id": 7, "video": "missing-folder"}, str(tmp_path))
    with pytest.raises(QuestionError, match="question 8: its 'fps' 0 is not a positive number"):
        (tmp_path / "f").mkdir()
        frames(1)[0].save(tmp_path / "f" / "0.png")
        question_video({"question_id": 8, "video": "f", "fps": 0}, str(tmp_path))
