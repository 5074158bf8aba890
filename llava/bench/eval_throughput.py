"""Evaluation throughput on the tiny world, as users run it: `python -m llava.bench.eval_throughput [--questions 400]
[--batch 1 8]`.

Times, on the same first N held-out questions of the tiny world: `scripts/v1_5/eval/gqa.sh` at each batch size
(batch 1 is the original LLaVA loader's path) and lmms-eval's own `llava_hf` model (transformers'
`LlavaForConditionalGeneration`, batch 1: the only size it takes) on the same checkpoint exported to the llava-hf
layout (`llava.model.export_hf`), through the world's `tiny_world_gqa` task. Each command is run whole, as a user
runs it, twice: on a few questions and on N; questions per second are reported for the whole run (start-up, model
load and scoring included) and at the margin, (N − n) / (T(N) − T(n)), which leaves each tool's fixed start-up out.
Then every command's answers are compared question by question.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from tqdm import tqdm

from llava.arguments import positive_int
from llava.eval.lmms import TASKS_DIR
from llava.model.export_hf import export_hf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORLD = os.path.join("playground", "data", "tiny_world")  # where the world's lmms-eval tasks read it, from their cwd
QUESTIONS_FILE = os.path.join("eval", "gqa", "llava_gqa_testdev_balanced.jsonl")
FEW = 8  # the short run whose time is each command's start-up (fewer for a short bench: a quarter of it)


@dataclass
class Run:
    """One command at one batch size: whole-run seconds on the few and on all questions, both rates, and the
    questions whose answer differs from the reference's (the first command's)."""

    command: str
    batch: int
    questions: int
    seconds_few: float
    seconds: float
    questions_per_s: float
    marginal_questions_per_s: float
    vs_llava_hf: float | None = None
    differing: list[str] | None = None


def world_root(world: str) -> str:
    """The folder holding `playground/data/tiny_world` for `world`; refused in one line when the world lacks its
    questions or lies elsewhere (the lmms-eval tasks read it by that relative path)."""
    world = os.path.abspath(world)
    if not os.path.isfile(os.path.join(world, QUESTIONS_FILE)):
        raise SystemExit(f"--world {world}: no {QUESTIONS_FILE} there (python -m llava.world.generate writes one)")
    if not world.endswith(os.sep + WORLD):
        raise SystemExit(f"--world {world}: the world's lmms-eval tasks read it as {WORLD} under the folder they run "
                         "in; give a world at that path")
    return world[: -len(WORLD) - 1]


def timed(command: list[str], cwd: str, env: dict, log: str) -> float:
    start = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{' '.join(command[:4])} ... failed (exit {done.returncode}); its output: {log}")
    return time.perf_counter() - start


def gqa_answers(world: str, model_path: str, batch: int, limit: int, work: str) -> tuple[float, dict[str, str]]:
    """(seconds, {question id: answer}) of `scripts/v1_5/eval/gqa.sh` on the first `limit` questions, answered from
    scratch into `work` (the script resumes answers it finds, which would time nothing)."""
    name = f"gqa_b{batch}_n{limit}"
    env = dict(os.environ, MODEL_PATH=os.path.abspath(model_path), EVAL_ROOT=os.path.join(world, "eval"),
               GQADIR=os.path.join(world, "eval", "gqa"), LIMIT=str(limit), BATCH_SIZE=str(batch), CKPT=name,
               PYTHON=sys.executable, CHUNKS="1")
    answers_dir = os.path.join(world, "eval", "gqa", "answers", "llava_gqa_testdev_balanced", name)
    subprocess.run(["rm", "-rf", answers_dir], check=True)
    seconds = timed(["bash", os.path.join(ROOT, "scripts", "v1_5", "eval", "gqa.sh")], ROOT, env,
                    os.path.join(work, name + ".log"))
    with open(os.path.join(answers_dir, "merge.jsonl")) as handle:
        rows = [json.loads(line) for line in handle]
    return seconds, {row["question_id"]: row["text"] for row in rows}


def llava_hf_answers(root: str, world: str, hf_path: str, limit: int, work: str) -> tuple[float, dict[str, str]]:
    """(seconds, {question id: answer}) of `python -m lmms_eval --model llava_hf` on the world's first `limit`
    questions (batch 1), offline."""
    out = os.path.join(work, f"llava_hf_n{limit}")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=os.path.join(work, "datasets"))
    command = [
        sys.executable, "-m", "lmms_eval", "--model", "llava_hf", "--model_args",
        f"pretrained={hf_path},dtype=float32,device_map=cpu", "--tasks", "tiny_world_gqa", "--include_path", TASKS_DIR,
        "--batch_size", "1", "--limit", str(limit), "--device", "cpu", "--output_path", out, "--log_samples",
    ]
    seconds = timed(command, root, env, out + ".log")
    with open(os.path.join(world, QUESTIONS_FILE)) as handle:
        ids = [json.loads(line)["question_id"] for line in handle][:limit]
    (samples,) = glob.glob(os.path.join(out, "*", "*_samples_tiny_world_gqa.jsonl"))
    with open(samples) as handle:
        rows = [json.loads(line) for line in handle]
    return seconds, {ids[row["doc_id"]]: row["filtered_resps"] for row in rows}


def run(args: argparse.Namespace) -> list[Run]:
    root = world_root(args.world)
    world = os.path.join(root, WORLD)
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="eval-throughput-"))
    os.makedirs(work, exist_ok=True)
    hf_path = args.hf_path or export_hf(args.model_path, os.path.join(work, "llava-hf"))
    commands = [(f"gqa.sh batch {batch}", batch, lambda n, b=batch: gqa_answers(world, args.model_path, b, n, work))
                for batch in args.batch]
    commands.append(("lmms-eval llava_hf", 1, lambda n: llava_hf_answers(root, world, hf_path, n, work)))
    runs, answers = [], {}
    few = min(FEW, max(1, args.questions // 4))
    for name, batch, call in tqdm(commands, desc="evaluation commands", unit="command"):
        seconds_few, _ = call(few)
        seconds, answers[name] = call(args.questions)
        margin = seconds - seconds_few  # nan when noise beats the extra questions' time (too few of them)
        runs.append(Run(name, batch, args.questions, seconds_few, seconds, args.questions / seconds,
                        (args.questions - few) / margin if margin > 0 else float("nan")))
    reference = answers[runs[0].command]
    hf = runs[-1]
    for row in runs:
        row.vs_llava_hf = row.marginal_questions_per_s / hf.marginal_questions_per_s
        row.differing = sorted(q for q in reference if answers[row.command].get(q) != reference[q])
    return runs


def format_table(runs: list[Run]) -> str:
    header = (f"{'command':<20} {'B':>2} {'questions':>9} {'whole s':>8} {'q/s':>7} {'marginal q/s':>12} "
              f"{'x llava_hf':>10} {'answers as gqa.sh batch 1':>26}")
    lines = [header, "-" * len(header)]
    for row in runs:
        same = "all" if not row.differing else f"{row.questions - len(row.differing)} of {row.questions}"
        lines.append(f"{row.command:<20} {row.batch:>2} {row.questions:>9} {row.seconds:8.1f} {row.questions_per_s:7.2f} "
                     f"{row.marginal_questions_per_s:12.2f} {row.vs_llava_hf:10.2f} {same:>26}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=positive_int, default=400, help="the first N held-out questions")
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[1, 8], help="gqa.sh's batch sizes")
    parser.add_argument("--model-path", default=os.path.join(ROOT, "checkpoints", "tiny-world-llava"))
    parser.add_argument("--hf-path", default=None, help="the model in the llava-hf layout (default: exported here)")
    parser.add_argument("--world", default=os.path.join(ROOT, WORLD), help=f"a tiny world at .../{WORLD}")
    parser.add_argument("--work", default=None, help="where logs, lmms-eval's output and the export go (default: a temp folder)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    runs = run(args)
    print(f"tiny world, first {args.questions} held-out questions; marginal: each command's rate past its start-up "
          f"(the time of a run on {min(FEW, max(1, args.questions // 4))} questions)")
    print(format_table(runs))
    for row in runs:
        if row.differing:
            print(f"{row.command}: {len(row.differing)} answers differ from gqa.sh batch 1's, e.g. {row.differing[:5]}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "runs": [asdict(row) for row in runs]}, handle, indent=2)


if __name__ == "__main__":
    main()
