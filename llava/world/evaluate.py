"""Many exit settings of one model on the world's GQA-format questions, in one process: the quickstart's evaluation.

    python -m llava.world.evaluate --model-path CKPT --gqa-dir WORLD/eval/gqa --answers-root ROOT [--batch-size 32] \\
        --run none="--exit-mode none" --run dynamic-0.9="--exit-mode dynamic --exit-threshold 0.9" ...

Each `--run NAME=FLAGS` takes the loader's flags (`llava.eval.model_vqa_loader`: exit flags, `--conv-mode`,
decoding) and writes what `scripts/v1_5/eval/gqa.sh` writes with the same flags and CKPT=.../NAME, into ROOT/NAME:
the answers with their exit statistics and settings (`merge.jsonl`), eval_gqa's predictions and metrics
(`predictions.json`, `metrics.json`) and the summary row (`merge.summary.json`); then, in ROOT/prefill_time.json,
every run's measured prefill time on the first --time-questions questions as a ratio to mode none's, and in
ROOT/out_of_reach.json the runs whose method cannot meet their budget on this model, with the reason (the report
lists them; no answers are made for them). What it saves is the start-up:
the model is loaded and the questions read once, not once per setting, which on 2 cores is a third of a small
run's time. Every run's flags are checked against the checkpoint before any model work; a folder holding answers
made with other settings stops the run, as the loader's resume does.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

from tqdm import tqdm

from llava.eval.eval_gqa import load_questions, run_convert, score_gqa
from llava.eval.io import EvalInputError, read_json, read_jsonl, write_json
from llava.arguments import positive_int
from llava.eval.answering import Answerer, answer_file
from llava.eval.model_vqa_loader import add_loader_arguments, run_spec
from llava.eval.prefill_time import PREFILL_TIME, prefill_seconds, ratios_to_none
from llava.eval.summary import format_row, write_summary
from llava.model.builder import load_model, resolve_device
from llava.model.checkpoint import Checkpoint, CheckpointError
from llava.model.multimodal_encoder.clip_encoder import VisionTowerNotFoundError
from llava.model.visual_exit import ExitRequest
from llava.model.visual_exit.budget import OutOfReach

SPLIT = "llava_gqa_testdev_balanced"
OUT_OF_REACH = "out_of_reach.json"  # in the answers root: {run name: why its method cannot meet its budget here}
OWN_FLAGS = ("model_path", "model_base", "question_file", "image_folder", "answers_file", "batch_size", "device")


def named_run(text: str) -> tuple[str, list[str]]:
    name, separator, flags = text.partition("=")
    if not separator or not name or os.sep in name or name in (".", ".."):
        raise argparse.ArgumentTypeError(f"expected NAME=FLAGS with a folder name, got {text!r}")
    return name, shlex.split(flags)


def run_arguments(args: argparse.Namespace, name: str, flags: list[str]) -> argparse.Namespace:
    """The loader's arguments of one run: this command's model, questions and batch, the run's own flags."""
    parser = argparse.ArgumentParser(prog=f"--run {name}", add_help=False)
    add_loader_arguments(parser)
    own = ["--model-path", args.model_path, "--question-file", args.question_file, "--image-folder", args.image_folder,
           "--answers-file", os.path.join(args.answers_root, name, "merge.jsonl"), "--batch-size", str(args.batch_size),
           "--device", args.device, "--temperature", "0"]
    run = parser.parse_args(own + flags)
    base = parser.parse_args(own)
    taken = [flag for flag in OWN_FLAGS if getattr(run, flag) != getattr(base, flag)]
    if taken:
        raise EvalInputError(f"--run {name}: --{taken[0].replace('_', '-')} is this command's, not a run's")
    return run


def evaluate(args: argparse.Namespace) -> list[dict]:
    """Answer, score and summarize every run in order; their summaries."""
    checkpoint = Checkpoint.resolve(args.model_path)
    runs = [(name, run_arguments(args, name, flags)) for name, flags in args.run]
    names = [name for name, _ in runs]
    if len(set(names)) < len(names):
        raise EvalInputError(f"--run names must differ: {names}")
    # every run's settings checked here: an exit the checkpoint cannot take fails before the runs ahead of it; a
    # method's budget out of its reach on this model is no failure but a finding, written down and reported
    specs, unreached = [], {}
    for name, run in runs:
        try:
            specs.append((name, run.answers_file, run_spec(run, checkpoint)))
        except OutOfReach as error:
            unreached[name] = str(error)
            tqdm.write(f"{name}: out of reach: {error}")
    write_json(os.path.join(args.answers_root, OUT_OF_REACH), unreached)
    if not specs:
        raise EvalInputError("every run's budget is out of its method's reach on this model")
    questions = read_jsonl(args.question_file, ("question_id", "text"))
    truth = load_questions(args.truth_file)
    loaded = load_model(checkpoint, device=args.device)
    summaries = []
    with Answerer(loaded, specs[0][2]) as answerer:
        for name, answers_file, spec in tqdm(specs, desc="settings", unit="run"):
            answer_file(spec, questions, answers_file, answerer)
            predictions = os.path.join(args.answers_root, name, "predictions.json")
            run_convert(answers_file, predictions)
            metrics = score_gqa(truth, read_json(predictions))
            write_json(os.path.join(args.answers_root, name, "metrics.json"), metrics)
            summaries.append(write_summary(answers_file, "gqa", metrics))
            tqdm.write(format_row(summaries[-1], header=len(summaries) == 1))
        if args.time_questions:
            time_prefills(args, answerer, specs, questions)
    return summaries


def time_prefills(args: argparse.Namespace, answerer: Answerer, specs: list, questions: list[dict]) -> None:
    """ROOT/prefill_time.json: each run's measured prefill time on the first --time-questions questions, and its
    ratio to mode none's, in --time-repeats interleaved rounds (llava.eval.prefill_time)."""
    configs = {"none": ExitRequest("none").expand()}
    configs.update({name: spec.exit_config for name, _, spec in specs})
    timed = [answerer.prepare(record) for record in questions[: args.time_questions]]
    seconds = prefill_seconds(answerer, timed, configs, args.time_repeats)
    write_json(os.path.join(args.answers_root, PREFILL_TIME), {
        "questions": len(timed), "repeats": args.time_repeats, "runs": ratios_to_none(seconds),
    })


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--gqa-dir", default="playground/data/tiny_world/eval/gqa", help="the world's eval/gqa")
    parser.add_argument("--answers-root", default=None, help=f"default: GQA_DIR/answers/{SPLIT}/quickstart")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--run", type=named_run, action="append", required=True, metavar="NAME=FLAGS")
    parser.add_argument("--time-questions", type=int, default=64,
                        help="time every run's prefill on this many questions (0: not), ratios to none")
    parser.add_argument("--time-repeats", type=positive_int, default=3, help="interleaved timing rounds")
    args = parser.parse_args(argv)
    args.question_file = os.path.join(args.gqa_dir, f"{SPLIT}.jsonl")
    args.truth_file = os.path.join(args.gqa_dir, "data", "testdev_balanced_questions.json")
    args.image_folder = os.path.join(args.gqa_dir, "data", "images")
    args.answers_root = args.answers_root or os.path.join(args.gqa_dir, "answers", SPLIT, "quickstart")
    args.device = resolve_device(args.device).type
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        evaluate(args)
    except (EvalInputError, CheckpointError, VisionTowerNotFoundError, ValueError) as error:
        sys.exit(f"llava.world.evaluate: error: {error}")


if __name__ == "__main__":
    main()
