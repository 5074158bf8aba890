"""llava.world.evaluate (the quickstart's one-process evaluation) against `scripts/v1_5/eval/gqa.sh` run once per
setting: the same answers, exit layers, FLOPs, metrics and summary rows; flags a run cannot take fail before any
answer is written."""

import json
import os
import subprocess
import sys

import pytest

from llava.world.evaluate import main
from llava.world.generate import generate

from test_eval_scripts import SPLIT, gqa_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {
    "none": ({"EXIT_MODE": "none"}, "--exit-mode none"),
    "dynamic-0.9": ({"EXIT_MODE": "dynamic", "EXIT_THRESHOLD": "0.9"}, "--exit-mode dynamic --exit-threshold 0.9"),
    "fixed-3": ({"EXIT_MODE": "fixed", "EXIT_LAYER": "3"}, "--exit-mode fixed --exit-layer 3"),
    "fastv-2-0.5": ({"EXIT_MODE": "fastv", "FASTV_K": "2", "FASTV_R": "0.5"}, "--exit-mode fastv --fastv-k 2 --fastv-r 0.5"),
    "pdrop-equal64": ({"EXIT_METHOD": "pdrop", "VISUAL_BUDGET": "64", "BUDGET_RULE": "equal"},
                      "--exit-method pdrop --visual-budget 64 --budget-rule equal"),
}
TIMINGS = ("latency_ms", "prefill_ms", "answer_id")  # measured, or drawn afresh per run


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A small world and the world's LLaVA with fresh gates."""
    work = tmp_path_factory.mktemp("evaluate")
    generate(str(work / "world"), train=2, test=20, seed=4)
    subprocess.run([sys.executable, os.path.join(ROOT, "init_weight.py"), "--model-path",
                    os.path.join(ROOT, "checkpoints", "tiny-world-llava"), "--output-dir", str(work / "gated")],
                   check=True, capture_output=True, cwd=ROOT)
    return work


def without_timings(record: dict) -> dict:
    return {key: value for key, value in record.items() if key not in TIMINGS}


def read(folder):
    answers = [without_timings(json.loads(line)) for line in (folder / "merge.jsonl").read_text().splitlines()]
    summary = without_timings(json.loads((folder / "merge.summary.json").read_text()))
    return answers, json.loads((folder / "metrics.json").read_text()), summary


def test_every_run_writes_what_gqa_sh_writes(workdir):
    gqa = workdir / "world" / "eval" / "gqa"
    ours = workdir / "ours"
    main(["--model-path", str(workdir / "gated"), "--gqa-dir", str(gqa), "--answers-root", str(ours),
          "--batch-size", "8", "--device", "cpu", *(f"--run={name}={flags}" for name, (_, flags) in RUNS.items())])
    exits = set()
    for name, (env, _) in RUNS.items():
        gqa_script(ROOT, MODEL_PATH=str(workdir / "gated"), EVAL_ROOT=str(workdir / "world" / "eval"),
                   CKPT=f"script/{name}", BATCH_SIZE="8", **env)
        answers, metrics, summary = read(ours / name)
        script_answers, script_metrics, script_summary = read(gqa / "answers" / SPLIT / "script" / name)
        assert answers == script_answers, name
        assert metrics == script_metrics, name
        assert summary == script_summary, name
        assert len(answers) == 20
        if name == "dynamic-0.9":
            exits = {answer["exit_layer"] for answer in answers}
    assert len(exits) > 1, "fresh gates should exit these questions at different layers"


def test_a_run_the_checkpoint_cannot_take_fails_before_any_answer(workdir, capsys):
    base = os.path.join(ROOT, "checkpoints", "tiny-world-llava")
    out = workdir / "ungated"
    with pytest.raises(SystemExit) as stop:
        main(["--model-path", base, "--gqa-dir", str(workdir / "world" / "eval" / "gqa"), "--answers-root", str(out),
              "--device", "cpu", "--run", "none=--exit-mode none", "--run", "dynamic=--exit-mode dynamic"])
    assert "gate" in str(stop.value)
    assert not out.exists()


@pytest.mark.parametrize("spec, message", [
    ("none", "NAME=FLAGS"),
    ("a/b=--exit-mode none", "NAME=FLAGS"),
    ("x=--batch-size 2", "--batch-size is this command's"),
    ("x=--model-path elsewhere", "--model-path is this command's"),
])
def test_malformed_runs_are_refused(workdir, spec, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--model-path", str(workdir / "gated"), "--gqa-dir", str(workdir / "world" / "eval" / "gqa"),
              "--answers-root", str(workdir / "refused"), "--device", "cpu", "--run", spec])
    assert message in str(stop.value) + capsys.readouterr().err
    assert not (workdir / "refused").exists()


def test_a_budget_out_of_reach_is_written_down_and_reported(workdir, capsys):
    """On the world's 8 layers, `paper` 64 (22 of its 196 tokens) is below what FastV's one full layer averages: no
    answers for it, the reason in out_of_reach.json and under the report's table; the other runs go on."""
    from llava.world.report import main as report

    out = workdir / "reach"
    main(["--model-path", str(workdir / "gated"), "--gqa-dir", str(workdir / "world" / "eval" / "gqa"),
          "--answers-root", str(out), "--batch-size", "8", "--device", "cpu", "--time-questions", "0",
          "--run", "none=--exit-mode none", "--run", "fastv-paper64=--exit-method fastv --visual-budget 64"])
    unreached = json.loads((out / "out_of_reach.json").read_text())
    assert list(unreached) == ["fastv-paper64"] and unreached["fastv-paper64"].startswith("fastv at 64 tokens (paper rule")
    assert not (out / "fastv-paper64").exists() and (out / "none" / "merge.summary.json").exists()
    report(["--answers-root", str(out), "--out", str(workdir / "reach-report"),
            "--questions", str(workdir / "world" / "eval" / "gqa" / "data" / "testdev_balanced_questions.json")])
    table = (workdir / "reach-report" / "table.md").read_text()
    assert f"fastv-paper64: out of reach: {unreached['fastv-paper64']}" in table
