"""Accuracy against cost for a set of evaluation runs, with their uncertainty: a table, a JSON file and PNGs.

    python -m llava.world.report --answers-root ANSWERS --out RESULTS [--questions testdev_balanced_questions.json]

ANSWERS holds one folder per run, each with the `merge.jsonl` and `merge.summary.json` that
`scripts/v1_5/eval/gqa.sh` writes. Which exit a run used (none, dynamic τ, fixed K, FastV K R, dynamic+FastV, a
reduction method at a visual budget T) is read from the settings its answers were made with, not from the folder's
name; rows are named by those settings (`dynamic-0.9`, `fastv-2-0.5`, ...).

Each run's answers are scored again question by question against the GQA truth file (`--questions`; by default
gqa.sh's GQADIR/data/testdev_balanced_questions.json, GQADIR being the folder above ANSWERS' `answers/`: the tiny
world's eval/gqa for the quickstart) with `llava.eval.eval_gqa`'s rule, which must give the summary's accuracy.
That per-question correctness gives
- a 95 % Wilson score interval for each accuracy (n questions; unlike the normal approximation it stays inside
  [0, 100] and is not degenerate at 0 or 100 %), and
- each run against mode `none` on the same questions: the exact McNemar test (two-sided binomial test of the
  questions only one of the two runs got right), significant at p < 0.05. Each comparison is tested on its own: with
  many runs, some differences will pass by chance.

At equal cost, each dynamic run (and dynamic+FastV run) is compared with the fixed-exit curve and each FastV curve,
interpolated linearly in FLOPs between the two runs that bracket its cost. The fixed curve ends at no exit (K = L);
a FastV curve at K runs from R = 0 (no exit) to R = 1 (fixed K), both exactly those runs. Per question the run's
correctness minus the curve's (the two bracketing runs' weighted) is a paired difference; its mean is the accuracy
gap and mean ± 1.96 standard errors its 95 % interval (normal approximation; significant when it excludes 0).
With every fixed K run, the report also gives the per-question oracle exit: each question exits at the earliest
K ≥ 1 from which every fixed K answers it as well as no exit does. It keeps no exit's accuracy; its cost, against
fixed K's accuracy there, is the room per-input exits have over one layer for all on these questions.

Writes RESULTS/table.md (the CI and the difference from none, `*` where significant, share one column; below it
the runs whose budget was out of their method's reach, with the reason), RESULTS/
costs.md (each run's cost in three units: visual tokens per layer, LM and vision FLOPs, measured prefill time
against none's where the evaluation timed it), RESULTS/per_kind.md (each run's accuracy per question kind, GQA's
structural type; then per kind the oracle exit, fixed K at its cost and each dynamic run's mean exit layer),
RESULTS/long_answers.md (with long kinds: each by its own rule, and by the length of the right answer),
RESULTS/equal_flops.md (the gaps at equal cost), RESULTS/results.json (every run's figures and the gaps, for other
tools), RESULTS/accuracy_vs_tflops.png (error bars; all runs, and a zoom on the runs within 15 points of none),
RESULTS/per_kind.png (a panel per kind: fixed K, dynamic, the methods and the oracle on its questions) and
RESULTS/exit_layer_histogram.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass
from statistics import NormalDist

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

from llava.eval.eval_gqa import balanced_answers, convert_gqa, load_questions  # noqa: E402
from llava.eval.io import EvalInputError, read_json, read_jsonl  # noqa: E402
from llava.eval.prefill_time import PREFILL_TIME  # noqa: E402
from llava.world.evaluate import OUT_OF_REACH  # noqa: E402
from llava.model.visual_exit.budget import RULES  # noqa: E402
from llava.model.visual_exit.stages import METHODS  # noqa: E402
from llava.world.long_answers import LONG_KINDS, score  # noqa: E402

# Each mode's settings (symbol: the field of the run's recorded exit settings), in the order its label gives them.
SETTINGS = {
    "none": {},
    "dynamic": {"τ": "threshold"},
    "fixed": {"K": "layer"},
    "fastv": {"K": "fastv_k", "R": "fastv_r"},
    "dynamic+fastv": {"τ": "threshold", "K": "fastv_k", "R": "fastv_r"},
}
# Reduction methods run at a visual budget T by a rule (llava.model.visual_exit.budget): one setting, T. Their modes
# here, apart from modes fastv / fixed: one per method and rule.
BUDGETED = {(method, rule): f"{method}-{rule}" for method in METHODS for rule in RULES}
SETTINGS.update({mode: {"T": "visual_budget"} for mode in BUDGETED.values()})
SETTINGS["stages"] = {}  # any other stage list (ShortV's layers, a reduction with the gates after it): a point each
MODES = tuple(SETTINGS)
STYLES = {  # mode: (line style, legend)
    "fixed": ("s--", "fixed exit after K"),
    "dynamic": ("o-", "dynamic exit (τ)"),
    "fastv": ("^:", "FastV, K={K:g} (R)"),
    "dynamic+fastv": ("D", "dynamic + FastV"),
    **{mode: (marker + ("-." if rule == "paper" else ":"), f"{method}, {rule} budget T")
       for ((method, rule), mode), marker in zip(BUDGETED.items(), (m for m in "v<>phx+*d8H1234" for _ in RULES))},
    "stages": ("X", "{name}"),
}
# More curves than the default cycle's 10 colours: tab20's dark shades first, then its light ones, then again (the
# markers still tell curves apart). Error bars are drawn fainter than their points, which crowd between them.
COLORS = [plt.get_cmap("tab20")(index) for index in (*range(0, 20, 2), *range(1, 20, 2))]
CONFIDENCE = 0.95
ALPHA = 0.05  # significance level of each run's test against none
ZOOM_BAND = 15.0  # the zoomed panel holds the runs within this many points of none's accuracy
DPI = 120
# Where a point's label may go, nearest first: (dx, dy) in points from the point, on rings of growing radius; a label
# beyond the first ring gets a leader line back to its point.
DIRECTIONS = ((1, 0.5), (1, -1), (-1, 0.5), (-1, -1), (0, 1), (0, -1.4))
LABEL_SPOTS = [(dx * radius, dy * radius) for radius in (6, 14, 24) for dx, dy in DIRECTIONS]


def z_score(confidence: float) -> float:
    """The two-sided normal quantile of `confidence` (1.96 at 95 %)."""
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(correct: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion `correct / n` (as fractions)."""
    z = z_score(confidence)
    share = correct / n
    scale = 1 + z * z / n
    centre = (share + z * z / (2 * n)) / scale
    half = z / scale * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    # At 0 or n correct one bound is the share itself; computed, it lands a rounding error beside it (1e-19, or just
    # under 1), on the wrong side of the point.
    low = 0.0 if correct == 0 else min(share, centre - half)
    high = 1.0 if correct == n else max(share, centre + half)
    return low, high


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value: under no difference, each discordant question (right in one run only) is
    equally likely either way, so the smaller count is Binomial(discordant, 1/2); the tail is doubled (capped at 1)."""
    discordant = only_first + only_second
    tail = sum(math.comb(discordant, k) for k in range(min(only_first, only_second) + 1))
    return min(1.0, 2 * tail / 2**discordant)  # integer division by a power of two: exact up to the final rounding


@dataclass
class Run:
    name: str
    mode: str
    settings: tuple[float, ...]
    accuracy: float
    exit_layer: float
    tflops: float
    flops_reduction: float
    exit_layers: list[int]
    correct: tuple[bool, ...]  # per question, in the truth file's order: the same for every run, so runs pair up
    kinds: tuple[str, ...]  # per question in that order, its GQA structural type (the tiny world's question kind)
    costs: tuple[float | None, ...]  # per question in that order, its prefill TFLOPs (None: no answer record)
    # The other two units of cost: visual tokens entering a layer on average, the vision side's TFLOPs (None for a
    # family model), and the measured prefill time as a ratio to none's (None where the runs were not timed).
    visual_tokens_avg: float | None = None
    vision_tflops: float | None = None
    prefill_ratio: float | None = None
    # per question in that order: a long answer's score by its kind's rule (llava.world.long_answers), else None
    graded: tuple[dict | None, ...] = ()
    exits: tuple[int | None, ...] = ()  # per question in that order, the layer its visual tokens left after

    @property
    def per_kind(self) -> dict[str, float]:
        """Accuracy (%) on each kind of question, kinds in the order they first appear."""
        right: dict[str, list[bool]] = {}
        for kind, correct in zip(self.kinds, self.correct):
            right.setdefault(kind, []).append(correct)
        return {kind: 100 * sum(marks) / len(marks) for kind, marks in right.items()}

    @property
    def setting(self) -> dict[str, float]:
        return dict(zip(SETTINGS[self.mode], self.settings))

    @property
    def interval(self) -> tuple[float, float]:
        """95 % Wilson interval of the accuracy, in percent."""
        low, high = wilson_interval(sum(self.correct), len(self.correct))
        return 100 * low, 100 * high

    def against(self, reference: Run) -> tuple[float, float]:
        """(accuracy difference in points, exact McNemar p-value) of this run against `reference`."""
        pairs = list(zip(self.correct, reference.correct))
        only_self = sum(mine and not theirs for mine, theirs in pairs)
        only_reference = sum(theirs and not mine for mine, theirs in pairs)
        return self.accuracy - reference.accuracy, mcnemar_exact(only_self, only_reference)


def recorded_run(summary_path: str, summary: dict) -> tuple[str, str, tuple[float, ...]]:
    """(name, mode, settings) of a run, from the settings its answers were made with (never from its folder)."""
    settings = summary.get("settings") or {}
    exit_settings = settings.get("exit")
    if exit_settings is None or "exit_label" not in settings:
        raise ValueError(f"{summary_path}: records no exit settings; rerun its evaluation")
    budget = settings.get("budget")
    if budget is not None:  # a method at a budget: named and plotted by the method, not by its stage list
        # before the rules were named, every budget was the equal-average one
        return settings["exit_label"], BUDGETED[budget["method"], budget.get("rule", "equal")], (float(budget["visual_budget"]),)
    mode = exit_settings["mode"]
    if mode not in SETTINGS:
        raise ValueError(f"{summary_path}: exit mode {mode!r} is not one this report plots ({', '.join(MODES)})")
    return settings["exit_label"], mode, tuple(float(exit_settings[field]) for field in SETTINGS[mode].values())


def default_questions(answers_root: str) -> str:
    """gqa.sh's truth file for answers under GQADIR/answers/SPLIT/...: GQADIR/data/testdev_balanced_questions.json."""
    folder = os.path.abspath(answers_root)
    while os.path.basename(folder) != "answers":
        if os.path.dirname(folder) == folder:
            raise ValueError(f"{answers_root}: not inside gqa.sh's answers/ folder; pass --questions")
        folder = os.path.dirname(folder)
    return os.path.join(os.path.dirname(folder), "data", "testdev_balanced_questions.json")


