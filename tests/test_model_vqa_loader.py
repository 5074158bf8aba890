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
    ["--exit-mode", "fixed", "--exit-layer", "1", "--num_beams", "2"],
    ["--exit-stages", "prune:random:1:0.5"],
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
    prunes = "fastv" in mode or "--exit-stages" in mode
    assert record["pruned_visual_tokens"] == (8 if prunes else 0)  # half of the tiny tower's 16 patches
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
    (folder / "a.settings.json").write_text((folder / "complete.settings.json").read_text())
    resumed = run(llava_checkpoint, folder, answers, "--batch-size", "2")
    assert sorted(r["question_id"] for r in resumed) == sorted(ids)
    assert {r["question_id"]: r["text"] for r in resumed} == {r["question_id"]: r["text"] for r in complete}


def test_chunks_split_contiguously(llava_checkpoint, gqa_like):
    folder, ids = gqa_like
    parts = [run(llava_checkpoint, folder, folder / f"2_{i}.jsonl", "--num-chunks", "2", "--chunk-idx", str(i)) for i in range(2)]
    assert [r["question_id"] for part in parts for r in part] == ids
    assert [len(part) for part in parts] == [4, 3]


def test_malformed_question_line_stops_before_model_work(gqa_like, capsys):
    folder, _ = gqa_like
    lines = (folder / "questions.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-5]
    (folder / "questions.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as stopped:
        run("/nonexistent-model", folder, folder / "a.jsonl")
    assert "questions.jsonl:3: invalid JSON" in str(stopped.value)
    assert not (folder / "a.jsonl").exists()


def question_file(folder, questions, name="questions.jsonl"):
    (folder / name).write_text("".join(json.dumps(q) + "\n" for q in questions))
    return folder / name


def run_plain(checkpoint, questions, images, answers, *extra):
    """The loader with only what a user must give (no template, default decoding but greedy)."""
    loader(["--model-path", str(checkpoint), "--question-file", str(questions), "--image-folder", str(images),
            "--answers-file", str(answers), "--temperature", "0", "--max_new_tokens", "4", "--device", "cpu", *extra])
    return [json.loads(line) for line in answers.read_text().splitlines()]


def test_rerun_with_other_settings_stops_naming_the_difference(llava_checkpoint, gqa_like):
    folder, ids = gqa_like
    answers = folder / "a.jsonl"
    first = run(llava_checkpoint, folder, answers, "--exit-mode", "none")
    settings = json.loads((folder / "a.settings.json").read_text())
    assert settings["exit"] == {"mode": "none"} and settings["conv_mode"] == "vicuna_v1"
    for other, named in [(["--exit-mode", "fixed", "--exit-layer", "1"], "exit.mode: 'none' -> 'fixed'"),
                         (["--exit-mode", "none", "--num_beams", "2"], "decoding.num_beams: 1 -> 2")]:
        with pytest.raises(SystemExit) as stopped:
            run(llava_checkpoint, folder, answers, *other)
        assert named in str(stopped.value) and "--overwrite" in str(stopped.value)
    assert answers.read_text().splitlines() == [json.dumps(r) for r in first]  # untouched
    again = run(llava_checkpoint, folder, answers, "--exit-mode", "fixed", "--exit-layer", "1", "--overwrite")
    assert sorted(r["question_id"] for r in again) == sorted(ids)
    assert {r.get("exit_layer") for r in again if "error" not in r} == {1, 0}  # 0: the text-only question


def test_error_records_are_asked_again_and_said(llava_checkpoint, gqa_like, caplog):
    folder, ids = gqa_like
    answers = folder / "a.jsonl"
    wrong = folder / "no-such-folder"
    image_questions = question_file(folder, [json.loads(l) for l in (folder / "questions.jsonl").read_text().splitlines()
                                             if "image" in json.loads(l)], "images_only.jsonl")
    with pytest.raises(SystemExit) as stopped:
        run_plain(llava_checkpoint, image_questions, wrong, answers)
    assert "every question failed" in str(stopped.value) and "6 of 6 questions are error records" in str(stopped.value)
    assert f"{wrong}/0.jpg: image file not found" in str(stopped.value)
    # With the folder fixed, the rerun asks them again: every image found is answered, each question once.
    caplog.clear()
    fixed = run_plain(llava_checkpoint, image_questions, folder / "images", answers)
    assert sorted(r["question_id"] for r in fixed) == sorted(q for q in ids if q != "q-text")
    assert [r["question_id"] for r in fixed if "error" in r] == ["q-missing"]
    assert "1 of 6 questions are error records" in caplog.text and "gone.jpg: image file not found" in caplog.text


def test_image_tags_and_overlong_prompts_are_per_question_records(llava_checkpoint, gqa_like):
    folder, _ = gqa_like
    good = [json.loads(l) for l in (folder / "questions.jsonl").read_text().splitlines()][:4]
    bad = [{"question_id": "two-tags", "image": "1.jpg", "text": "Compare <image> with this."},
           {"question_id": "tag-no-image", "text": "What is in <image>?"},
           {"question_id": "too-long", "image": "2.jpg", "text": "why " * 2100},
           {"question_id": "image-list", "image": ["1.jpg", "2.jpg"], "text": "Which?"},
           {"question_id": "image-number", "image": 7, "text": "Which?"},
           {"question_id": "text-number", "image": "1.jpg", "text": 42}]
    mixed = question_file(folder, [good[0], bad[0], good[1], bad[1], bad[3], good[2], bad[2], bad[4], bad[5], good[3]],
                          "mixed.jsonl")
    records = by_id(run_plain(llava_checkpoint, mixed, folder / "images", folder / "mixed_answers.jsonl", "--batch-size", "4"))
    clean = by_id(run_plain(llava_checkpoint, question_file(folder, good, "good.jsonl"), folder / "images", folder / "good_answers.jsonl"))
    assert records["two-tags"]["error"] == "question two-tags: its prompt holds 2 <image> tag(s) for 1 image(s)"
    assert records["tag-no-image"]["error"] == "question tag-no-image: its prompt holds 1 <image> tag(s) for 0 image(s)"
    assert records["too-long"]["error"].startswith("question too-long: its prompt takes ")
    assert records["too-long"]["error"].endswith("tokens, the model's context 2048")
    assert records["image-list"]["error"] == "question image-list: its 'image' is list ['1.jpg', '2.jpg'], not a file name"
    assert records["image-number"]["error"] == "question image-number: its 'image' is int 7, not a file name"
    assert records["text-number"]["error"] == "question text-number: its 'text' is int, not a string"
    for qid, answer in clean.items():  # the batches' other questions are answered as if alone
        assert records[qid]["text"] == answer["text"]


def test_unfinished_last_line_is_repaired_and_empty_chunks_are_written(llava_checkpoint, gqa_like, caplog):
    folder, ids = gqa_like
    complete = run(llava_checkpoint, folder, folder / "complete.jsonl")
    answers = folder / "a.jsonl"
    lines = (folder / "complete.jsonl").read_text().splitlines()
    answers.write_text(lines[0] + "\n" + lines[1])  # the newline of a whole last answer is missing
    (folder / "a.settings.json").write_text((folder / "complete.settings.json").read_text())
    resumed = run(llava_checkpoint, folder, answers)
    assert sorted(r["question_id"] for r in resumed) == sorted(ids)
    assert {r["question_id"]: r["text"] for r in resumed} == {r["question_id"]: r["text"] for r in complete}
    empty = question_file(folder, [], "empty.jsonl")
    caplog.set_level("INFO")
    assert run_plain(llava_checkpoint, empty, folder / "images", folder / "empty_answers.jsonl") == []
    assert "no questions in this chunk; wrote an empty answers file" in caplog.text


def test_a_second_run_into_the_same_file_is_refused(llava_checkpoint, gqa_like):
    from llava.eval.run_settings import answers_lock

    folder, _ = gqa_like
    with answers_lock(str(folder / "a.jsonl")):
        with pytest.raises(SystemExit) as stopped:
            run(llava_checkpoint, folder, folder / "a.jsonl")
    assert "another run is writing it" in str(stopped.value)
    assert not (folder / "a.jsonl").exists()


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["--num-chunks", "0"], "argument --num-chunks: must be at least 1, got 0"),
])
def test_zero_sizes_get_plain_messages(gqa_like, capsys, flags, message):
    folder, _ = gqa_like
    with pytest.raises(SystemExit):
        run("/nonexistent-model", folder, folder / "a.jsonl", *flags)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--exit-mode", "none", "--exit-layer", "3"], "exit mode 'none' does not use --exit-layer"),
    (["--exit-mode", "fixed", "--exit-layer", "1", "--fastv-r", "0.5"], "exit mode 'fixed' does not use --fastv-r"),
    (["--exit-mode", "fastv", "--fastv-k", "1", "--fastv-r", "0.5", "--exit-threshold", "0.9"],
     "exit mode 'fastv' does not use --exit-threshold"),
    (["--exit-mode", "fixed", "--exit-stages", "prune:random:1:0.5"], "--exit-stages composes its own exit: leave out --exit-mode fixed"),
    (["--exit-stages", "prune:random:1:0.5", "--exit-layer", "2"], "exit mode 'stages' does not use --exit-layer"),
    (["--exit-stages", "prune:random:9:0.5"], "prune layer 9 exceeds the model's 4 layers"),
])
def test_exit_flags_the_mode_ignores_are_errors(llava_checkpoint, gqa_like, flags, message):
    folder, _ = gqa_like
    with pytest.raises(SystemExit) as stopped:
        run(llava_checkpoint, folder, folder / "a.jsonl", *flags)
    assert str(stopped.value) == f"model_vqa_loader: error: {message}"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the machine without CUDA")
