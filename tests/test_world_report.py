"""`python -m llava.world.report` on synthetic answer folders whose per-question correctness is known: Wilson
intervals against published values, the exact McNemar p-value against a direct binomial sum, the significance
flags, results.json, the table that the quickstart's test parses, and the plot's labels kept apart."""

import json
import math
import statistics
from itertools import combinations

import matplotlib.pyplot as plt
import pytest
from matplotlib.text import Text
from PIL import Image

from llava.world import report
from test_quickstart import table_rows

QUESTIONS = 40
RIGHT_BY_NONE = set(range(30))  # none gets questions 0-29 right, 30-39 wrong
# run folder: (exit settings, budget settings, questions answered right, prefill TFLOPs, mean exit layer)
RUNS = {
    "none": ({"mode": "none"}, None, RIGHT_BY_NONE, 6.0e-4, 8),
    "fixed-0": ({"mode": "fixed", "layer": 0}, None, set(range(10)), 3.0e-4, 0),
    # one question lost, one gained: no difference
    "dynamic-0.9": ({"mode": "dynamic", "threshold": 0.9}, None, RIGHT_BY_NONE - {0} | {30}, 5.0e-4, 5),
    # 6 lost, 1 gained: -12.5 points, yet p = 2 * (1 + 7) / 2**7 = 0.125
    "dynamic-0.5": ({"mode": "dynamic", "threshold": 0.5}, None, RIGHT_BY_NONE - set(range(6)) | {30}, 4.9e-4, 4),
    # 7 lost, none gained: p = 2 / 2**7, significant though the two Wilson intervals overlap; 17.5 points below none
    "fastv-2-0.5": ({"mode": "fastv", "fastv_k": 2, "fastv_r": 0.5}, None, RIGHT_BY_NONE - set(range(7)), 5.05e-4, 8),
    "dynamic+fastv-0.9-2-0.5": (
        {"mode": "dynamic+fastv", "threshold": 0.9, "fastv_k": 2, "fastv_r": 0.5}, None, RIGHT_BY_NONE - {0}, 4.9e-4, 5,
    ),
    "pdrop-equal20": (
        {"mode": "stages"}, {"method": "pdrop", "visual_budget": 20, "rule": "equal"}, RIGHT_BY_NONE - {29} | {31}, 4.95e-4, 8,
    ),
}
SIGNIFICANT = {"none": False, "fixed-0": True, "dynamic-0.9": False, "dynamic-0.5": False, "fastv-2-0.5": True,
               "dynamic+fastv-0.9-2-0.5": False, "pdrop-equal20": False}


def truth() -> dict:
    """GQA-layout truth: the 40 balanced questions (odd ones of kind "query", even ones "verify"), and one unbalanced
    that scoring skips."""
    questions = {f"q{i}": {"answer": "red" if i % 2 else "yes", "types": {"structural": "query" if i % 2 else "verify"}}
                 for i in range(QUESTIONS)}
    questions["unbalanced"] = {"answer": "no", "types": {"structural": "verify"}, "isBalanced": False}
    return questions