def question_scores(questions: dict, answers: list[dict], source: str) -> tuple[tuple, tuple, tuple, tuple, tuple]:
    """Per balanced question of the truth file: whether the answers got it right by `eval_gqa`'s rule, its kind,
    the prefill TFLOPs and the exit layer its answer record gives (None where it has none: a missing answer or an
    error record), and for a long answer (describe, ground, read) its score by its kind's own rule (None for the
    others)."""
    cost = {str(answer["question_id"]): answer.get("tflops") for answer in answers}  # the last record wins, as scoring
    exit_layer = {str(answer["question_id"]): answer.get("exit_layer") for answer in answers}
    question_ids = {id(question): str(question_id) for question_id, question in questions.items()}  # scoring yields these
    scored = list(balanced_answers(questions, convert_gqa(answers, source)))
    kinds = tuple(question["types"]["structural"] for question, _, _ in scored)
    graded = tuple(score(kind, prediction or "", question["answer"]) if kind in LONG_KINDS else None
                   for kind, (question, prediction, _) in zip(kinds, scored))
    ids = [question_ids[id(question)] for question, _, _ in scored]
    return (tuple(correct for _, _, correct in scored), kinds, tuple(cost.get(i) for i in ids), graded,
            tuple(exit_layer.get(i) for i in ids))


