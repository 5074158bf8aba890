"""`bash scripts/v1_5/eval/gqa.sh` end to end on CPU: a tiny checkpoint, a GQA-format fixture, LLaVA's layout."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLIT = "llava_gqa_testdev_balanced"


@pytest.fixture
def gqa_root(tmp_path):
    """EVAL_ROOT with gqa/ in LLaVA's layout: three questions, their images and GQA-format truth."""
    gqa = tmp_path / "eval" / "gqa"
    (gqa / "data" / "images").mkdir(parents=True)
    questions, truth = [], {}
    for i, answer in enumerate(["red", "blue", "red"]):
        Image.new("RGB", (40, 30), (200, 40 * i, 10)).save(gqa / "data" / "images" / f"{i}.jpg")
        questions.append({"question_id": f"20{i}", "image": f"{i}.jpg", "category": "default",
                          "text": "What colour is it?\nAnswer the question using a single word or phrase."})
        truth[f"20{i}"] = {"answer": answer, "types": {"structural": "query", "semantic": "attr"}}
    (gqa / f"{SPLIT}.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (gqa / "data" / "testdev_balanced_questions.json").write_text(json.dumps(truth))
    return tmp_path / "eval", truth


def gqa_script(cwd, **env):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=ROOT,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], **env)
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts/v1_5/eval/gqa.sh")], env=env, cwd=cwd,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_run(eval_root, name):
    answers = eval_root / "gqa" / "answers" / SPLIT / name
    merged = [json.loads(line) for line in (answers / "merge.jsonl").read_text().splitlines()]
    return merged, json.loads((answers / "merge.summary.json").read_text())


def test_gqa_script_end_to_end(llava_checkpoint, gqa_root):
    eval_root, truth = gqa_root
    result = gqa_script(ROOT, MODEL_PATH=llava_checkpoint, CKPT="tiny", EVAL_ROOT=str(eval_root), EXIT_MODE="fixed",
                        EXIT_LAYER="1")
    merged, summary = read_run(eval_root, "tiny")
    assert [r["question_id"] for r in merged] == ["200", "201", "202"]
    predictions = json.loads((eval_root / "gqa" / "answers" / SPLIT / "tiny" / "testdev_balanced_predictions.json").read_text())
    # Oracle for the converter and scorer: LLaVA's rule applied here by hand.
    expected = [{"questionId": r["question_id"], "prediction": r["text"].rstrip(".").lower()} for r in merged]
    assert predictions == expected
    correct = sum(p["prediction"] == truth[p["questionId"]]["answer"] for p in expected)
    assert abs(summary["accuracy"] - 100 * correct / 3) < 1e-9  # eval_gqa reports percent
    assert summary["samples"] == 3 and summary["errors"] == 0 and summary["exit_layer"] == 1
    assert 0 < summary["flops_reduction"] < 1
    assert summary["exit"] == "fixed-1" and summary["settings"]["exit"] == {"mode": "fixed", "layer": 1}
    assert "gqa" in result.stdout and "flops_reduction" in result.stdout and "fixed-1" in result.stdout


def test_runs_are_named_by_their_settings_paths_are_the_callers_and_two_chunks_equal_one(llava_checkpoint, gqa_root):
    eval_root, _ = gqa_root
    caller = eval_root.parent
    os.symlink(llava_checkpoint, caller / "ckpt")
    # Relative paths, read from the caller's folder; two chunks on the CPU.
    gqa_script(caller, MODEL_PATH="ckpt", EVAL_ROOT="eval", EXIT_MODE="fixed", EXIT_LAYER="1", CHUNKS="2")
    two_chunks, fixed = read_run(eval_root, "ckpt_fixed-1")
    assert fixed["exit_layer"] == 1
    # Another exit mode on the same model is a new run in a folder of its own, not a resume of the first.
    gqa_script(caller, MODEL_PATH="ckpt", EVAL_ROOT="eval", EXIT_MODE="none")
    _, none = read_run(eval_root, "ckpt_none")
    assert none["exit_layer"] == 4 and none["exit"] == "none" and none["flops_reduction"] == pytest.approx(0.0)
    gqa_script(caller, MODEL_PATH="ckpt", EVAL_ROOT="eval", EXIT_MODE="fixed", EXIT_LAYER="1", CKPT="one-chunk")
    one_chunk, _ = read_run(eval_root, "one-chunk")
    keep = ("question_id", "text", "exit_layer", "tflops", "tflops_full")
    assert [{k: r[k] for k in keep} for r in two_chunks] == [{k: r[k] for k in keep} for r in one_chunk]
    parts = sorted(p.name for p in (eval_root / "gqa" / "answers" / SPLIT / "ckpt_fixed-1").glob("2_*.jsonl"))
    assert parts == ["2_0.jsonl", "2_1.jsonl"]