def write_answers(root, questions: dict, runs: dict = RUNS) -> None:
    """One folder per run as gqa.sh leaves it: merge.jsonl and merge.summary.json."""
    for folder, (exit_settings, budget, right, tflops, exit_layer) in runs.items():
        (root / folder).mkdir(parents=True)
        answers = [
            {"question_id": question_id,
             # LLaVA's converter drops trailing periods and lower-cases: "Red." is right
             "text": question["answer"].capitalize() + "." if index in right else "blue",
             "exit_layer": exit_layer, "tflops": tflops, "tflops_full": 6.0e-4}
            for index, (question_id, question) in enumerate(questions.items())
        ]
        (root / folder / "merge.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
        settings = {"exit": exit_settings, "exit_label": folder}
        if budget is not None:
            settings["budget"] = budget
        summary = {"accuracy": len(right) / QUESTIONS * 100, "exit_layer": exit_layer, "tflops": tflops,
                   "flops_reduction": 1 - tflops / 6.0e-4, "settings": settings}
        (root / folder / "merge.summary.json").write_text(json.dumps(summary))


def report_on(runs: dict, tmp_path):
    """The report's output folder for these runs, written under tmp_path with an explicit truth file."""
    answers_root = tmp_path / "gqa" / "answers" / "split" / "quickstart"
    questions_path = tmp_path / "truth.json"
    questions_path.write_text(json.dumps(truth()))
    write_answers(answers_root, truth(), runs)
    out = tmp_path / "results"
    report.main(["--answers-root", str(answers_root), "--out", str(out), "--questions", str(questions_path)])
    return out


@pytest.fixture
def gqa_layout(tmp_path):
    """(answers root, truth file) laid out as quickstart.sh leaves them: GQADIR/answers/SPLIT/quickstart/RUN."""
    answers_root = tmp_path / "gqa" / "answers" / "llava_gqa_testdev_balanced" / "quickstart"
    questions_path = tmp_path / "gqa" / "data" / "testdev_balanced_questions.json"
    questions_path.parent.mkdir(parents=True)
    questions_path.write_text(json.dumps(truth()))
    write_answers(answers_root, truth())
    return answers_root, questions_path


def binomial_two_sided(successes: int, trials: int) -> float:
    """Exact two-sided binomial test at p = 1/2 by summing every outcome no likelier than the one observed."""
    pmf = [math.comb(trials, k) * 0.5**trials for k in range(trials + 1)]
    return min(1.0, sum(p for p in pmf if p <= pmf[successes] * (1 + 1e-12)))


@pytest.mark.parametrize("correct, n, low, high", [  # Newcombe (1998), Stat. Med. 17:857, Table I, method 3
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),
])
def test_wilson_interval_matches_published_values(correct, n, low, high):
    assert report.wilson_interval(correct, n) == pytest.approx((low, high), abs=5e-5)


@pytest.mark.parametrize("only_first, only_second", [(1, 6), (6, 1), (0, 6), (0, 20), (3, 3), (0, 0), (12, 30)])
def test_mcnemar_exact_is_the_binomial_test_on_discordant_pairs(only_first, only_second):
    expected = binomial_two_sided(only_first, only_first + only_second)
    assert report.mcnemar_exact(only_first, only_second) == pytest.approx(expected, rel=1e-9)


def test_mcnemar_exact_by_hand():
    assert report.mcnemar_exact(1, 6) == 2 * (1 + 7) / 2**7 == 0.125  # 2 * (C(7, 0) + C(7, 1)) / 2**7
    assert report.mcnemar_exact(0, 6) == 2 / 2**6
    assert report.mcnemar_exact(4, 4) == report.mcnemar_exact(0, 0) == 1.0


def test_results_json_table_and_plots(gqa_layout, tmp_path):
    answers_root, _ = gqa_layout
    out = tmp_path / "results"
    report.main(["--answers-root", str(answers_root), "--out", str(out)])  # the truth file found from the layout

    payload = json.loads((out / "results.json").read_text())
    assert (payload["confidence"], payload["alpha"]) == (0.95, 0.05)
    rows = {row["label"]: row for row in payload["runs"]}
    assert list(rows) == [
        "none", "dynamic-0.5", "dynamic-0.9", "fixed-0", "fastv-2-0.5", "dynamic+fastv-0.9-2-0.5", "pdrop-equal20",
    ]
    for label, row in rows.items():
        _, _, right, tflops, exit_layer = RUNS[label]
        lost, gained = len(RIGHT_BY_NONE - right), len(right - RIGHT_BY_NONE)
        low, high = report.wilson_interval(len(right), QUESTIONS)
        assert (row["n"], row["correct"]) == (QUESTIONS, len(right))
        assert row["accuracy"] == pytest.approx(100 * len(right) / QUESTIONS)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((100 * low, 100 * high))
        assert row["difference_vs_none"] == pytest.approx(100 * (gained - lost) / QUESTIONS)
        assert row["p_value"] == pytest.approx(binomial_two_sided(lost, lost + gained), rel=1e-9)
        assert row["significant"] is SIGNIFICANT[label]
        assert (row["tflops"], row["exit_layer"]) == (tflops, exit_layer)
    assert rows["dynamic-0.5"]["p_value"] == pytest.approx(0.125)
    assert rows["fastv-2-0.5"]["ci_high"] > rows["none"]["ci_low"]  # overlapping intervals, a significant pair
    assert rows["fastv-2-0.5"]["settings"] == {"fastv_k": 2.0, "fastv_r": 0.5}
    assert (rows["pdrop-equal20"]["mode"], rows["pdrop-equal20"]["settings"]) == ("pdrop-equal", {"visual_budget": 20})

    # Still the six cells tests/test_quickstart.py reads: accuracy, CI + difference, exit layer, FLOPs, reduction.
    table = table_rows((out / "table.md").read_text())
    assert list(table) == list(rows)
    for label, (accuracy, versus, exit_layer, _, reduction) in table.items():
        row = rows[label]
        assert float(accuracy) == round(row["accuracy"], 1) and float(exit_layer) == row["exit_layer"]
        assert reduction == f"{100 * row['flops_reduction']:.1f} %"
        star = "*" if row["significant"] else ""
        assert versus == f"[{row['ci_low']:.1f}, {row['ci_high']:.1f}]; {row['difference_vs_none']:+.1f}{star}"
    assert table["fixed-0"][1] == "[14.2, 40.2]; -50.0*"  # 10 of 40: Wilson (0.1418, 0.4019)

    # Per kind, by hand from each run's right questions: "query" the odd ones, "verify" the even ones (20 each).
    for label, row in rows.items():
        right = RUNS[label][2]
        odd = sum(index % 2 for index in right)
        assert row["per_kind"] == pytest.approx({"verify": 5 * (len(right) - odd), "query": 5 * odd})
    assert rows["dynamic-0.5"]["per_kind"] == {"verify": 65.0, "query": 60.0}  # 6..30: 13 even, 12 odd
    per_kind = (out / "per_kind.md").read_text().split("\n\n")[0].splitlines()  # then the exits per kind
    assert per_kind[0] == "| run | verify (n = 20) | query (n = 20) |"
    assert per_kind[2:] == [
        f"| {label} | {row['per_kind']['verify']:.1f} | {row['per_kind']['query']:.1f} |" for label, row in rows.items()
    ]

    for plot in ("accuracy_vs_tflops.png", "exit_layer_histogram.png"):
        with Image.open(out / plot) as image:
            assert image.format == "PNG" and image.size[0] > 500 and image.size[1] > 400