# The settings a run records that say which exit it ran; all the others (model, template, decoding, device) say
# which model answered, and a report compares runs of one model only.
EXIT_FIELDS = ("exit", "exit_label", "budget")
SUMMARY_FIELDS = ("accuracy", "exit_layer", "tflops", "flops_reduction", "settings")


def model_of(summary: dict) -> str:
    """The model-side settings of a run, as a key runs of the same model share."""
    settings = summary.get("settings") or {}
    return json.dumps({k: v for k, v in settings.items() if k not in EXIT_FIELDS}, sort_keys=True)


def one_model(summaries: dict[str, dict], answers_root: str, model: str | None) -> dict[str, dict]:
    """The summaries of the runs of one model: `model` (a path) picks it, else there must be only one."""
    if model is not None:
        wanted = os.path.abspath(model)
        summaries = {p: s for p, s in summaries.items() if (s.get("settings") or {}).get("model_path") == wanted}
        if not summaries:
            raise ValueError(f"{answers_root}: no run of --model {model}")
    models = Counter(model_of(summary) for summary in summaries.values())
    if len(models) > 1:
        described = "; ".join(
            f"{count} runs of {json.loads(key).get('model_path')} ({', '.join(f'{k}={v}' for k, v in json.loads(key).items() if k != 'model_path')})"
            for key, count in models.items()
        )
        raise ValueError(
            f"{answers_root} holds runs of {len(models)} models or settings: {described}. Each needs its own 'none' "
            "run: pass --model PATH, or point --answers-root at one model's runs"
        )
    return summaries


def load_runs(answers_root: str, questions_path: str, model: str | None = None) -> list[Run]:
    if not os.path.isdir(answers_root):
        raise ValueError(f"{answers_root}: no such folder of runs")
    questions = load_questions(questions_path)
    summaries = {}
    for name in sorted(os.listdir(answers_root)):
        summary_path = os.path.join(answers_root, name, "merge.summary.json")
        if os.path.isfile(summary_path):
            summary = read_json(summary_path)
            if not isinstance(summary, dict) or not all(key in summary for key in SUMMARY_FIELDS):
                raise ValueError(f"{summary_path}: not a run summary with {', '.join(SUMMARY_FIELDS)} "
                                 "(llava.eval.summary writes them)")
            summaries[summary_path] = summary
    if not summaries:
        raise ValueError(f"{answers_root}: no run in it (folders holding merge.summary.json, as gqa.sh writes them)")
    timing_path = os.path.join(answers_root, PREFILL_TIME)
    timing = read_json(timing_path)["runs"] if os.path.isfile(timing_path) else {}
    runs = []
    for summary_path, summary in one_model(summaries, answers_root, model).items():
        folder = os.path.dirname(summary_path)
        run_name, mode, settings = recorded_run(summary_path, summary)
        answers_path = os.path.join(folder, "merge.jsonl")
        answers = read_jsonl(answers_path, ("question_id",))
        if any("error" not in answer and "exit_layer" not in answer for answer in answers):
            raise ValueError(f"{answers_path}: answers without their exit_layer; rerun its evaluation")
        correct, kinds, costs, graded, exits = question_scores(questions, answers, answers_path)
        rescored = sum(correct) / len(correct) * 100  # in eval_gqa's order of operations
        if not math.isclose(rescored, summary["accuracy"], abs_tol=1e-9):
            raise ValueError(
                f"{answers_path}: scores {rescored:.4g} % against {questions_path}, its summary "
                f"{summary['accuracy']:.4g} %: not the questions it was scored on; pass the right --questions"
            )
        runs.append(Run(
            run_name, mode, settings, summary["accuracy"], summary["exit_layer"], summary["tflops"],
            summary["flops_reduction"], [a["exit_layer"] for a in answers if "error" not in a], correct, kinds, costs,
            summary.get("visual_tokens_avg"), summary.get("vision_tflops"),
            timing.get(os.path.basename(folder), {}).get("ratio"), graded, exits,
        ))
    if not any(run.mode == "none" for run in runs):
        raise ValueError(f"{answers_root}: no 'none' run to compare against")
    return sorted(runs, key=lambda run: (MODES.index(run.mode), run.settings))


def reference_run(runs: list[Run]) -> Run:
    return next(run for run in runs if run.mode == "none")


def results(runs: list[Run]) -> dict:
    """Every run's figures, as results.json holds them: settings by their recorded field names (`threshold`,
    `fastv_k`, `visual_budget`, ...), accuracies and their interval in percent, the difference from none in points."""
    reference = reference_run(runs)
    rows = []
    for run in runs:
        difference, p_value = run.against(reference)
        low, high = run.interval
        rows.append({
            "label": run.name, "mode": run.mode, "settings": dict(zip(SETTINGS[run.mode].values(), run.settings)),
            "n": len(run.correct),
            "correct": sum(run.correct), "accuracy": run.accuracy, "ci_low": low, "ci_high": high,
            "tflops": run.tflops, "flops_reduction": run.flops_reduction, "exit_layer": run.exit_layer,
            "difference_vs_none": difference, "p_value": p_value, "significant": p_value < ALPHA,
            "per_kind": run.per_kind, "visual_tokens_avg": run.visual_tokens_avg, "vision_tflops": run.vision_tflops,
            "prefill_time_vs_none": run.prefill_ratio,
        })
    return {"confidence": CONFIDENCE, "alpha": ALPHA, "test": "exact McNemar against mode none", "runs": rows,
            "equal_flops": equal_flops(runs), "oracle_exit": oracle_exit(runs)}


