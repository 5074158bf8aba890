"""Score ScienceQA answers as LLaVA's reference scorer does: `python -m llava.eval.eval_science_qa --base-dir scienceqa
--result-file answers.jsonl --output-file out.jsonl --output-result result.json`.

Every problem of `pid_splits.json[<split>]` (default `test`) is scored against `problems.json` (`choices`, `answer`
= index of the right choice). The answer text is used as is (no stripping, no case folding): it names a letter if it
is exactly one of A–E, or starts with `X. ` for a letter X in A–E, or contains exactly one match of the pattern
`The answer is ([A-Z]).` (the '.' there matches any character, as in the reference); anything else is FAILED. A
FAILED answer, a letter beyond the problem's number of choices and a problem without an answer are wrong. The
image subset (IMG-Accuracy, the number reported for SQA) is the answers whose `prompt` contains `<image>`; a
problem without an answer counts in Total but not in the image subset.

Outputs as the reference: `--output-file` gets a JSON object (despite the usual `.jsonl` name) with the `correct` and
`incorrect` analyses; `--output-result` gets exactly LLaVA's keys: `acc`, `correct`, `count`, `results` (problem id →
predicted choice index, -1 if none) and `outputs` (problem id → raw text). Accuracies are `correct / total * 100` in
that order, as the reference computes them. `--metrics-out` (ours) gets the headline numbers, IMG-Accuracy included:
`img_accuracy`, `accuracy`, `img_correct`, `img_total`, `correct`, `total`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence

from llava.eval.io import EvalInputError, read_json, read_jsonl

OPTIONS = ("A", "B", "C", "D", "E")
FAILED = "FAILED"
IMAGE_TOKEN = "<image>"
METRICS = ("img_accuracy", "accuracy", "img_correct", "img_total", "correct", "total")
# Unescaped '.' on purpose: the reference pattern accepts any character after the letter.
ANSWER_PATTERN = re.compile(r"The answer is ([A-Z]).")


def parse_prediction(text: str, options: Sequence[str] = OPTIONS) -> str:
    """The letter an answer names, or FAILED (see the module docstring for the three accepted forms)."""
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    matches = ANSWER_PATTERN.findall(text)
    if len(matches) == 1:
        return matches[0]
    return FAILED


def choice_index(letter: str, num_choices: int, options: Sequence[str] = OPTIONS) -> int:
    """Index of `letter` among the first `num_choices` options, -1 when it is not one of them (FAILED included)."""
    return options.index(letter) if letter in options[:num_choices] else -1


def score_science_qa(
    problems: Mapping[str, dict],
    split_ids: Sequence[str],
    answers: Mapping[str, dict],
    options: Sequence[str] = OPTIONS,
) -> dict:
    """Scores of the `split_ids` problems given answers by problem id (each with `text` and `prompt`).

    Returns total, correct, accuracy (%), img_total, img_correct, img_accuracy (% or None without image answers),
    `analysis` ({"correct": [...], "incorrect": [...]}) and `sqa_results` (the reference's result file content).
    """
    analysis: dict[str, list[dict]] = {"correct": [], "incorrect": []}
    predicted: dict[str, int] = {}
    outputs: dict[str, str] = {}
    for pid in split_ids:
        problem = problems[pid]
        answer = answers.get(pid, {"text": FAILED, "prompt": "Unknown"})
        text = answer["text"]
        letter = parse_prediction(text, options)
        index = choice_index(letter, len(problem["choices"]), options)
        record = {
            "question_id": pid,
            "parsed_ans": letter,
            "ground_truth": options[problem["answer"]],
            "question": answer["prompt"],
            "pred": text,
            "is_multimodal": IMAGE_TOKEN in answer["prompt"],
        }
        predicted[pid] = index
        outputs[pid] = text
        analysis["correct" if index == problem["answer"] else "incorrect"].append(record)

    correct = len(analysis["correct"])
    total = correct + len(analysis["incorrect"])
    img_correct = sum(r["is_multimodal"] for r in analysis["correct"])
    img_total = img_correct + sum(r["is_multimodal"] for r in analysis["incorrect"])
    accuracy = correct / total * 100 if total else 0.0
    img_accuracy = img_correct / img_total * 100 if img_total else None
    return {
        "total": total,
        "correct": correct,
        "accuracy": accuracy,
        "img_total": img_total,
        "img_correct": img_correct,
        "img_accuracy": img_accuracy,
        "analysis": analysis,
        "sqa_results": {
            "acc": accuracy,
            "correct": correct,
            "count": total,
            "results": predicted,
            "outputs": outputs,
        },
    }


def load_split(base_dir: str, split: str) -> tuple[dict, list[str]]:
    """`problems.json` and the problem ids of `pid_splits.json[split]`, checked."""
    splits_path = os.path.join(base_dir, "pid_splits.json")
    problems_path = os.path.join(base_dir, "problems.json")
    splits = read_json(splits_path)
    if not isinstance(splits, dict) or split not in splits:
        raise EvalInputError(f"{splits_path}: no split {split!r}")
    problems = read_json(problems_path)
    if not isinstance(problems, dict):
        raise EvalInputError(f"{problems_path}: expected a JSON object of problems by id")
    ids = [str(pid) for pid in splits[split]]
    for pid in ids:
        problem = problems.get(pid)
        if problem is None:
            raise EvalInputError(f"{problems_path}: problem {pid} (from split {split}) not found")
        if not isinstance(problem.get("choices"), list) or not isinstance(problem.get("answer"), int):
            raise EvalInputError(f"{problems_path}: problem {pid} needs a `choices` list and an integer `answer`")
        if not 0 <= problem["answer"] < min(len(problem["choices"]), len(OPTIONS)):
            raise EvalInputError(f"{problems_path}: problem {pid}: answer index {problem['answer']} out of range")
    return problems, ids


def evaluate(base_dir: str, result_file: str, split: str = "test") -> dict:
    """Read the files and score them (`score_science_qa`). A repeated question id keeps its last answer."""
    problems, ids = load_split(base_dir, split)
    answers = read_jsonl(result_file, ("question_id", "prompt", "text"), ("prompt", "text"))
    return score_science_qa(problems, ids, {str(a["question_id"]): a for a in answers})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-dir", required=True)
    parser.add_argument("--result-file", required=True)
    parser.add_argument("--output-file", required=True)
    parser.add_argument("--output-result", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--metrics-out", default=None, help="also write the headline metrics here (JSON object)")
    args = parser.parse_args(argv)
    try:
        result = evaluate(args.base_dir, args.result_file, args.split)
    except (EvalInputError, OSError) as error:
        sys.exit(f"eval_science_qa: error: {error}")
    img = "n/a" if result["img_accuracy"] is None else f"{result['img_accuracy']:.2f}%"
    print(f"Total: {result['total']}, Correct: {result['correct']}, Accuracy: {result['accuracy']:.2f}%, "
          f"IMG-Accuracy: {img}")
    with open(args.output_file, "w") as handle:
        json.dump(result["analysis"], handle, indent=2)
    with open(args.output_result, "w") as handle:
        json.dump(result["sqa_results"], handle, indent=2)
    if args.metrics_out:
        with open(args.metrics_out, "w") as handle:
            json.dump({key: result[key] for key in METRICS}, handle, indent=2)


if __name__ == "__main__":
    main()
