"""`python -m llava.analysis.compare`: every method at the same budgets on one model and question file, one CSV
and one PNG; the budgets are met as measured, and the gates' threshold is calibrated to each budget."""

import csv
import json

import pytest

from llava.analysis.compare import main as compare
from llava.eval.io import read_jsonl

from test_eval_scripts import SPLIT, gqa_root  # noqa: F401 (a fixture)
from test_gate_training import init_checkpoint  # noqa: F401 (a fixture: the tiny checkpoint with fresh gates)


def test_compare_meets_the_budgets_and_calibrates_the_gates(init_checkpoint, gqa_root, tmp_path):  # noqa: F811
    eval_root, _ = gqa_root
    gqa = eval_root / "gqa"
    out = tmp_path / "compare"
    arguments = [
        "--model-path", init_checkpoint, "--question-file", str(gqa / f"{SPLIT}.jsonl"),
        "--image-folder", str(gqa / "data" / "images"), "--truth", str(gqa / "data" / "testdev_balanced_questions.json"),
        "--budgets", "6", "10", "--budget-rules", "equal", "--methods", "fastv", "pdrop", "random", "sparsevlm",
        "--calibration", "1", "--time-questions", "2", "--time-repeats", "1",
        "--thresholds", "0.0", "0.5", "1.0", "--out", str(out), "--batch-size", "2",
    ]
    compare(arguments)
    with open(out / "comparison.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], r["budget"]) for r in rows] == [("none", "")] + [
        (m, b) for b in ("6", "10") for m in ("fastv", "pdrop", "random", "sparsevlm", "dynamic")
    ]
    # SparseVLM's first pruning layer still sees all 16 tokens: 6 is out of its reach on 4 layers, and says so.
    out_of_reach = [r for r in rows if r["questions"] == "0"]
    assert [(r["method"], r["budget"]) for r in out_of_reach] == [("sparsevlm", "6")]
    assert out_of_reach[0]["setting"].startswith("out of reach")
    rows = [r for r in rows if r["questions"] != "0"]
    assert all(r["questions"] == "2" for r in rows)  # the calibration question is not scored
    truth = json.loads((gqa / "data" / "testdev_balanced_questions.json").read_text())
    for row in rows:  # exact match on the two scored questions, by hand (the calibration one is not "missing")
        name = "none" if row["method"] == "none" else (
            f"dynamic-{row['setting'].removeprefix('τ=')}" if row["method"] == "dynamic" else f"{row['method']}-equal{row['budget']}"
        )
        answers = read_jsonl(str(out / "answers" / f"{name}.jsonl"), ("question_id",))[-2:]
        correct = sum(a["text"].rstrip(".").lower() == truth[a["question_id"]]["answer"] for a in answers)
        assert float(row["accuracy"]) == round(100 * correct / 2, 2), row
    for row in rows[1:]:
        if row["method"] != "dynamic":  # a prune keeps whole tokens: within one of the budget
            assert abs(float(row["visual_tokens_avg"]) - float(row["budget"])) <= 1, row
    by = {(r["method"], r["budget"]): r for r in rows}
    assert by["fastv", "6"]["tflops"] == by["random", "6"]["tflops"]  # same budget, same schedule, same FLOPs
    # Calibration: the chosen τ's average on the calibration question is the largest one not above the budget.
    for budget in ("6", "10"):
        tau = float(by["dynamic", budget]["setting"].removeprefix("τ="))
        averages = {t: read_jsonl(str(out / "answers" / f"calibration-dynamic-{t:g}.jsonl"), ("question_id",))[0]["visual_tokens_avg"]
                    for t in (0.0, 0.5, 1.0)}
        fitting = {t: a for t, a in averages.items() if a <= float(budget)}
        expected = max(fitting, key=fitting.get) if fitting else min(averages, key=averages.get)
        assert averages[tau] == averages[expected]
    assert (out / "accuracy_vs_tflops.png").stat().st_size > 0
    assert json.loads((out / "answers" / "pdrop-equal6.settings.json").read_text())["budget"] == {
        "method": "pdrop", "visual_budget": 6.0, "rule": "equal"}
    # the three units side by side: tokens, LM and vision FLOPs, prefill time against none's (1 for none itself)
    assert float(rows[0]["prefill_time_vs_none"]) == 1.0 and all(float(r["prefill_time_vs_none"]) > 0 for r in rows)
    assert all(float(r["vision_tflops"]) > 0 for r in rows)

    # A rerun holding out two questions scores the one left, though the resumed answer files hold two.
    compare(arguments[: arguments.index("--calibration")] + ["--calibration", "2", "--no-dynamic", "--out", str(out)])
    with open(out / "comparison.csv") as handle:
        assert {r["questions"] for r in csv.DictReader(handle) if r["questions"] != "0"} == {"1"}


def compare_arguments(checkpoint, gqa, out, *extra):
    return [
        "--model-path", checkpoint, "--question-file", str(gqa / f"{SPLIT}.jsonl"), "--image-folder",
        str(gqa / "data" / "images"), "--truth", str(gqa / "data" / "testdev_balanced_questions.json"),
        "--budgets", "10", "--budget-rules", "equal", "--methods", "fastv", "--thresholds", "0.5", "--time-questions", "0", "--out", str(out), *extra,
    ]