def test_zoom_panel_and_labels_apart(gqa_layout):
    answers_root, questions_path = gqa_layout
    runs = report.load_runs(str(answers_root), str(questions_path))
    figure = report.accuracy_figure(runs)
    overview, zoom = figure.axes
    figure.canvas.draw()  # as savefig does: places the annotations' text
    renderer = figure.canvas.get_renderer()
    # Runs more than 15 points below none (fixed-0, FastV) are labelled in the overview, the crowd in the zoom.
    assert sorted(text.get_text() for text in overview.texts) == ["K=0", "R=0.5"]
    assert sorted(text.get_text() for text in zoom.texts) == ["T=20", "τ=0.5", "τ=0.9", "τ=0.9, K=2, R=0.5"]
    assert 57.5 < zoom.get_ylim()[0] < 62.5 - 1 and zoom.get_ylim()[1] > 75.0
    for axes in (overview, zoom):  # every run, with its Wilson interval as error bar
        bars = {(x, y): segment[:, 1].tolist() for bar in axes.containers
                for x, y, segment in zip(*bar.lines[0].get_data(), bar.lines[2][0].get_segments())}
        assert len(bars) == len(runs)
        assert bars[0.6, 75.0] == pytest.approx([100 * bound for bound in report.wilson_interval(30, QUESTIONS)])
    for axes in (overview, zoom):
        frame = axes.get_window_extent(renderer)
        boxes = [Text.get_window_extent(text, renderer) for text in axes.texts]  # the words, not their leaders
        assert all(frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1) for box in boxes)
        assert not any(a.overlaps(b) for a, b in combinations(boxes, 2))
    assert figure.legends and not overview.get_legend()  # the legend below the panels, not over the data
    plt.close(figure)


def test_truth_file_must_reproduce_each_summary(gqa_layout, tmp_path):
    answers_root, _ = gqa_layout
    other = truth()
    other["q0"]["answer"] = "no"  # none (and others) answered q0 right under the real truth
    wrong_truth = tmp_path / "other.json"
    wrong_truth.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="--questions"):
        report.load_runs(str(answers_root), str(wrong_truth))
    # Outside gqa.sh's layout there is no default truth file to find.
    with pytest.raises(ValueError, match="pass --questions"):
        report.default_questions(str(tmp_path))


