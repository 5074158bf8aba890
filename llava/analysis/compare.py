"""Every reduction method at the same visual budgets, on one model and one GQA-format question file:

    python -m llava.analysis.compare --model-path CKPT --question-file Q.jsonl --image-folder IMAGES \\
        --truth testdev_balanced_questions.json --budgets 64 128 192 [--budget-rules paper equal] --out DIR

Runs mode `none`, each method of `--methods` at each budget by each rule of `--budget-rules` (and, for each of
`--gates-after`, that reduction before the LLM with DyVTE's gates deciding the exit of what it kept, at the
checkpoint's threshold: gates trained after it with train.py's `--input_reduction` fit it best)
(llava.model.visual_exit.budget: `paper`, each method's published setting for that budget on LLaVA-1.5-7B carried
to this model, the default; `equal`, the same layer average of visual tokens for every method), and DyVTE's gates
with their threshold calibrated per budget: on the first `--calibration` questions each τ of `--thresholds` is run
and the one whose measured average comes closest to the budget's average on this model without exceeding it is
kept (the smallest average when none fits). `--calibrated vtw shortv` adds the methods that calibrate their own
setting, each by its own rule on those questions: VTW's withdrawal layer K (the first from `--vtw-first` whose
mean KL stays within `--vtw-eta`, `fixed:K`) and ShortV's replaced layers (round(0.6 L) of the lowest Layer
Contribution); neither has a budget. Those questions are never scored: every run is scored on the others,
and only on those the truth file holds (`questions` counts them). Then every run's prefill is timed on the first
`--time-questions` of them, in interleaved rounds, against none's.

DIR/comparison.csv has one row per run, its cost in three units side by side: measured visual tokens per layer,
theoretical prefill TFLOPs of the LM (`tflops`) and of the vision side (`vision_tflops`), and measured prefill time
as a ratio to none (`prefill_time_vs_none`); DIR/accuracy_vs_tflops.png plots accuracy against LM TFLOPs. The answers
of every run stay in DIR/answers/ and a rerun resumes them. Greedy decoding, one process: the loader's other flags
mean nothing here.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from llava.analysis import shortv, vtw  # noqa: E402
from llava.analysis.calibration import divergences  # noqa: E402
from llava.eval.eval_gqa import load_questions, convert_gqa, score_gqa  # noqa: E402
from llava.eval.io import EvalInputError, read_jsonl  # noqa: E402
from llava.arguments import positive_int  # noqa: E402
from llava.eval.answering import Answerer, RunSpec, answer_file  # noqa: E402
from llava.eval.model_vqa_loader import add_model_arguments  # noqa: E402
from llava.eval.prefill_time import prefill_seconds  # noqa: E402
from llava.model.builder import load_model  # noqa: E402
from llava.model.checkpoint import Checkpoint, CheckpointError  # noqa: E402
from llava.model.exit_args import budget_tokens  # noqa: E402
from llava.model.visual_exit import ExitConfig  # noqa: E402
from llava.model.visual_exit.budget import RULES, OutOfReach  # noqa: E402
from llava.model.visual_exit.stages import BEFORE_LLM, METHODS  # noqa: E402

logger = logging.getLogger("llava.analysis.compare")
DEFAULT_THRESHOLDS = (0.5, 0.7, 0.9, 0.95, 0.99, 0.999, 0.9999)
CSV_HEADER = ["method", "rule", "budget", "setting", "accuracy", "visual_tokens_avg", "tflops", "vision_tflops",
              "prefill_time_vs_none", "flops_reduction", "questions"]
_REFERENCE_TOKENS = 576  # LLaVA-1.5's visual tokens per image: what a paper budget counts


@dataclass
class RunResult:
    method: str
    rule: str | None
    budget: float | None
    setting: str
    accuracy: float
    visual_tokens_avg: float
    tflops: float
    vision_tflops: float | None
    flops_reduction: float
    questions: int
    name: str = ""
    config: ExitConfig | None = None
    prefill_ratio: float | None = None

    def row(self) -> list:
        optional = lambda value, form: "" if value is None else format(value, form)  # noqa: E731
        return [self.method, self.rule or "", optional(self.budget, "g"), self.setting, f"{self.accuracy:.2f}",
                f"{self.visual_tokens_avg:.2f}", f"{self.tflops:.6g}", optional(self.vision_tflops, ".6g"),
                optional(self.prefill_ratio, ".3f"), f"{self.flops_reduction:.4f}", self.questions]


def unreached(method: str, rule: str, budget: float, error: Exception) -> RunResult:
    return RunResult(method, rule, budget, f"out of reach: {error}", *[float("nan")] * 3, None, float("nan"), 0)


def run_setting(answerer: Answerer, out: str, name: str, questions: list[dict], **exit_flags):
    """(answer records, exit config) of one setting (resumed from OUT/answers/NAME.jsonl when made with the same
    settings)."""
    spec = answerer.spec.with_exit(**exit_flags)
    answers_file = os.path.join(out, "answers", f"{name}.jsonl")
    answer_file(spec, questions, answers_file, answerer)
    # Only these questions' answers: the file may hold others from an earlier run with another calibration split.
    asked = {q["question_id"] for q in questions}
    records = [r for r in read_jsonl(answers_file, ("question_id",)) if "error" not in r and r["question_id"] in asked]
    return records, spec.exit_config


def result(method: str, rule, budget, setting: str, answered: tuple, truth: dict, name: str) -> RunResult:
    """Scored on the questions of `truth` (an unanswered one counts as wrong); costs over the answered ones."""
    records, config = answered
    if not records:
        raise EvalInputError(f"{method} {setting}: no question was answered")
    metrics = score_gqa(truth, convert_gqa(records))
    mean = lambda key: sum(r[key] for r in records) / len(records)  # noqa: E731
    reduction = 1 - sum(r["tflops"] for r in records) / sum(r["tflops_full"] for r in records)
    vision = None if any(r.get("vision_tflops") is None for r in records) else mean("vision_tflops")
    return RunResult(method, rule, budget, setting, metrics["accuracy"], mean("visual_tokens_avg"), mean("tflops"),
                     vision, reduction, metrics["questions"], name, config)


def calibrated_threshold(answerer: Answerer, out: str, questions, budget: float, thresholds) -> float:
    """The τ whose measured average on the calibration questions comes closest to `budget` from below."""
    measured = {}
    for tau in thresholds:
        records, _ = run_setting(answerer, out, f"calibration-dynamic-{tau:g}", questions, exit_mode="dynamic",
                                 exit_threshold=tau)
        measured[tau] = sum(r["visual_tokens_avg"] for r in records) / max(1, len(records))
    fitting = [tau for tau, average in measured.items() if average <= budget]
    chosen = max(fitting, key=measured.get) if fitting else min(measured, key=measured.get)
    logger.info("budget %g: dynamic τ=%g (calibration average %.2f tokens)", budget, chosen, measured[chosen])
    return chosen


def split_questions(questions: list[dict], calibration: int, dynamic: bool) -> tuple[list[dict], list[dict]]:
    """(calibration, scored): the first `calibration` questions and the rest, never overlapping."""
    if dynamic and calibration < 1:
        raise ValueError("--calibration 0 leaves no question to calibrate the gates' τ on (or pass --no-dynamic)")
    if calibration >= len(questions):
        raise ValueError(f"--calibration {calibration}: the question file holds {len(questions)}, none left to score")
    return questions[:calibration], questions[calibration:]


def scored_truth(truth_file: str, evaluated: list[dict]) -> dict:
    """The truth of the evaluated questions; those it lacks are left out, said once."""
    all_truth = load_questions(truth_file)
    truth = {str(q["question_id"]): all_truth[str(q["question_id"])] for q in evaluated if str(q["question_id"]) in all_truth}
    if not truth:
        raise EvalInputError(f"{truth_file}: holds none of the {len(evaluated)} questions to score")
    if len(truth) < len(evaluated):
        logger.warning("%s lacks %d of the %d questions to score: they are left out", truth_file,
                       len(evaluated) - len(truth), len(evaluated))
    return truth


def compare(args: argparse.Namespace) -> list[RunResult]:
    questions = read_jsonl(args.question_file, ("question_id", "text"))
    calibration, evaluated = split_questions(questions, args.calibration, args.dynamic)
    truth = scored_truth(args.truth, evaluated)
    checkpoint = Checkpoint.resolve(args.model_path, args.model_base)
    if args.calibrated and args.calibration < 1:
        raise ValueError(f"--calibrated {' '.join(args.calibrated)}: --calibration 0 leaves no question to calibrate on")
    if (args.dynamic or args.gates_after) and not checkpoint.has_gates:
        raise ValueError(f"{args.model_path} has no gates to calibrate: train them first, or pass --no-dynamic "
                         "(and no --gates-after)")
    if not set(args.gates_after) <= set(args.methods):
        raise ValueError(f"--gates-after {' '.join(args.gates_after)}: each must be one of --methods too")
    spec = RunSpec.build(checkpoint, conv_mode=args.conv_mode, device=args.device, image_folder=args.image_folder,
                         batch_size=args.batch_size, exit_mode="none")
    with Answerer(load_model(checkpoint, device=args.device), spec) as answerer:
        return compare_runs(args, answerer, calibration, evaluated, truth)


def compare_runs(args, answerer: Answerer, calibration: list[dict], evaluated: list[dict], truth: dict) -> list[RunResult]:
    out = args.out
    none = run_setting(answerer, out, "none", evaluated, exit_mode="none")
    results = [result("none", None, None, "", none, truth, "none")]
    tokens = budget_tokens(args.visual_tokens, answerer.spec.checkpoint.config)
    gates_threshold = args.gates_after_threshold
    if gates_threshold is None:  # the checkpoint's own (the reference's argmax, 0.5, unless it saved another)
        gates_threshold = answerer.spec.checkpoint.exit_defaults.threshold
    for budget in args.budgets:
        targets = {}  # the budget's layer average on this model, per rule: what the gates are calibrated to
        for rule in args.budget_rules:
            targets.setdefault(budget * tokens / _REFERENCE_TOKENS if rule == "paper" else budget, rule)
            for method in args.methods:
                name = f"{method}-{rule}{budget:g}"
                try:
                    answered = run_setting(answerer, out, name, evaluated, exit_method=method, visual_budget=budget,
                                           budget_rule=rule, visual_tokens=args.visual_tokens)
                except OutOfReach as error:  # e.g. a method whose first full layers alone cost more: a row says so
                    logger.warning("%s", error)
                    results.append(unreached(method, rule, budget, error))
                    continue
                results.append(result(method, rule, budget, answered[1].request.stages, answered, truth, name))
                if method in args.gates_after:  # DyVTE on top: the gates decide the exit of what the method kept
                    stages = f"{answered[1].request.stages},gates:{gates_threshold:g}"
                    name = f"{method}+gates-{rule}{budget:g}"
                    answered = run_setting(answerer, out, name, evaluated, exit_stages=stages)
                    results.append(result(f"{method}+gates", rule, budget, stages, answered, truth, name))
        for target, rule in targets.items() if args.dynamic else ():
            tau = calibrated_threshold(answerer, out, calibration, target, args.thresholds)
            answered = run_setting(answerer, out, f"dynamic-{tau:g}", evaluated, exit_mode="dynamic", exit_threshold=tau)
            results.append(result("dynamic", rule, budget, f"τ={tau:g}", answered, truth, f"dynamic-{tau:g}"))
    for method in args.calibrated:
        results.append(self_calibrated(args, answerer, method, calibration, evaluated, truth))
    if args.time_questions:
        time_prefills(args, answerer, evaluated, results)
    return results


def self_calibrated(args, answerer: Answerer, method: str, calibration: list[dict], evaluated: list[dict],
                    truth: dict) -> RunResult:
    """VTW's or ShortV's row: its setting chosen by its own calibration on the calibration questions, then scored."""
    layers = answerer.spec.checkpoint.config.num_hidden_layers
    if method == "vtw":
        chosen = vtw.choice(divergences(answerer, calibration, vtw.withdrawal_exits(layers, args.vtw_first),
                                        "VTW calibration"), args.vtw_eta)
        if chosen["layer"] is None:
            raise ValueError(f"VTW: no layer from {args.vtw_first} keeps the mean KL within η = {args.vtw_eta} on the "
                             f"{chosen['questions']} calibration questions; raise --vtw-eta or lower --vtw-first")
        stages = f"fixed:{chosen['layer']}"
    else:
        measured = divergences(answerer, calibration, shortv.replacement_exits(layers), "ShortV calibration")
        stages = shortv.choice(measured, shortv.replaced_count(layers, None))["stages"]
    logger.info("%s calibrated on %d questions: %s", method, len(calibration), stages)
    answered = run_setting(answerer, args.out, method, evaluated, exit_stages=stages)
    return result(method, None, None, stages, answered, truth, method)


def time_prefills(args, answerer: Answerer, evaluated: list[dict], results: list[RunResult]) -> None:
    """Each run's prefill time on the first --time-questions scored questions, as a ratio to none's."""
    configs = {r.name: r.config for r in results if r.questions}
    timed = [answerer.prepare(q) for q in evaluated[: args.time_questions]]
    seconds = prefill_seconds(answerer, timed, configs, args.time_repeats)
    for r in results:
        if r.name in seconds:
            r.prefill_ratio = seconds[r.name] / seconds["none"]


def plot(results: list[RunResult], path: str) -> None:
    figure, axes = plt.subplots(figsize=(7.2, 4.8))
    reference = results[0]
    scale, unit = (1e3, "GFLOPs") if reference.tflops < 0.1 else (1.0, "TFLOPs")
    for method, rule in dict.fromkeys((r.method, r.rule) for r in results[1:]):
        points = sorted((r.tflops * scale, r.accuracy, r.budget) for r in results
                        if (r.method, r.rule) == (method, rule) and r.questions)
        label = method if rule is None else f"{method} ({rule})"
        axes.plot([p[0] for p in points], [p[1] for p in points], "o-" if rule == "paper" else "o:", label=label)
        for x, y, budget in points:
            if budget is not None:  # VTW and ShortV have no budget: a point of their own
                axes.annotate(f"{budget:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes.plot([reference.tflops * scale], [reference.accuracy], "k*", markersize=12, label="none")
    axes.set_xlabel(f"LM prefill {unit} per sample")
    axes.set_ylabel("accuracy (%)")
    axes.set_title("Reduction methods at visual budgets (labels: rule and budget)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def table(results: list[RunResult]) -> str:
    lines = ["| " + " | ".join(CSV_HEADER) + " |", "|" + "---|" * len(CSV_HEADER)]
    lines += ["| " + " | ".join(map(str, r.row())) + " |" for r in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--visual-tokens", type=positive_int, default=None,
                        help="visual tokens per image the budgets are shares of (default: the LLaVA tower's count)")
    parser.add_argument("--truth", required=True, help="GQA-format ground truth ({question_id: {answer, types}})")
    parser.add_argument("--budgets", type=float, nargs="+", required=True, help="retained visual tokens")
    parser.add_argument("--budget-rules", nargs="+", choices=RULES, default=["paper"],
                        help="paper: each method's published setting; equal: the same layer average (both: compare)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=[m for m in METHODS if m != "fixed"])
    parser.add_argument("--no-dynamic", dest="dynamic", action="store_false", help="leave out DyVTE's gates")
    parser.add_argument("--thresholds", type=float, nargs="+", default=DEFAULT_THRESHOLDS)
    parser.add_argument("--gates-after", nargs="+", choices=BEFORE_LLM, default=[],
                        help="also run each of these reductions before the LLM with DyVTE's gates deciding after it")
    parser.add_argument("--gates-after-threshold", type=float, default=None,
                        help="τ of the gates after a reduction (default: the checkpoint's saved threshold)")
    parser.add_argument("--calibrated", nargs="+", choices=("vtw", "shortv"), default=[],
                        help="also run these, each with the setting its own calibration picks on the calibration questions")
    parser.add_argument("--vtw-eta", type=float, default=vtw.DEFAULT_ETA, help="VTW's KL threshold η")
    parser.add_argument("--vtw-first", type=int, default=vtw.FIRST_LAYER, help="the first withdrawal layer VTW tries")
    parser.add_argument("--calibration", type=int, default=50,
                        help="first questions used to calibrate only (τ, VTW, ShortV), never scored")
    parser.add_argument("--out", required=True)
    parser.add_argument("--time-questions", type=int, default=64, help="questions every run's prefill is timed on (0: not)")
    parser.add_argument("--time-repeats", type=positive_int, default=3, help="interleaved timing rounds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        os.makedirs(os.path.join(args.out, "answers"), exist_ok=True)
        results = compare(args)
    except (EvalInputError, CheckpointError, ValueError) as error:
        sys.exit(f"compare: error: {error}")
    with open(os.path.join(args.out, "comparison.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_HEADER)
        writer.writerows(r.row() for r in results)
    plot(results, os.path.join(args.out, "accuracy_vs_tflops.png"))
    print(table(results))
    print(f"wrote {os.path.join(args.out, 'comparison.csv')} and accuracy_vs_tflops.png")


if __name__ == "__main__":
    main()
