"""lmms-eval's own CLI with `--model dyvte` on the tiny world, offline, against `scripts/v1_5/eval/gqa.sh`: the same
answers and exit layers per question, the accuracy `eval_gqa` reports, batch 4 equal to batch 1, and the
multiple-choice task scored from our (NLL, greedy) pairs."""

import glob
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval", reason="scripts/test.sh installs lmms-eval (WITH_LMMS_EVAL=1)")

from llava.eval.lmms import TASKS_DIR  # noqa: E402
from llava.eval.lmms.model import cut_at  # noqa: E402
from llava.tiny.families import write_tiny_family  # noqa: E402
from llava.world.generate import generate  # noqa: E402
from llava.world.video import FRAMES, QUESTIONS, generate_videos  # noqa: E402

from test_eval_scripts import SPLIT, gqa_script  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {
    "none": ({"EXIT_MODE": "none"}, "exit_mode=none"),
    "dynamic": ({"EXIT_MODE": "dynamic", "EXIT_THRESHOLD": "0.999"}, "exit_mode=dynamic,exit_threshold=0.999"),
    "fixed": ({"EXIT_MODE": "fixed", "EXIT_LAYER": "3"}, "exit_mode=fixed,exit_layer=3"),
    "fastv": ({"EXIT_MODE": "fastv", "FASTV_K": "2", "FASTV_R": "0.5"}, "exit_mode=fastv,fastv_k=2,fastv_r=0.5"),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder holding playground/data/tiny_world (where the tasks read it) and the world's LLaVA with fresh gates."""
    work = tmp_path_factory.mktemp("lmms")
    generate(str(work / "playground" / "data" / "tiny_world"), train=2, test=16, seed=2)
    subprocess.run([sys.executable, os.path.join(ROOT, "init_weight.py"), "--model-path",
                    os.path.join(ROOT, "checkpoints", "tiny-world-llava"), "--output-dir", str(work / "gated")],
                   check=True, capture_output=True, cwd=ROOT)
    return work


def run_lmms_eval(work, name: str, model_args: str, tasks: str, batch_size: int, processes: int = 1,
                  pretrained: str | None = None) -> subprocess.CompletedProcess:
    """`python -m lmms_eval --model dyvte` (under `accelerate launch` with several processes), on the gated world
    model unless `pretrained` names another."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(work / "datasets"))
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(processes), "--num_machines",
                     "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command = launcher + ["-m", "lmms_eval", "--model", "dyvte", "--model_args",
               f"pretrained={pretrained or work / 'gated'},{model_args}", "--tasks", tasks, "--include_path", TASKS_DIR,
               "--batch_size", str(batch_size), "--device", "cpu", "--output_path", str(work / "lmms" / name),
               "--log_samples"]
    return subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)


def lmms_eval(work, name: str, model_args: str, tasks: str, batch_size: int, processes: int = 1,
              pretrained: str | None = None) -> dict:
    """A run that must succeed: its results and logged samples (by task, in doc order)."""
    out = work / "lmms" / name
    result = run_lmms_eval(work, name, model_args, tasks, batch_size, processes, pretrained)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(open(glob.glob(str(out / "*" / "*_results.json"))[0]).read())
    samples = {}
    for task in tasks.split(","):
        path = glob.glob(str(out / "*" / f"*_samples_{task}.jsonl"))[0]
        samples[task] = sorted((json.loads(line) for line in open(path)), key=lambda s: s["doc_id"])
    return {"results": results, "samples": samples}


def gqa_run(work, name: str, env: dict) -> tuple[list[dict], dict]:
    gqa_script(ROOT, MODEL_PATH=str(work / "gated"), EVAL_ROOT=str(work / "playground" / "data" / "tiny_world" / "eval"),
               CKPT=name, **env)
    answers = work / "playground" / "data" / "tiny_world" / "eval" / "gqa" / "answers" / SPLIT / name
    records = [json.loads(line) for line in (answers / "merge.jsonl").read_text().splitlines()]
    return records, json.loads((answers / "metrics.json").read_text())


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_lmms_eval_answers_as_gqa_sh_does(workdir, setting):
    env, model_args = SETTINGS[setting]
    records, metrics = gqa_run(workdir, setting, env)
    run = lmms_eval(workdir, setting, model_args, "tiny_world_gqa", batch_size=4)
    samples = run["samples"]["tiny_world_gqa"]
    assert [s["filtered_resps"] for s in samples] == [r["text"] for r in records]
    exits = [s["token_counts"][0]["exit_layer"] for s in samples]
    assert exits == [r["exit_layer"] for r in records]
    assert [s["token_counts"][0]["tflops"] for s in samples] == pytest.approx([r["tflops"] for r in records], rel=1e-12)
    assert run["results"]["results"]["tiny_world_gqa"]["accuracy,none"] == pytest.approx(metrics["accuracy"], abs=1e-9)
    throughput = run["results"]["throughput"]
    assert throughput["avg_exit_layer"] == pytest.approx(sum(exits) / len(exits))
    if setting == "dynamic":
        assert len(set(exits)) > 2  # batches of 4 mixed samples that exit at different layers
        alone = lmms_eval(workdir, "dynamic-batch1", model_args, "tiny_world_gqa", batch_size=1)["samples"]["tiny_world_gqa"]
        assert [(s["filtered_resps"], s["token_counts"][0]["exit_layer"]) for s in alone] == \
            [(s["filtered_resps"], s["token_counts"][0]["exit_layer"]) for s in samples]
        # two processes share the documents out, as `accelerate launch` on GPUs does
        shared = lmms_eval(workdir, "dynamic-2proc", model_args, "tiny_world_gqa", batch_size=4, processes=2)
        assert [(s["filtered_resps"], s["token_counts"][0]["exit_layer"]) for s in shared["samples"]["tiny_world_gqa"]] \
            == [(s["filtered_resps"], s["token_counts"][0]["exit_layer"]) for s in samples]
        assert shared["results"]["results"]["tiny_world_gqa"]["accuracy,none"] == pytest.approx(metrics["accuracy"])


def test_multiple_choice_is_scored_from_our_pairs(workdir):
    run = lmms_eval(workdir, "choice", SETTINGS["fixed"][1], "tiny_world_choice", batch_size=4)
    gqa = workdir / "playground" / "data" / "tiny_world" / "eval" / "gqa"
    truth = json.loads((gqa / "data" / "testdev_balanced_questions.json").read_text())
    questions = [json.loads(line) for line in (gqa / f"{SPLIT}.jsonl").read_text().splitlines()]
    correct, picked = [], set()
    for sample, question in zip(run["samples"]["tiny_world_choice"], questions):
        kind = truth[question["question_id"]]["types"]["structural"]
        choices = sorted({q["answer"] for q in truth.values() if q["types"]["structural"] == kind})
        pairs = sample["filtered_resps"]  # one (NLL, greedy) pair per choice, written as strings
        pairs = [pairs] if len(choices) == 1 else pairs  # lmms-eval unwraps a single request's
        assert len(pairs) == len(choices) and all(greedy in ("True", "False") for _, greedy in pairs)
        chosen = min(range(len(pairs)), key=lambda i: float(pairs[i][0]))
        correct.append(choices[chosen] == truth[question["question_id"]]["answer"])
        picked.add(choices[chosen])
        assert [counts["exit_layer"] for counts in sample["token_counts"]] == [3] * len(choices)
    assert run["results"]["results"]["tiny_world_choice"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    # Many different answers picked: a scorer reading other pairs than ours would not score the same.
    assert len(picked) > 4


@pytest.mark.parametrize("model_args, pretrained, message", [
    ("exit_mode=fixed,exit_layer=2.5", None, "--exit-layer counts layers: a whole number, got 2.5"),
    ("exit_mode=none", "no-such-checkpoint", "no-such-checkpoint: no config.json here"),
    ("exit_mode=none,exit_treshold=0.5", None, "dyvte has no exit_treshold"),
])
def test_model_errors_reach_the_shell(workdir, model_args, pretrained, message):
    """lmms-eval's CLI logs an evaluation error and exits 0; after one of ours the shell sees status 1."""
    result = run_lmms_eval(workdir, "error", model_args, "tiny_world_gqa", batch_size=4, pretrained=pretrained)
    assert result.returncode == 1 and message in result.stdout + result.stderr


def test_video_task_answers_as_the_loader_does(workdir, tmp_path):
    """tiny_world_video on a Qwen2.5-VL checkpoint (tiny, random: the answers are not right, the plumbing is):
    every clip's frames reach the model as a video at the question's fps, with the loader's answers and exit."""
    videos = workdir / "playground" / "data" / "tiny_world" / "eval" / "video"
    generate_videos(str(videos), test=5, seed=1)
    checkpoint = write_tiny_family(str(tmp_path / "qwen"), "qwen2.5-vl", gate_hidden_size=16)
    answers = tmp_path / "loader.jsonl"
    subprocess.run(
        [sys.executable, "-m", "llava.eval.model_vqa_loader", "--model-path", checkpoint, "--question-file",
         str(videos / QUESTIONS), "--image-folder", str(videos / FRAMES), "--answers-file", str(answers),
         "--temperature", "0", "--max_new_tokens", "16", "--exit-mode", "fixed", "--exit-layer", "1", "--device", "cpu"],
        check=True, capture_output=True, cwd=ROOT,
    )
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    run = lmms_eval(workdir, "video", "exit_mode=fixed,exit_layer=1", "tiny_world_video", batch_size=2,
                    pretrained=checkpoint)
    samples = run["samples"]["tiny_world_video"]
    # lmms-eval stops a task without `until` at its default, a blank line: the loader's answer up to it.
    assert [s["filtered_resps"] for s in samples] == [cut_at(r["text"], ["\n\n"]) for r in records]
    assert [s["token_counts"][0]["exit_layer"] for s in samples] == [1] * 5
    assert [s["token_counts"][0]["visual_tokens"] for s in samples] == [r["visual_tokens"] for r in records]


def test_long_answer_tasks_score_each_kind_by_its_rule(workdir, tmp_path):
    """tiny_world_describe / _ground / _read: each task holds its kind's questions only, the loader's answers, and
    the kind's metrics (accuracy by its rule; describe's F1, ground's IoU) as llava.world.long_answers scores them."""
    from llava.world.long_answers import LONG_KINDS, score

    world = workdir / "playground" / "data" / "tiny_world_long_test"
    generate(str(world), train=0, test=24, seed=4, long_kinds=LONG_KINDS)
    gqa = world / "eval" / "gqa"
    answers = tmp_path / "loader.jsonl"
    subprocess.run(
        [sys.executable, "-m", "llava.eval.model_vqa_loader", "--model-path", str(workdir / "gated"), "--question-file",
         str(gqa / "llava_gqa_testdev_balanced.jsonl"), "--image-folder", str(gqa / "data" / "images"),
         "--answers-file", str(answers), "--temperature", "0", "--max_new_tokens", "64", "--exit-mode", "none",
         "--device", "cpu"], check=True, capture_output=True, cwd=ROOT,
    )
    loader = {r["question_id"]: r["text"] for r in map(json.loads, answers.read_text().splitlines())}
    questions = {q["question_id"]: q for q in map(json.loads, (gqa / "llava_gqa_testdev_balanced.jsonl").read_text().splitlines())}
    truth = json.loads((gqa / "data" / "testdev_balanced_questions.json").read_text())
    tasks = [f"tiny_world_{kind}" for kind in LONG_KINDS]
    run = lmms_eval(workdir, "long", "exit_mode=none", ",".join(tasks), batch_size=4)
    for kind, task in zip(LONG_KINDS, tasks):
        samples = run["samples"][task]
        of_kind = [i for i, question in questions.items() if question["category"] == kind]  # the task's docs, in order
        assert of_kind and [s["doc_id"] for s in samples] == list(range(len(of_kind)))
        ids = [of_kind[s["doc_id"]] for s in samples]
        assert [s["filtered_resps"] for s in samples] == [cut_at(loader[i], ["\n\n"]) for i in ids]
        scores = [score(kind, loader[i].rstrip(".").lower(), truth[i]["answer"]) for i in ids]
        metrics = run["results"]["results"][task]
        assert metrics["accuracy,none"] == pytest.approx(100 * sum(s["correct"] for s in scores) / len(scores))
        for measure in {"describe": ["f1"], "ground": ["iou"], "read": []}[kind]:
            assert metrics[f"{measure},none"] == pytest.approx(sum(s[measure] for s in scores) / len(scores))