@pytest.mark.parametrize("extra, message", [
    (["--calibration", "3"], "--calibration 3: the question file holds 3, none left to score"),
    (["--calibration", "0"], "--calibration 0 leaves no question to calibrate"),
])
def test_calibration_never_overlaps_the_scored_questions(init_checkpoint, gqa_root, tmp_path, extra, message):  # noqa: F811
    eval_root, _ = gqa_root
    with pytest.raises(SystemExit) as stopped:
        compare(compare_arguments(init_checkpoint, eval_root / "gqa", tmp_path / "out", *extra))
    assert message in str(stopped.value.code)


def test_gates_are_checked_before_any_run(llava_checkpoint, gqa_root, tmp_path):
    eval_root, _ = gqa_root
    with pytest.raises(SystemExit) as stopped:
        compare(compare_arguments(llava_checkpoint, eval_root / "gqa", tmp_path / "out", "--calibration", "1"))
    assert "has no gates to calibrate: train them first, or pass --no-dynamic" in str(stopped.value.code)
    assert not list((tmp_path / "out" / "answers").iterdir())  # not one method ran first


def test_questions_counts_the_scored_ones_and_loader_flags_are_refused(llava_checkpoint, gqa_root, tmp_path, capsys):
    eval_root, truth = gqa_root
    gqa = eval_root / "gqa"
    del truth["202"]  # the truth file covers two of the three questions
    (gqa / "data" / "testdev_balanced_questions.json").write_text(json.dumps(truth))
    compare(compare_arguments(llava_checkpoint, gqa, tmp_path / "out", "--calibration", "0", "--no-dynamic"))
    with open(tmp_path / "out" / "comparison.csv") as handle:
        assert {r["questions"] for r in csv.DictReader(handle)} == {"2"}
    for flag in (["--exit-mode", "none"], ["--temperature", "0.2"], ["--answers-file", "a.jsonl"]):
        with pytest.raises(SystemExit):
            compare(compare_arguments(llava_checkpoint, gqa, tmp_path / "out", "--no-dynamic", *flag))
        assert f"unrecognized arguments: {flag[0]}" in capsys.readouterr().err


def test_gates_after_a_reduction_before_the_llm_get_their_own_rows(init_checkpoint, gqa_root, tmp_path):  # noqa: F811
    """τ = 1 never exits: the row equals the reduction alone; τ = 0 exits after the first layer: fewer visual tokens
    than the reduction alone, never more."""
    eval_root, _ = gqa_root
    rows = {}
    for tau in ("1", "0"):
        out = tmp_path / tau
        compare(compare_arguments(init_checkpoint, eval_root / "gqa", out, "--methods", "divprune", "--no-dynamic",
                                  "--calibration", "1", "--gates-after", "divprune", "--gates-after-threshold", tau))
        with open(out / "comparison.csv") as handle:
            rows[tau] = {r["method"]: r for r in csv.DictReader(handle)}
    alone, never, always = rows["1"]["divprune"], rows["1"]["divprune+gates"], rows["0"]["divprune+gates"]
    assert never["setting"] == alone["setting"] + ",gates:1" and always["setting"] == alone["setting"] + ",gates:0"
    assert (never["accuracy"], never["visual_tokens_avg"]) == (alone["accuracy"], alone["visual_tokens_avg"])
    assert float(never["tflops"]) > float(alone["tflops"])  # the gates it evaluated, and nothing else
    assert float(always["visual_tokens_avg"]) < float(alone["visual_tokens_avg"])
    with pytest.raises(SystemExit) as stopped:
        compare(compare_arguments(init_checkpoint, eval_root / "gqa", tmp_path / "x", "--calibration", "1",
                                  "--gates-after", "divprune"))
    assert "--gates-after divprune: each must be one of --methods too" in str(stopped.value.code)


def test_vtw_and_shortv_rows_come_from_their_own_calibrations_on_the_calibration_questions(
        init_checkpoint, gqa_root, tmp_path):  # noqa: F811
    from llava.analysis.shortv import main as shortv

    eval_root, _ = gqa_root
    gqa, out = eval_root / "gqa", tmp_path / "out"
    compare(compare_arguments(init_checkpoint, gqa, out, "--methods", "fastv", "--no-dynamic", "--calibration", "2",
                              "--calibrated", "vtw", "shortv", "--vtw-first", "1", "--vtw-eta", "1e9"))
    with open(out / "comparison.csv") as handle:
        rows = {r["method"]: r for r in csv.DictReader(handle)}
    assert rows["vtw"]["setting"] == "fixed:1" and rows["vtw"]["budget"] == ""  # any KL is within a huge η
    shortv(["--model-path", init_checkpoint, "--question-file", str(gqa / f"{SPLIT}.jsonl"), "--image-folder",
            str(gqa / "data" / "images"), "--limit", "2", "--output-dir", str(tmp_path)])
    alone = json.loads((tmp_path / "shortv.json").read_text())
    assert rows["shortv"]["setting"] == alone["stages"] and len(alone["replaced"]) == 2  # round(0.6 × 4 layers)
    assert int(rows["shortv"]["questions"]) == int(rows["none"]["questions"])  # scored on the rest only
    with pytest.raises(SystemExit) as stopped:
        compare(compare_arguments(init_checkpoint, gqa, tmp_path / "x", "--methods", "fastv", "--no-dynamic",
                                  "--calibration", "2", "--calibrated", "vtw", "--vtw-first", "1", "--vtw-eta", "-1"))
    assert "VTW: no layer from 1 keeps the mean KL within η = -1" in str(stopped.value.code)