def baseline_curves(runs: list[Run]) -> dict[str, list[Run]]:
    """{name: runs by cost} of the curves a dynamic run is compared with at equal FLOPs, each with its exact ends."""
    reference = reference_run(runs)
    fixed = {run.setting["K"]: run for run in runs if run.mode == "fixed"}
    curves = {"fixed K": [*fixed.values(), reference]} if fixed else {}
    for k in sorted({run.setting["K"] for run in runs if run.mode == "fastv"}):
        members = [run for run in runs if run.mode == "fastv" and run.setting["K"] == k] + [reference]
        curves[f"FastV K={k:g}"] = members + ([fixed[k]] if k in fixed else [])
    return {name: sorted(members, key=lambda run: run.tflops) for name, members in curves.items()}


def bracketing(curve: list, tflops: float, cost=lambda run: run.tflops) -> tuple[object, object, float] | None:
    """(cheaper point, dearer point, weight of the dearer) of a curve sorted by `cost` at `tflops`; None outside its
    range. The points are runs, or whatever `cost` reads a cost from."""
    below, above = next(((a, b) for a, b in zip(curve, curve[1:]) if cost(a) <= tflops <= cost(b)), (None, None))
    if below is None:
        return None
    low, high = cost(below), cost(above)
    return below, above, (tflops - low) / (high - low) if high > low else 0.0


def kind_point(run: Run, members: list[int], marks: list[bool]) -> tuple[float, float]:
    """(mean prefill cost, accuracy %) of a run on the questions `members`, right or not by `marks`."""
    costs = [run.costs[q] for q in members if run.costs[q] is not None]
    return sum(costs) / max(1, len(costs)), 100 * sum(marks[q] for q in members) / len(members)


def oracle_exit(runs: list[Run], members: list[int] | None = None, rule=lambda run: run.correct) -> dict | None:
    """The exit a gate that foresaw every answer would take: per question (of `members`, by default all), the earliest
    K ≥ 1 (the first gate decides after layer 0) from which every fixed K, and no exit, score it as no exit does by
    `rule` (run -> right or not per question; GQA's exact match unless given). It keeps no exit's accuracy exactly,
    so its cost bounds what per-input exits can save on these questions, and fixed K's accuracy on them at that cost
    is the room they have over one layer for all. None unless fixed K = 1 … L−1 ran, with a cost on every answer."""
    reference = reference_run(runs)
    layers = max(reference.exit_layers, default=0)
    fixed = {int(run.setting["K"]): run for run in runs if run.mode == "fixed"}
    ladder = [fixed.get(k) for k in range(1, layers)] + [reference]  # ladder[i]: the visual tokens leave after K = i+1
    if layers < 2 or None in ladder or any(None in run.costs for run in ladder):
        return None
    members = range(len(reference.correct)) if members is None else members
    marks = [rule(run) for run in ladder]
    exits, costs = [], []
    for question in members:
        step = len(ladder) - 1
        while step > 0 and marks[step - 1][question] == marks[-1][question]:
            step -= 1
        exits.append(step + 1)
        costs.append(ladder[step].costs[question])
    # fixed K's curve on these questions, cheapest first: ((cost, accuracy), name) per run, none's the dearest
    curve = sorted(((kind_point(run, members, mark), run.name) for run, mark in zip(ladder, marks)))
    tflops = sum(costs) / len(costs)
    # every question's cost grows with K, so the oracle's mean lies on the curve
    ((_, low), low_name), ((_, high), high_name), weight = bracketing(curve, tflops, cost=lambda point: point[0][0])
    (full_cost, accuracy), _ = curve[-1]
    return {
        "accuracy": accuracy, "tflops": tflops, "flops_reduction": 1 - tflops / full_cost,
        "exit_layer": sum(exits) / len(exits), "fixed_accuracy": (1 - weight) * low + weight * high,
        "fixed_between": [low_name, high_name],
    }


def oracle_line(oracle: dict | None, runs: list[Run]) -> str:
    if oracle is None:
        return "Per-question oracle exit: not computed (it needs fixed K for every K from 1 to L-1)."
    unit, scale = flops_unit(runs)
    return (
        f"Per-question oracle exit (the earliest K >= 1 after which every fixed K scores the question as no exit "
        f"does): {oracle['accuracy']:.1f} % at {oracle['tflops'] * scale:.4g} {unit} / sample "
        f"({100 * oracle['flops_reduction']:.1f} % reduction, mean exit layer {oracle['exit_layer']:.2f}); fixed K at "
        f"that cost: {oracle['fixed_accuracy']:.1f} % ({' and '.join(oracle['fixed_between'])})."
    )


def paired_interval(gaps: list[float], z: float) -> tuple[float, float]:
    """(mean, half width) of the Wald interval of paired per-question differences."""
    n = len(gaps)
    mean = sum(gaps) / n
    spread = math.sqrt(sum((gap - mean) ** 2 for gap in gaps) / (n - 1)) if n > 1 else 0.0
    return mean, z * spread / math.sqrt(n)