def test_two_gqa_runs_at_once_each_score_their_own_answers(tmp_path):
    """A sweep's runs share the data folder: each keeps its predictions in its own answers folder (LLaVA's script
    writes one file beside GQA's eval.py, which the other run would overwrite between convert and score)."""
    from concurrent.futures import ThreadPoolExecutor

    from llava.eval.eval_gqa import run_score
    from llava.world.generate import generate

    generate(str(tmp_path / "world"), train=1, test=24, seed=2)
    eval_root = tmp_path / "world" / "eval"
    model = os.path.join(ROOT, "checkpoints", "tiny-world-llava")
    runs = {"none": {"EXIT_MODE": "none"}, "fixed-0": {"EXIT_MODE": "fixed", "EXIT_LAYER": "0"}}
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda name: gqa_script(ROOT, MODEL_PATH=model, CKPT=name, EVAL_ROOT=str(eval_root),
                                              BATCH_SIZE="8", **runs[name]), runs))
    gqa = eval_root / "gqa"
    assert not (gqa / "data" / "testdev_balanced_predictions.json").exists()
    accuracies = {}
    for name in runs:
        merged, summary = read_run(eval_root, name)
        folder = gqa / "answers" / SPLIT / name
        own = run_score(str(gqa / "data" / "testdev_balanced_questions.json"), str(folder / "testdev_balanced_predictions.json"))
        expected = [{"questionId": r["question_id"], "prediction": r["text"].rstrip(".").lower()} for r in merged]
        assert json.loads((folder / "testdev_balanced_predictions.json").read_text()) == expected
        assert summary["accuracy"] == own["accuracy"]
        accuracies[name] = summary["accuracy"]
    assert accuracies["none"] > accuracies["fixed-0"] + 20  # the world model needs its image: the runs do differ


def test_sigterm_stops_the_loader_keeps_the_answers_and_a_rerun_resumes(tmp_path):
    import fcntl
    import signal
    import time

    from llava.world.generate import generate

    generate(str(tmp_path / "world"), train=1, test=300, seed=3)
    eval_root = tmp_path / "world" / "eval"
    model = os.path.join(ROOT, "checkpoints", "tiny-world-llava")
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=ROOT, MODEL_PATH=model, CKPT="stopped",
               EVAL_ROOT=str(eval_root), EXIT_MODE="none", BATCH_SIZE="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    answers = eval_root / "gqa" / "answers" / SPLIT / "stopped"
    part = answers / "1_0.jsonl"
    script = subprocess.Popen(["bash", os.path.join(ROOT, "scripts/v1_5/eval/gqa.sh")], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (part.exists() and part.read_text().count("\n") >= 5) and time.time() < deadline:
        time.sleep(0.2)
    script.send_signal(signal.SIGTERM)
    _, stderr = script.communicate(timeout=120)
    assert script.returncode == 143 and "rerun to resume" in stderr
    with open(answers / "1_0.lock", "w") as lock:  # no loader left behind holding it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    kept = [json.loads(line) for line in part.read_text().splitlines()]
    assert 5 <= len(kept) < 300 and not (answers / "merge.jsonl").exists()
    gqa_script(ROOT, MODEL_PATH=model, CKPT="stopped", EVAL_ROOT=str(eval_root), EXIT_MODE="none", BATCH_SIZE="16")
    merged, summary = read_run(eval_root, "stopped")
    assert sorted(r["question_id"] for r in merged) == sorted({r["question_id"] for r in merged})  # each once
    assert len(merged) == 300 and summary["samples"] == 300
    assert merged[: len(kept)] == kept  # the answers written before the stop are the ones kept


@pytest.mark.parametrize("script", ["textvqa", "mme", "sqa"])
def test_limit_is_refused_where_the_scorer_needs_every_question(llava_checkpoint, tmp_path, script):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=ROOT, MODEL_PATH=llava_checkpoint, LIMIT="5",
               EVAL_ROOT=str(tmp_path), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    result = subprocess.run(["bash", os.path.join(ROOT, f"scripts/v1_5/eval/{script}.sh")], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip() == f"{script}.sh: error: LIMIT: this benchmark's scorer needs every question; " \
        "LIMIT works with gqa.sh and pope.sh (or run llava.eval.model_vqa_loader with --limit and score it yourself)"