def test_equal_flops_against_interpolated_curves(tmp_path):
    """Each dynamic run against the fixed curve (ending at none) and the FastV K=2 curve (from fixed 2 to none), read
    off by hand: the brackets, the weights, the paired gap and its normal 95 % interval from the per-question
    differences."""
    runs = {**RUNS, "fixed-2": ({"mode": "fixed", "layer": 2}, None, set(range(20)), 4.0e-4, 2)}
    out = report_on(runs, tmp_path)
    rows = {(row["label"], row["baseline"]): row for row in json.loads((out / "results.json").read_text())["equal_flops"]}
    brackets = {  # (run, curve): (cheaper run, dearer run)
        ("dynamic-0.9", "fixed K"): ("fixed-2", "none"), ("dynamic-0.9", "FastV K=2"): ("fixed-2", "fastv-2-0.5"),
        ("dynamic-0.5", "fixed K"): ("fixed-2", "none"), ("dynamic-0.5", "FastV K=2"): ("fixed-2", "fastv-2-0.5"),
        ("dynamic+fastv-0.9-2-0.5", "fixed K"): ("fixed-2", "none"),
        ("dynamic+fastv-0.9-2-0.5", "FastV K=2"): ("fixed-2", "fastv-2-0.5"),
    }
    assert set(rows) == set(brackets)
    for (label, curve), (below, above) in brackets.items():
        row = rows[label, curve]
        assert row["between"] == [below, above]
        cost, low_cost, high_cost = runs[label][3], runs[below][3], runs[above][3]
        weight = (cost - low_cost) / (high_cost - low_cost)
        assert row["weight"] == pytest.approx(weight)
        gaps = [(q in runs[label][2]) - (1 - weight) * (q in runs[below][2]) - weight * (q in runs[above][2])
                for q in range(QUESTIONS)]
        half = 1.959964 * statistics.stdev(gaps) / math.sqrt(QUESTIONS)
        assert row["difference"] == pytest.approx(100 * statistics.mean(gaps))
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((100 * (statistics.mean(gaps) - half),
                                                                 100 * (statistics.mean(gaps) + half)), abs=1e-4)
        assert row["significant"] is (abs(statistics.mean(gaps)) > half)
        interpolated = (1 - weight) * len(runs[below][2]) + weight * len(runs[above][2])
        assert row["baseline_accuracy"] == pytest.approx(100 * interpolated / QUESTIONS)
    # dynamic 0.9 (30 of 40) lies far above the fixed curve there (half way from fixed 2's 20 to none's 30: 25).
    assert rows["dynamic-0.9", "fixed K"]["significant"] and rows["dynamic-0.9", "fixed K"]["difference"] > 0
    assert "| dynamic-0.9 | 0.5 | fixed K | fixed-2 and none | 62.5 | 75.0 | +12.5*" in (out / "equal_flops.md").read_text()


def test_a_run_outside_a_curve_is_not_compared_with_it(gqa_layout, tmp_path):
    answers_root, _ = gqa_layout
    report.main(["--answers-root", str(answers_root), "--out", str(tmp_path / "results")])
    rows = json.loads((tmp_path / "results" / "results.json").read_text())["equal_flops"]
    # Without fixed 2 the FastV curve spans 5.05e-4 to 6e-4 only: no dynamic run costs that much.
    assert {row["baseline"] for row in rows} == {"fixed K"}
    assert {row["label"] for row in rows} == {"dynamic-0.9", "dynamic-0.5", "dynamic+fastv-0.9-2-0.5"}