def test_cuda_without_a_cuda_device_is_an_error(llava_checkpoint, gqa_like):
    folder, _ = gqa_like
    with pytest.raises(SystemExit) as stopped:
        loader(["--model-path", llava_checkpoint, "--question-file", str(folder / "questions.jsonl"),
                "--answers-file", str(folder / "a.jsonl"), "--device", "cuda"])
    assert str(stopped.value) == "model_vqa_loader: error: --device cuda: torch sees no CUDA device here"


def test_template_comes_from_the_checkpoint_then_from_the_name(llava_checkpoint, gqa_like, tmp_path, caplog):
    import shutil

    folder, _ = gqa_like
    caplog.set_level("INFO")
    questions = folder / "questions.jsonl"
    saved = by_id(run_plain(llava_checkpoint, questions, folder / "images", folder / "saved.jsonl"))
    assert "conversation template vicuna_v1 (saved in the checkpoint's config)" in caplog.text
    explicit = by_id(run(llava_checkpoint, folder, folder / "explicit.jsonl"))  # --conv-mode vicuna_v1
    assert {q: r["text"] for q, r in saved.items()} == {q: r["text"] for q, r in explicit.items()}
    # A foreign checkpoint (no conv_mode saved) falls back to LLaVA's folder-name rule, and says so.
    for name, template in [("my-llava", "llava_v0"), ("llava-v1.5-tiny", "llava_v1")]:
        foreign = tmp_path / name
        shutil.copytree(llava_checkpoint, foreign)
        config = json.loads((foreign / "config.json").read_text())
        del config["conv_mode"]
        (foreign / "config.json").write_text(json.dumps(config))
        caplog.clear()
        run_plain(foreign, questions, folder / "images", folder / f"{name}.jsonl")
        assert f"conversation template {template} (the checkpoint saves none: LLaVA's rule for the folder name {name!r})" in caplog.text
        assert json.loads((folder / f"{name}.settings.json").read_text())["conv_mode"] == template


