"""The evaluation loader as a user runs it: batched == one by one, resumable, error records, bad question files."""

import json

import pytest
from PIL import Image

from llava.eval.model_vqa_loader import main as loader
from llava.eval.summary import summarize

SUFFIX = "\nAnswer the question using a single word or phrase."


@pytest.fixture
def gqa_like(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    questions = []
    for i in range(5):
        Image.new("RGB", (40 + 7 * i, 30), (200, 30 * i, 10)).save(images / f"{i}.jpg")
        questions.append({"question_id": f"q{i}", "image": f"{i}.jpg", "text": f"What colour is thing {i}?{SUFFIX}", "category": "default"})
    questions.append({"question_id": "q-text", "text": f"Is this text only?{SUFFIX}", "category": "default"})
    questions.append({"question_id": "q-missing", "image": "gone.jpg", "text": f"Where?{SUFFIX}", "category": "default"})
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return tmp_path, [q["question_id"] for q in questions]


def run(checkpoint, folder, answers, *extra):
    loader(["--model-path", checkpoint, "--question-file", str(folder / "questions.jsonl"), "--image-folder",
            str(folder / "images"), "--answers-file", str(answers), "--temperature", "0", "--max_new_tokens", "4",
            "--device", "cpu", "--conv-mode", "vicuna_v1", *extra])
    return [json.loads(line) for line in answers.read_text().splitlines()]


def by_id(records):
    return {r["question_id"]: r for r in records}


@pytest.mark.parametrize("mode", [
    ["--exit-mode", "none"],
    ["--exit-mode", "fixed", "--exit-layer", "1"],
    ["--exit-mode", "fastv", "--fastv-k", "1", "--fastv-r", "0.5"],
])
def test_batched_answers_equal_one_by_one(llava_checkpoint, gqa_like, mode):
    folder, ids = gqa_like
    alone = by_id(run(llava_checkpoint, folder, folder / "alone.jsonl", "--batch-size", "1", *mode))
    batched = by_id(run(llava_checkpoint, folder, folder / "batched.jsonl", "--batch-size", "4", *mode))
    assert set(alone) == set(batched) == set(ids)
    for qid in ids:
        assert batched[qid]["text"] == alone[qid]["text"]
        for key in ("exit_layer", "pruned_visual_tokens", "tflops", "tflops_full"):
            assert batched[qid].get(key) == alone[qid].get(key)
    record = alone["q0"]
    assert {"question_id", "prompt", "text", "answer_id", "model_id", "metadata", "latency_ms"} <= set(record)
    assert record["prompt"] == f"What colour is thing 0?{SUFFIX}"
    exit_layer = 1 if "fixed" in mode else 3 + 1  # the tiny checkpoint has 4 layers; FastV keeps half its tokens
    assert record["exit_layer"] == exit_layer and alone["q-text"]["exit_layer"] == 0
    assert record["pruned_visual_tokens"] == (8 if "fastv" in mode else 0)  # half of the tiny tower's 16 patches
    assert (record["tflops"] < record["tflops_full"]) == ("none" not in mode)


def test_missing_image_is_an_error_record_counted_in_the_summary(llava_checkpoint, gqa_like):
    folder, ids = gqa_like
    records = run(llava_checkpoint, folder, folder / "a.jsonl", "--batch-size", "3")
    missing = by_id(records)["q-missing"]
    assert "gone.jpg: image file not found" in missing["error"] and missing["text"] == ""
    summary = summarize(records, "gqa", {"accuracy": 0.5})
    assert summary["samples"] == len(ids) and summary["errors"] == 1 and summary["accuracy"] == 0.5
    assert summary["flops_reduction"] == pytest.approx(0.0)


def test_killed_run_resumes_and_answers_each_question_once(llava_checkpoint, gqa_like):
    folder, ids = gqa_like
    answers = folder / "a.jsonl"
    complete = run(llava_checkpoint, folder, folder / "complete.jsonl", "--batch-size", "2")
    # A run killed after two answers, in the middle of writing the third line.
    lines = (folder / "complete.jsonl").read_text().splitlines()
    answers.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][: len(lines[2]) // 2])
    resumed = run(llava_checkpoint, folder, answers, "--batch-size", "2")
    assert sorted(r["question_id"] for r in resumed) == sorted(ids)
    assert {r["question_id"]: r["text"] for r in resumed} == {r["question_id"]: r["text"] for r in complete}


def test_chunks_split_contiguously(llava_checkpoint, gqa_like):
    folder, ids = gqa_like
    parts = [run(llava_checkpoint, folder, folder / f"3_{i}.jsonl", "--num-chunks", "3", "--chunk-idx", str(i)) for i in range(3)]
    assert [r["question_id"] for part in parts for r in part] == ids
    assert [len(part) for part in parts] == [3, 3, 1]


def test_malformed_question_line_stops_before_model_work(gqa_like, capsys):
    folder, _ = gqa_like
    lines = (folder / "questions.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-5]
    (folder / "questions.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as stopped:
        run("/nonexistent-model", folder, folder / "a.jsonl")
    assert "questions.jsonl:3: invalid JSON" in str(stopped.value)
    assert not (folder / "a.jsonl").exists()