def test_oracle_exit_takes_each_question_out_where_every_later_exit_scores_as_none(tmp_path):
    """Three layers; per question the oracle's K worked out by hand: 0-9 right from K = 1 on (K = 1); 10-24 right
    from K = 2 (K = 2); 25-29 lost by K = 2 (K = 3, no exit); 30-34 and 36-39 wrong at every K, as in none (K = 1);
    35 right at K = 2 only, unlike none (K = 3)."""
    runs = {
        "none": ({"mode": "none"}, None, RIGHT_BY_NONE, 6.0e-4, 3),
        "fixed-1": ({"mode": "fixed", "layer": 1}, None, set(range(10)), 2.0e-4, 1),
        "fixed-2": ({"mode": "fixed", "layer": 2}, None, set(range(25)) | {35}, 4.0e-4, 2),
        "dynamic-0.9": RUNS["dynamic-0.9"],
    }
    out = report_on(runs, tmp_path)
    oracle = json.loads((out / "results.json").read_text())["oracle_exit"]
    exits = {1: 10 + 5 + 4, 2: 15, 3: 5 + 1}
    assert oracle["accuracy"] == 75.0
    assert oracle["exit_layer"] == pytest.approx(sum(k * n for k, n in exits.items()) / QUESTIONS)
    tflops = (exits[1] * 2.0e-4 + exits[2] * 4.0e-4 + exits[3] * 6.0e-4) / QUESTIONS
    assert oracle["tflops"] == pytest.approx(tflops)
    assert oracle["flops_reduction"] == pytest.approx(1 - tflops / 6.0e-4)
    weight = (tflops - 2.0e-4) / (4.0e-4 - 2.0e-4)  # between fixed 1 (10 right) and fixed 2 (26 right)
    assert oracle["fixed_between"] == ["fixed-1", "fixed-2"]
    assert oracle["fixed_accuracy"] == pytest.approx(100 * ((1 - weight) * 10 + weight * 26) / QUESTIONS)
    assert "Per-question oracle exit" in (out / "equal_flops.md").read_text()


def test_oracle_and_gates_per_kind(tmp_path):
    """The oracle test's runs, per kind (odd questions "query", even "verify"), worked out by hand: query's oracle K
    is 1 for 9 questions (1-9, 31, 33, 37, 39), 2 for 7 (11-23), 3 for 4 (25-29, 35); verify's 1 for 10, 2 for 8
    (10-24), 3 for 2 (26, 28). A dynamic run that exits after 2 on query and 5 on verify shows those per kind."""
    runs = {
        "none": ({"mode": "none"}, None, RIGHT_BY_NONE, 6.0e-4, 3),
        "fixed-1": ({"mode": "fixed", "layer": 1}, None, set(range(10)), 2.0e-4, 1),
        "fixed-2": ({"mode": "fixed", "layer": 2}, None, set(range(25)) | {35}, 4.0e-4, 2),
        "dynamic-0.9": RUNS["dynamic-0.9"],
    }
    answers_root = tmp_path / "gqa" / "answers" / "split" / "quickstart"
    questions_path = tmp_path / "truth.json"
    questions_path.write_text(json.dumps(truth()))
    write_answers(answers_root, truth(), runs)
    dynamic = answers_root / "dynamic-0.9" / "merge.jsonl"
    answers = [json.loads(line) for line in dynamic.read_text().splitlines()]
    for index, answer in enumerate(answers):
        answer["exit_layer"] = 2 if index % 2 else 5
    dynamic.write_text("".join(json.dumps(a) + "\n" for a in answers))
    report.main(["--answers-root", str(answers_root), "--out", str(tmp_path / "out"), "--questions", str(questions_path)])
    rows = {line.split(" |")[0].strip("| "): line for line in (tmp_path / "out" / "per_kind.md").read_text().splitlines()
            if line.startswith("| query") or line.startswith("| verify")}
    loaded = report.load_runs(str(answers_root), str(questions_path))
    for kind, counts in (("query", {1: 9, 2: 7, 3: 4}), ("verify", {1: 10, 2: 8, 3: 2})):
        members = [q for q in range(QUESTIONS) if (q % 2 == 1) == (kind == "query")]
        oracle = report.oracle_exit(loaded, members, report.by_kind_rule)
        assert oracle["exit_layer"] == pytest.approx(sum(k * n for k, n in counts.items()) / 20)
        tflops = (counts[1] * 2.0e-4 + counts[2] * 4.0e-4 + counts[3] * 6.0e-4) / 20
        assert oracle["flops_reduction"] == pytest.approx(1 - tflops / 6.0e-4)
        fixed = {"fixed-1": len([q for q in members if q < 10]), "fixed-2": len([q for q in members if q < 25 or q == 35])}
        weight = (tflops - 2.0e-4) / 2.0e-4
        assert oracle["fixed_accuracy"] == pytest.approx(100 * ((1 - weight) * fixed["fixed-1"] + weight * fixed["fixed-2"]) / 20)
        exit_layer = 2 if kind == "query" else 5
        assert rows[f"{kind} (20)"] == (
            f"| {kind} (20) | 75.0 | {oracle['exit_layer']:.2f}; {100 * oracle['flops_reduction']:.1f} % | "
            f"{oracle['fixed_accuracy']:.1f} | 75.0; {exit_layer:.2f} |")
    figure = report.per_kind_figure(loaded)  # a panel per kind, fixed K's curve on its questions, ending at none
    panels = [axes for axes in figure.axes if axes.get_visible()]
    assert [axes.get_title() for axes in panels] == ["verify (n = 20)", "query (n = 20)"]
    fixed = next(line for line in panels[1].get_lines() if line.get_label() == "fixed exit after K")
    assert list(fixed.get_ydata()) == [25.0, 65.0, 75.0]  # odd questions right: 5 of 0-9, 13 of 0-24 and 35, 15
    assert (tmp_path / "out" / "per_kind.png").stat().st_size > 0
    plt.close(figure)