def equal_flops(runs: list[Run]) -> list[dict]:
    """Each dynamic run against each baseline curve at its own cost (see the module's docstring); a run outside a
    curve's range of FLOPs is not compared with it."""
    z, curves = z_score(CONFIDENCE), baseline_curves(runs)
    rows = []
    for run in (run for run in runs if run.mode in ("dynamic", "dynamic+fastv")):
        for name, curve in curves.items():
            bracket = bracketing(curve, run.tflops)
            if bracket is None:
                continue
            below, above, weight = bracket
            gaps = [mine - ((1 - weight) * low + weight * high)
                    for mine, low, high in zip(run.correct, below.correct, above.correct)]
            mean, half = paired_interval(gaps, z)
            rows.append({
                "label": run.name, "tflops": run.tflops, "baseline": name, "between": [below.name, above.name],
                "weight": weight, "baseline_accuracy": (1 - weight) * below.accuracy + weight * above.accuracy,
                "accuracy": run.accuracy, "difference": 100 * mean, "ci_low": 100 * (mean - half),
                "ci_high": 100 * (mean + half), "significant": half < abs(mean),
            })
    return rows


def equal_flops_table(rows: list[dict], runs: list[Run]) -> str:
    unit, scale = flops_unit(runs)
    lines = [
        f"| run | prefill {unit} / sample | against | interpolated between | its accuracy there (%) | run's accuracy (%) "
        f"| Δ (pt), 95 % CI (* excludes 0) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        star = "*" if row["significant"] else ""
        lines.append(
            f"| {row['label']} | {row['tflops'] * scale:.4g} | {row['baseline']} | {' and '.join(row['between'])} "
            f"| {row['baseline_accuracy']:.1f} | {row['accuracy']:.1f} "
            f"| {row['difference']:+.1f}{star} [{row['ci_low']:+.1f}, {row['ci_high']:+.1f}] |"
        )
    return "\n".join(lines)


def flops_unit(runs: list[Run]) -> tuple[str, float]:
    """GFLOPs for models too small to read in TFLOPs (the tiny world), else TFLOPs."""
    return ("GFLOPs", 1e3) if max(run.tflops for run in runs) < 0.1 else ("TFLOPs", 1.0)


def table(runs: list[Run]) -> str:
    """One row per run; the CI and the difference from none share a column so the columns stay those that readers of
    table.md (tests/test_quickstart.py) parse."""
    reference = reference_run(runs)
    unit, scale = flops_unit(runs)
    lines = [
        f"| run | accuracy (%), n = {len(reference.correct)} | 95 % CI; Δ vs none (pt, * exact McNemar p < {ALPHA:g}) "
        f"| mean exit layer | prefill {unit} / sample | FLOPs reduction |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        difference, p_value = run.against(reference)
        low, high = run.interval
        star = "*" if p_value < ALPHA else ""
        lines.append(
            f"| {run.name} | {run.accuracy:.1f} | [{low:.1f}, {high:.1f}]; {difference:+.1f}{star} "
            f"| {run.exit_layer:.2f} | {run.tflops * scale:.4g} | {100 * run.flops_reduction:.1f} % |"
        )
    return "\n".join(lines)


def costs_table(runs: list[Run]) -> str:
    """Each run's cost in the three units methods are compared in: visual tokens entering a decoder layer on average
    (SparseVLM's equivalent tokens), theoretical prefill FLOPs (LM and vision side apart), and measured prefill time
    as a ratio to none's (interleaved rounds on the same questions, from the evaluation's prefill_time.json)."""
    unit, scale = flops_unit(runs)
    lines = [f"| run | visual tokens / layer | LM prefill {unit} | vision {unit} | prefill time × none |",
             "|---|---|---|---|---|"]
    cell = lambda value, form: "-" if value is None else format(value, form)  # noqa: E731
    for run in runs:
        vision = None if run.vision_tflops is None else run.vision_tflops * scale
        lines.append(f"| {run.name} | {cell(run.visual_tokens_avg, '.1f')} | {run.tflops * scale:.4g} | "
                     f"{cell(vision, '.4g')} | {cell(run.prefill_ratio, '.3f')} |")
    return "\n".join(lines)


def per_kind_table(runs: list[Run]) -> str:
    """Accuracy per question kind, one row per run: which kinds an exit costs, and which need the image late."""
    reference = reference_run(runs)
    counts = Counter(reference.kinds)
    kinds = list(reference.per_kind)
    lines = [
        "| run | " + " | ".join(f"{kind} (n = {counts[kind]})" for kind in kinds) + " |",
        "|---|" + "---|" * len(kinds),
    ]
    for run in runs:
        accuracy = run.per_kind
        lines.append(f"| {run.name} | " + " | ".join(f"{accuracy[kind]:.1f}" for kind in kinds) + " |")
    return "\n".join(lines)


def exits_by_kind_table(runs: list[Run]) -> str | None:
    """Per question kind, by its rule: none's accuracy, the per-question oracle exit (mean exit layer, FLOPs cut) with
    fixed K's accuracy at the oracle's cost on that kind, and each dynamic run's accuracy and mean exit layer there —
    whether the gates' exits follow what each kind needs. None without the fixed ladder and without a dynamic run."""
    reference = reference_run(runs)
    dynamic = [run for run in runs if run.mode == "dynamic"]
    members_of = {kind: [q for q, k in enumerate(reference.kinds) if k == kind] for kind in dict.fromkeys(reference.kinds)}
    oracles = {kind: oracle_exit(runs, members, by_kind_rule) for kind, members in members_of.items()}
    if not dynamic and all(oracle is None for oracle in oracles.values()):
        return None
    lines = ["| kind (n) | none % | oracle: mean exit layer; FLOPs cut | fixed K at the oracle's cost % | "
             + " | ".join(f"{run.name}: %; mean exit layer" for run in dynamic) + " |",
             "|---|---|---|---|" + "---|" * len(dynamic)]
    marks = {run.name: by_kind_rule(run) for run in [reference, *dynamic]}
    for kind, members in members_of.items():
        oracle = oracles[kind]
        cells = [f"{kind} ({len(members)})", f"{kind_point(reference, members, marks[reference.name])[1]:.1f}"]
        cells += (["—", "—"] if oracle is None else
                  [f"{oracle['exit_layer']:.2f}; {100 * oracle['flops_reduction']:.1f} %", f"{oracle['fixed_accuracy']:.1f}"])
        for run in dynamic:
            layers = [run.exits[q] for q in members if run.exits[q] is not None]
            cells.append(f"{kind_point(run, members, marks[run.name])[1]:.1f}; {sum(layers) / len(layers):.2f}"
                         if layers else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def by_kind_rule(run: Run) -> list[bool]:
    """Per question, right by its kind's rule: a long answer's (IoU ≥ 0.5 for a box), else GQA's exact match."""
    return [right if grade is None else grade["correct"] for right, grade in zip(run.correct, run.graded or [None] * len(run.correct))]


def long_answers_table(runs: list[Run]) -> str | None:
    """Per long kind, its metric with the 95 % interval (and describe's per-object F1, ground's mean IoU) for every
    run, with its cost; None when the questions hold no long kind."""
    reference = reference_run(runs)
    kinds = [kind for kind in LONG_KINDS if kind in reference.kinds]
    if not kinds:
        return None
    heads = {"describe": "describe: exact % [CI]; F1", "ground": "ground: IoU ≥ 0.5 % [CI]; mean IoU", "read": "read: exact % [CI]"}
    counts = Counter(reference.kinds)
    unit, scale = flops_unit(runs)
    lines = ["| run | " + " | ".join(f"{heads[kind]} (n = {counts[kind]})" for kind in kinds)
             + f" | mean exit layer | prefill {unit} / sample |", "|---|" + "---|" * (len(kinds) + 2)]
    for run in runs:
        cells, marks = [], by_kind_rule(run)
        for kind in kinds:
            rows = [(right, grade) for right, grade, k in zip(marks, run.graded, run.kinds) if k == kind]
            low, high = wilson_interval(sum(right for right, _ in rows), len(rows))
            cell = f"{100 * sum(right for right, _ in rows) / len(rows):.1f} [{100 * low:.1f}, {100 * high:.1f}]"
            measure = {"describe": "f1", "ground": "iou"}.get(kind)
            if measure:
                cell += f"; {sum(grade[measure] for _, grade in rows) / len(rows):.3f}"
            cells.append(cell)
        lines.append(f"| {run.name} | " + " | ".join(cells) + f" | {run.exit_layer:.2f} | {run.tflops * scale:.4g} |")
    return "\n".join(lines)


ANSWER_LENGTHS = ((1, 1), (2, 4), (5, 1000))  # words in the right answer: one word, a short phrase, a long answer


def answer_length_table(runs: list[Run], questions: dict) -> str:
    """Accuracy by the kind's rule per length of the right answer, and the difference from none in points with its
    95 % interval (the paired questions' Wald interval): what an exit costs on long answers against short ones."""
    balanced = [question for question in questions.values() if question.get("isBalanced", True)]
    words = [len(question["answer"].replace(",", " ").split()) for question in balanced]
    reference = by_kind_rule(reference_run(runs))
    names = [f"{low} word{'s' if low > 1 else ''}" if low == high else f"{low}-{high}" if high < 1000 else f"{low}+"
             for low, high in ANSWER_LENGTHS]
    present = [(name, [i for i, n in enumerate(words) if low <= n <= high])
               for name, (low, high) in zip(names, ANSWER_LENGTHS)]
    present = [(name, members) for name, members in present if members]
    lines = ["| run | " + " | ".join(f"{name} (n = {len(members)}): % ; Δ [95 % CI]" for name, members in present) + " |",
             "|---|" + "---|" * len(present)]
    z = z_score(CONFIDENCE)
    for run in runs:
        marks, cells = by_kind_rule(run), []
        for _, members in present:
            accuracy = 100 * sum(marks[i] for i in members) / len(members)
            mean, half = paired_interval([int(marks[i]) - int(reference[i]) for i in members], z)
            cells.append(f"{accuracy:.1f}; {100 * mean:+.1f} [{100 * (mean - half):+.1f}, {100 * (mean + half):+.1f}]")
        lines.append(f"| {run.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def point_label(run: Run) -> str:
    """A point's settings, less what its curve's legend already says (FastV's K)."""
    shown = {key: value for key, value in run.setting.items() if not (run.mode == "fastv" and key == "K")}
    return ", ".join(f"{key}={value:g}" for key, value in shown.items())


def overlap(box: Bbox, other: Bbox) -> float:
    inside = Bbox.intersection(box, other)
    return inside.width * inside.height if inside is not None else 0.0


def place_labels(axes, points: list[tuple[float, float, float, float, str, tuple]]) -> None:
    """Annotate each (x, y, low, high, text, colour) at the first of LABEL_SPOTS that covers no other label, no
    point or error bar and stays in the axes; where every spot is taken, at the least covered one. The figure's
    layout must be final: the spots are measured in its pixels."""
    renderer = axes.figure.canvas.get_renderer()
    frame = axes.get_window_extent(renderer)
    radius = 4 * axes.figure.dpi / 72  # a marker's half width, in pixels
    obstacles = []
    for x, y, low, high, _, _ in points:
        (px, py), (_, bar_low), (_, bar_high) = axes.transData.transform([(x, y), (x, low), (x, high)])
        obstacles.append(Bbox.from_extents(px - radius, py - radius, px + radius, py + radius))
        obstacles.append(Bbox.from_extents(px - 1, bar_low, px + 1, bar_high))
    for x, y, _, _, text, color in points:
        best = None
        for spot, (dx, dy) in enumerate(LABEL_SPOTS):
            align = {"ha": "left" if dx > 0 else "right" if dx < 0 else "center", "va": "bottom" if dy > 0 else "top"}
            label = axes.annotate(
                text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7, color=color, **align
            )
            box = label.get_window_extent(renderer)
            label.remove()
            outside = box.width * box.height - overlap(box, frame)
            covered = outside + sum(overlap(box, other) for other in obstacles)
            if best is None or covered < best[0]:
                best = (covered, spot, align, box)
            if covered == 0:
                break
        _, spot, align, box = best
        leader = {"arrowstyle": "-", "color": color, "lw": 0.5, "alpha": 0.6} if spot >= len(DIRECTIONS) else None
        axes.annotate(
            text, (x, y), xytext=LABEL_SPOTS[spot], textcoords="offset points", fontsize=7, color=color,
            arrowprops=leader, **align,
        )
        obstacles.append(box)


def error_bars(runs: list[Run]) -> list[list[float]]:
    """matplotlib's `yerr` for these runs: from each accuracy down to and up to its Wilson bounds."""
    return [[run.accuracy - run.interval[0] for run in runs], [run.interval[1] - run.accuracy for run in runs]]


def accuracy_figure(runs: list[Run], oracle: dict | None = None):
    """Accuracy (with its 95 % interval) against prefill cost: all runs at left, at right a zoom on the runs within
    ZOOM_BAND points of none, where the methods compete and their points crowd (the zoom frames their points; wide
    error bars run out of it). The zoom labels the points inside it, the overview the others; the legend sits below
    both, off the data. `oracle` (oracle_exit's figures) adds the per-question oracle's point."""
    unit, scale = flops_unit(runs)
    reference = reference_run(runs)
    figure, (overview, zoom) = plt.subplots(1, 2, figsize=(13, 6), dpi=DPI, layout="constrained")
    curves: dict[tuple[str, float | None], list[Run]] = {}
    for run in runs:
        if run.mode != "none":  # FastV: one curve over R per K; a budgeted method: one over T; a stage list: a point
            key = run.setting.get("K") if run.mode == "fastv" else run.name if run.mode == "stages" else None
            curves.setdefault((run.mode, key), []).append(run)
    near = [run for run in runs if run.accuracy >= reference.accuracy - ZOOM_BAND]
    xs, ys = [run.tflops * scale for run in near], [run.accuracy for run in near]
    pad_x, pad_y = 0.06 * (max(xs) - min(xs)) or 0.05 * max(xs), 0.08 * (max(ys) - min(ys)) + 1
    left, right, bottom, top = min(xs) - pad_x, max(xs) + pad_x, min(ys) - pad_y, max(ys) + pad_y

    def in_zoom(run: Run) -> bool:  # labelled in the zoom; the overview labels the rest
        return left <= run.tflops * scale <= right and bottom <= run.accuracy <= top

    points = {overview: [], zoom: []}
    for axes in (overview, zoom):
        for ((mode, k), members), color in zip(curves.items(), itertools.cycle(COLORS)):
            style, legend = STYLES[mode]
            members = sorted(members, key=lambda run: run.tflops)
            axes.errorbar(
                [run.tflops * scale for run in members], [run.accuracy for run in members], yerr=error_bars(members),
                fmt=style, color=color, ecolor=(*color[:3], 0.45), capsize=2, elinewidth=0.8, label=legend.format(K=k or 0, name=k),
            )
            shown = [run for run in members if in_zoom(run) == (axes is zoom)]
            points[axes] += [(run.tflops * scale, run.accuracy, *run.interval, point_label(run), color)
                             for run in shown]
        axes.errorbar(
            [reference.tflops * scale], [reference.accuracy], yerr=error_bars([reference]), fmt="k*",
            ecolor=(0, 0, 0, 0.45), markersize=12, capsize=2, label="no exit",
        )
        if oracle is not None:
            axes.plot([oracle["tflops"] * scale], [oracle["accuracy"]], "kP", markerfacecolor="none", markersize=10,
                      label="per-question oracle exit")
        axes.set_xlabel(f"LM prefill {unit} per sample")
        axes.set_ylabel("accuracy (%), 95 % Wilson interval")
        axes.grid(alpha=0.3)
    zoom.set_xlim(left, right)
    zoom.set_ylim(bottom, top)
    overview.add_patch(Rectangle((left, bottom), right - left, top - bottom, fill=False, ls="--", color="0.4"))
    overview.set_title("all runs (dashed: the zoom at right)")
    zoom.set_title(f"zoom: runs within {ZOOM_BAND:g} points of no exit")
    figure.suptitle("Accuracy vs prefill cost: dynamic exit against fixed K, FastV and the reduction methods")
    handles, names = overview.get_legend_handles_labels()
    figure.legend(handles, names, loc="outside lower center", ncols=4, fontsize=8)
    figure.canvas.draw()  # lays the figure out: labels are placed in its final coordinates, which must not move
    figure.set_layout_engine("none")
    for axes, members in points.items():
        place_labels(axes, members)
    return figure


def per_kind_figure(runs: list[Run]):
    """One panel per question kind, each by its own rule: accuracy against prefill cost on that kind's questions of
    fixed K, the dynamic runs, the budgeted methods, no exit and the per-question oracle exit (where every fixed K
    ran): whether the gates sit above fixed K on any kind, and how far below the oracle."""
    unit, scale = flops_unit(runs)
    reference = reference_run(runs)
    kinds = list(dict.fromkeys(reference.kinds))
    columns = min(3, len(kinds))
    rows = -(-len(kinds) // columns)
    figure, grid = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), dpi=DPI, layout="constrained",
                                squeeze=False)
    marks = {run.name: by_kind_rule(run) for run in runs}
    curves: dict[str, list[Run]] = {}
    for run in runs:
        if run.mode == "fixed" or run.mode == "dynamic" or run.mode in BUDGETED.values():
            curves.setdefault(run.mode, []).append(run)
    for axes, kind in zip(grid.flat, kinds):
        members = [q for q, k in enumerate(reference.kinds) if k == kind]
        for (mode, members_of_mode), color in zip(curves.items(), itertools.cycle(COLORS)):
            points = sorted(kind_point(run, members, marks[run.name]) for run in members_of_mode)
            if mode == "fixed":  # the curve runs on to no exit, its K = L
                points.append(kind_point(reference, members, marks[reference.name]))
            style, legend = STYLES[mode]
            axes.plot([x * scale for x, _ in points], [y for _, y in points], style, color=color, markersize=4,
                      label=legend.format(K=0, name=mode))
        x, y = kind_point(reference, members, marks[reference.name])
        axes.plot([x * scale], [y], "k*", markersize=10, label="no exit")
        oracle = oracle_exit(runs, members, by_kind_rule)
        if oracle is not None:
            axes.plot([oracle["tflops"] * scale], [oracle["accuracy"]], "kP", markerfacecolor="none", markersize=9,
                      label="per-question oracle exit")
        axes.set_title(f"{kind} (n = {len(members)})", fontsize=9)
        axes.tick_params(labelsize=7)
        axes.grid(alpha=0.3)
    for axes in list(grid.flat)[len(kinds):]:
        axes.set_visible(False)
    figure.supxlabel(f"LM prefill {unit} per sample (on the kind's questions)", fontsize=9)
    figure.supylabel("right by the kind's rule (%)", fontsize=9)
    handles, names = grid.flat[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="outside right upper", fontsize=7)
    return figure


def plot_exit_histogram(runs: list[Run], layers: int, path: str) -> None:
    dynamic = [run for run in runs if run.mode == "dynamic"]
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    width = 0.8 / max(1, len(dynamic))
    for index, run in enumerate(dynamic):
        counts = Counter(run.exit_layers)
        total = max(1, len(run.exit_layers))
        xs = [layer + (index - (len(dynamic) - 1) / 2) * width for layer in range(layers + 1)]
        axes.bar(xs, [100 * counts[layer] / total for layer in range(layers + 1)], width, label=f"τ={run.settings[0]:g}")
    axes.set_xticks(range(layers + 1), [str(k) for k in range(layers)] + [f"{layers}\n(no exit)"])
    axes.set_xlabel("exit layer K (visual tokens leave after layer K)")
    axes.set_ylabel("samples (%)")
    axes.set_title("Where the gates send visual tokens out, per threshold")
    if dynamic:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def unreached_lines(answers_root: str) -> str:
    """The runs the evaluation found out of their method's reach (llava.world.evaluate's out_of_reach.json), one
    line each under the table: a budget a method cannot meet here is a finding, not a missing row."""
    path = os.path.join(answers_root, OUT_OF_REACH)
    unreached = read_json(path) if os.path.isfile(path) else {}
    if not unreached:
        return ""
    return "\n\n" + "\n".join(f"{name}: out of reach: {reason}" for name, reason in unreached.items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers-root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--questions", default=None,
        help="GQA truth file the runs were scored on (default: gqa.sh's, data/testdev_balanced_questions.json in the "
        "folder above answers/)",
    )
    parser.add_argument("--model", default=None, help="report the runs of this model path only (a folder may hold several)")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.answers_root, args.questions or default_questions(args.answers_root), args.model)
    except (EvalInputError, ValueError) as error:
        sys.exit(f"report: error: {error}")
    layers = reference_run(runs).exit_layers[0]
    os.makedirs(args.out, exist_ok=True)
    text = table(runs) + unreached_lines(args.answers_root)
    with open(os.path.join(args.out, "table.md"), "w") as handle:
        handle.write(text + "\n")
    figures = results(runs)
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump(figures, handle, indent=1)
    comparison = equal_flops_table(figures["equal_flops"], runs) + "\n\n" + oracle_line(figures["oracle_exit"], runs)
    with open(os.path.join(args.out, "equal_flops.md"), "w") as handle:
        handle.write(comparison + "\n")
    kinds = per_kind_table(runs)
    exits_by_kind = exits_by_kind_table(runs)
    if exits_by_kind is not None:
        kinds += "\n\nExits per kind (each kind by its own rule):\n\n" + exits_by_kind
    with open(os.path.join(args.out, "per_kind.md"), "w") as handle:
        handle.write(kinds + "\n")
    costs = costs_table(runs)
    with open(os.path.join(args.out, "costs.md"), "w") as handle:
        handle.write(costs + "\n")
    long_answers = long_answers_table(runs)
    if long_answers is not None:
        lengths = answer_length_table(runs, load_questions(args.questions or default_questions(args.answers_root)))
        with open(os.path.join(args.out, "long_answers.md"), "w") as handle:
            handle.write(long_answers + "\n\n" + lengths + "\n")
        print(f"\nLong answers, by each kind's rule:\n{long_answers}\n\nBy the length of the right answer:\n{lengths}")
    figure = accuracy_figure(runs, figures["oracle_exit"])
    figure.savefig(os.path.join(args.out, "accuracy_vs_tflops.png"), dpi=DPI)
    plt.close(figure)
    plot_exit_histogram(runs, layers, os.path.join(args.out, "exit_layer_histogram.png"))
    figure = per_kind_figure(runs)
    figure.savefig(os.path.join(args.out, "per_kind.png"), dpi=DPI)
    plt.close(figure)
    print(text)
    print(f"\nCost in three units:\n{costs}")
    print(f"\nAccuracy (%) per question kind:\n{kinds}")
    print(f"\nAt equal prefill FLOPs, against the interpolated baseline curves:\n{comparison}")
    print(
        f"{os.path.abspath(args.out)}: results.json, costs.md, per_kind.md, equal_flops.md, "
        + ("long_answers.md, " if long_answers is not None else "")
        + "accuracy_vs_tflops.png, per_kind.png, exit_layer_histogram.png"
    )


if __name__ == "__main__":
    main()