def test_merge_takes_empty_chunks_and_refuses_mixed_settings(tmp_path):
    from llava.eval.merge import merge_chunks
    from llava.eval.run_settings import write_settings

    settings = {"exit": {"mode": "none"}, "conv_mode": "vicuna_v1"}
    (tmp_path / "2_0.jsonl").write_text('{"question_id": "a"}\n{"question_id": "b"}')  # last newline lost
    (tmp_path / "2_1.jsonl").write_text("")
    for part in ("2_0.jsonl", "2_1.jsonl"):
        write_settings(str(tmp_path / part), settings)
    assert merge_chunks([str(tmp_path / "2_0.jsonl"), str(tmp_path / "2_1.jsonl")], str(tmp_path / "merge.jsonl")) == 2
    assert (tmp_path / "merge.jsonl").read_text() == '{"question_id": "a"}\n{"question_id": "b"}\n'
    assert json.loads((tmp_path / "merge.settings.json").read_text()) == settings
    write_settings(str(tmp_path / "2_1.jsonl"), {**settings, "exit": {"mode": "fixed", "layer": 2}})
    with pytest.raises(ValueError, match=r"2_1.jsonl: made with other settings .*exit.mode: 'none' -> 'fixed'"):
        merge_chunks([str(tmp_path / "2_0.jsonl"), str(tmp_path / "2_1.jsonl")], str(tmp_path / "merge.jsonl"))


def test_records_report_the_vision_side_and_the_equivalent_tokens_apart(llava_checkpoint, gqa_like, tmp_path):
    """VisionZip shortens the LM's input (fewer equivalent tokens and LM TFLOPs) while the vision side's cost, a
    separate number, barely moves; a text-only question costs nothing there."""
    folder, _ = gqa_like
    plain = by_id(run(llava_checkpoint, folder, tmp_path / "none.jsonl", "--exit-mode", "none"))
    zipped = by_id(run(llava_checkpoint, folder, tmp_path / "zip.jsonl", "--exit-stages", "visionzip:5:3"))
    assert plain["q0"]["visual_tokens"] == plain["q0"]["visual_tokens_avg"] > zipped["q0"]["visual_tokens_avg"] == 8
    assert zipped["q0"]["tflops"] < plain["q0"]["tflops"] and zipped["q0"]["vision_tflops"] > 0
    # The tower runs as before; only the projector sees fewer tokens (and the merge adds a little).
    assert 0.5 * plain["q0"]["vision_tflops"] < zipped["q0"]["vision_tflops"] < plain["q0"]["vision_tflops"]
    assert plain["q-text"]["vision_tflops"] == 0 and plain["q-text"]["visual_tokens"] == 0
    # Mode none is the model on the whole image: VisionZip's reduction counts against that.
    assert zipped["q0"]["tflops_full"] == plain["q0"]["tflops"]