def test_no_oracle_without_every_fixed_exit(gqa_layout, tmp_path):
    answers_root, _ = gqa_layout  # fixed K = 0 only, of L = 8
    report.main(["--answers-root", str(answers_root), "--out", str(tmp_path / "results")])
    assert json.loads((tmp_path / "results" / "results.json").read_text())["oracle_exit"] is None
    assert "oracle exit: not computed" in (tmp_path / "results" / "equal_flops.md").read_text()


def test_runs_at_0_and_100_percent(tmp_path):
    """The intervals' outer bounds are exactly 0 and 100 (computed, they landed a rounding error inside, and the
    plot's error bars came out negative)."""
    runs = {"none": ({"mode": "none"}, None, set(range(QUESTIONS)), 6.0e-4, 8),
            "fixed-0": ({"mode": "fixed", "layer": 0}, None, set(), 3.0e-4, 0)}
    assert report.wilson_interval(0, QUESTIONS)[0] == 0.0 and report.wilson_interval(QUESTIONS, QUESTIONS)[1] == 1.0
    out = report_on(runs, tmp_path)
    rows = {row["label"]: row for row in json.loads((out / "results.json").read_text())["runs"]}
    assert rows["none"]["ci_high"] == 100.0 and rows["none"]["ci_low"] < 100.0
    assert rows["fixed-0"]["ci_low"] == 0.0 and rows["fixed-0"]["ci_high"] > 0.0
    assert (out / "accuracy_vs_tflops.png").stat().st_size > 0


def test_each_model_is_compared_with_its_own_none(tmp_path):
    """A folder with two models' runs is refused unless --model picks one; the baseline is then that model's."""
    answers_root = tmp_path / "gqa" / "answers" / "split" / "mixed"
    questions_path = tmp_path / "truth.json"
    questions_path.write_text(json.dumps(truth()))
    write_answers(answers_root, truth(), {"none": RUNS["none"], "dynamic-0.9": RUNS["dynamic-0.9"]})
    write_answers(answers_root / "other", truth(), {"none": ({"mode": "none"}, None, set(range(5)), 6.0e-4, 8)})
    (answers_root / "other" / "none").rename(answers_root / "other-none")
    for folder, model in (("none", "/models/a"), ("dynamic-0.9", "/models/a"), ("other-none", "/models/b")):
        path = answers_root / folder / "merge.summary.json"
        summary = json.loads(path.read_text())
        summary["settings"]["model_path"] = model
        path.write_text(json.dumps(summary))
    arguments = ["--answers-root", str(answers_root), "--out", str(tmp_path / "out"), "--questions", str(questions_path)]
    with pytest.raises(SystemExit) as refused:
        report.main(arguments)
    assert "holds runs of 2 models or settings" in str(refused.value.code) and "pass --model PATH" in str(refused.value.code)
    report.main(arguments + ["--model", "/models/a"])
    rows = {row["label"]: row for row in json.loads((tmp_path / "out" / "results.json").read_text())["runs"]}
    assert set(rows) == {"none", "dynamic-0.9"} and rows["none"]["correct"] == len(RIGHT_BY_NONE)
    assert rows["dynamic-0.9"]["difference_vs_none"] == 0.0


@pytest.mark.parametrize("case, message", [
    ("no folder", "no such folder of runs"),
    ("no runs", "no run in it"),
    ("bad summary", "merge.summary.json:1: invalid JSON"),
    ("not a summary", "not a run summary with accuracy"),
    ("no truth", "truth.json: file not found"),
])
def test_bad_input_is_one_line(tmp_path, case, message):
    answers_root = tmp_path / "runs"
    truth_path = tmp_path / "truth.json"
    if case != "no truth":
        truth_path.write_text(json.dumps(truth()))
    if case != "no folder":
        answers_root.mkdir()
    if case in ("bad summary", "not a summary", "no truth"):
        write_answers(answers_root, truth(), {"none": RUNS["none"]})
        summary = answers_root / "none" / "merge.summary.json"
        summary.write_text({"bad summary": "{", "not a summary": "[]", "no truth": summary.read_text()}[case])
    with pytest.raises(SystemExit) as stopped:
        report.main(["--answers-root", str(answers_root), "--out", str(tmp_path / "out"), "--questions", str(truth_path)])
    assert str(stopped.value.code).startswith("report: error: ") and message in str(stopped.value.code)
    assert "\n" not in str(stopped.value.code)


def test_every_method_and_rule_has_a_curve_style_of_its_own():
    """A budgeted mode without a style would fail the plot; two methods sharing a marker could not be told apart
    where colours repeat (more curves than colours)."""
    assert set(report.BUDGETED.values()) <= set(report.STYLES)
    markers = {report.STYLES[mode][0][0] for (method, rule), mode in report.BUDGETED.items()}
    assert len(markers) == len({method for method, _ in report.BUDGETED})


def test_long_answers_scored_by_each_kinds_rule_and_by_answer_length(tmp_path):
    """describe by exact match and per-object F1, ground by IoU ≥ 0.5 and mean IoU, read by exact match (GQA's lower
    case); the summary's accuracy stays GQA's exact match, which the report re-checks. Values worked out by hand."""
    objects = "small red circle, large blue square"
    kinds = ["describe", "describe", "ground", "ground", "read", "read", "colour", "colour"]
    answers = [objects, objects, "[0, 0, 9, 9]", "[0, 0, 9, 9]", "k4", "k4", "red", "red"]
    truth = {f"q{i}": {"answer": a, "types": {"structural": k}} for i, (k, a) in enumerate(zip(kinds, answers))}
    said = {"none": [objects, "small red circle", "[0, 0, 9, 9]", "[5, 0, 14, 9]", "K4", "K", "red", "blue"],
            "fixed-2": ["", "", "none", "[20, 20, 29, 29]", "", "", "blue", "blue"]}
    root = tmp_path / "gqa" / "answers" / "split" / "quickstart"
    for name, texts in said.items():
        (root / name).mkdir(parents=True)
        records = [{"question_id": f"q{i}", "text": text, "exit_layer": 8 if name == "none" else 2, "tflops": 1e-3,
                    "tflops_full": 1e-3} for i, text in enumerate(texts)]
        (root / name / "merge.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        exit_settings = {"mode": "none"} if name == "none" else {"mode": "fixed", "layer": 2}
        summary = {"accuracy": 50.0 if name == "none" else 0.0, "exit_layer": 8 if name == "none" else 2,
                   "tflops": 1e-3, "flops_reduction": 0.0, "settings": {"exit": exit_settings, "exit_label": name}}
        (root / name / "merge.summary.json").write_text(json.dumps(summary))
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    report.main(["--answers-root", str(root), "--out", str(tmp_path / "out"), "--questions", str(tmp_path / "truth.json")])
    long_table, length_table = (tmp_path / "out" / "long_answers.md").read_text().strip().split("\n\n")
    none_row = table_rows(long_table)["none"]
    low, high = (100 * bound for bound in report.wilson_interval(1, 2))
    assert none_row[0] == f"50.0 [{low:.1f}, {high:.1f}]; {(1 + 2 / 3) / 2:.3f}"  # one exact; F1 1 and 2/3
    assert none_row[1] == f"50.0 [{low:.1f}, {high:.1f}]; {(1 + 1 / 3) / 2:.3f}"  # IoU 1 and 1/3: one ≥ 0.5
    assert none_row[2].startswith("50.0 [")  # "K4" read as "k4"
    lengths = table_rows(length_table)
    # one word: read and colour (4 questions, none right on 2); 2-4: the boxes; 5+: the descriptions
    header = [cell.strip() for cell in length_table.splitlines()[0].strip("|").split("|")]
    assert header[1:] == ["1 word (n = 4): % ; Δ [95 % CI]", "2-4 (n = 2): % ; Δ [95 % CI]", "5+ (n = 2): % ; Δ [95 % CI]"]
    assert lengths["none"][0].startswith("50.0; +0.0") and lengths["fixed-2"][0].startswith("0.0; -50.0")
