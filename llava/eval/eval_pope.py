"""Score POPE answers the way LLaVA's reference scorer does: `python -m llava.eval.eval_pope --annotation-dir coco
--question-file llava_pope_test.jsonl --result-file answers.jsonl`.

For every `coco_pope_<category>.json` in the annotation folder (JSON lines, each with `label` yes/no), the questions
of that category are taken in question-file order and label i is paired with the i-th of them. An answer is parsed
as LLaVA does: keep the text before the first '.', remove commas, split on single spaces; it is "no" if one of the
tokens is exactly `No`, `not` or `no`, and "yes" otherwise (so "NO", "No!" and "Nope" count as yes). A label other
than "no" counts as positive. Reports TP/FP/TN/FN, accuracy, precision, recall, F1 and yes-ratio per category, and
the mean F1 and accuracy over the categories.

Differences from the reference, none of which changes a score on a complete run: labels are paired with questions
(in question-file order) rather than with answers in answers-file order, so a question without an answer is left
out together with its label instead of shifting every later label; a zero denominator gives 0.0 instead of an error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from llava.eval.io import EvalInputError, numbered_jsonl, read_jsonl

NO_WORDS = ("No", "not", "no")
ANNOTATION_PREFIX = "coco_pope_"
ANNOTATION_SUFFIX = ".json"


def parse_pope_answer(text: str) -> str:
    """LLaVA's POPE rule: "no" iff a space-separated token of the first sentence (commas removed) is No/not/no."""
    first_sentence = text.split(".")[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if any(word in NO_WORDS for word in words) else "yes"


def score_pope(labels: list[str], answers: list[str]) -> dict:
    """Confusion counts and metrics of raw model `answers` against yes/no `labels` (same order, same length)."""
    if len(labels) != len(answers):
        raise ValueError(f"{len(labels)} labels but {len(answers)} answers")
    predictions = [parse_pope_answer(answer) == "yes" for answer in answers]
    positives = [label != "no" for label in labels]
    tp = sum(p and g for p, g in zip(predictions, positives))
    fp = sum(p and not g for p, g in zip(predictions, positives))
    tn = sum(not p and not g for p, g in zip(predictions, positives))
    fn = sum(not p and g for p, g in zip(predictions, positives))
    total = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "samples": total,
        "TP": tp,
        "FP": fp,
        "TN": tn,
        "FN": fn,
        "accuracy": (tp + tn) / total if total else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": sum(predictions) / total if total else 0.0,
    }


def annotation_files(annotation_dir: str) -> dict[str, str]:
    """Category name → path of each `coco_pope_<category>.json` in `annotation_dir`, sorted by category."""
    if not os.path.isdir(annotation_dir):
        raise EvalInputError(f"{annotation_dir}: annotation folder not found")
    found = {}
    for name in sorted(os.listdir(annotation_dir)):
        if name.startswith(ANNOTATION_PREFIX) and name.endswith(ANNOTATION_SUFFIX):
            found[name[len(ANNOTATION_PREFIX) : -len(ANNOTATION_SUFFIX)]] = os.path.join(annotation_dir, name)
    if not found:
        raise EvalInputError(f"{annotation_dir}: no {ANNOTATION_PREFIX}<category>{ANNOTATION_SUFFIX} files")
    return found


def read_labels(path: str) -> list[str]:
    """The `label` of each line of a POPE annotation file; each must be "yes" or "no"."""
    labels = []
    for number, record in numbered_jsonl(path, ("label",)):
        if record["label"] not in ("yes", "no"):
            raise EvalInputError(f"{path}:{number}: label must be yes or no, got {record['label']!r}")
        labels.append(record["label"])
    return labels


def evaluate_pope(annotation_dir: str, question_file: str, result_file: str, asked_file: str | None = None) -> dict:
    """Per-category metrics (`categories`), mean F1/accuracy over categories and unanswered-question counts. With
    `asked_file` (the questions a run was given, e.g. the first LIMIT) only those are scored, and only their
    categories count; labels still pair with the whole question file."""
    questions = read_jsonl(question_file, ("question_id", "category"))
    asked = None if asked_file is None else {q["question_id"] for q in read_jsonl(asked_file, ("question_id",))}
    answers = read_jsonl(result_file, ("question_id", "text"), ("text",))
    known = {question["question_id"] for question in questions}
    by_id: dict = {}
    for answer in answers:
        if answer["question_id"] not in known:
            raise EvalInputError(f"{result_file}: question_id {answer['question_id']!r} is not in {question_file}")
        if answer["question_id"] in by_id:
            raise EvalInputError(f"{result_file}: question_id {answer['question_id']!r} answered twice")
        by_id[answer["question_id"]] = answer["text"]

    categories = {}
    for category, path in annotation_files(annotation_dir).items():
        ids = [q["question_id"] for q in questions if q["category"] == category]
        if not ids:
            continue
        labels = read_labels(path)
        if len(labels) != len(ids):
            raise EvalInputError(
                f"{path}: {len(labels)} labels but {question_file} has {len(ids)} questions of category {category}"
            )
        scored = [(label, qid) for label, qid in zip(labels, ids) if asked is None or qid in asked]
        if not scored:
            continue
        kept = [(label, by_id[qid]) for label, qid in scored if qid in by_id]
        metrics = score_pope([label for label, _ in kept], [text for _, text in kept])
        metrics["unanswered"] = len(scored) - len(kept)
        categories[category] = metrics
    if not categories:
        raise EvalInputError(f"{question_file}: no question has a category with an annotation file in {annotation_dir}")
    return {
        "categories": categories,
        "f1": sum(m["f1"] for m in categories.values()) / len(categories),
        "accuracy": sum(m["accuracy"] for m in categories.values()) / len(categories),
    }


def flat_metrics(result: dict) -> dict:
    """Mean F1/accuracy plus `f1_<category>` / `accuracy_<category>`, for a run summary."""
    flat = {"f1": result["f1"], "accuracy": result["accuracy"]}
    for category, metrics in result["categories"].items():
        flat[f"f1_{category}"] = metrics["f1"]
        flat[f"accuracy_{category}"] = metrics["accuracy"]
    return flat


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotation-dir", required=True)
    parser.add_argument("--question-file", required=True)
    parser.add_argument("--result-file", required=True)
    parser.add_argument("--metrics-out", default=None, help="also write the headline metrics here (JSON object)")
    parser.add_argument("--asked", default=None, help="score only the questions of this question file (a LIMIT run's)")
    args = parser.parse_args(argv)
    try:
        result = evaluate_pope(args.annotation_dir, args.question_file, args.result_file, args.asked)
    except (EvalInputError, ValueError, OSError) as error:
        sys.exit(f"eval_pope: error: {error}")
    for category, m in result["categories"].items():
        note = f" ({m['unanswered']} unanswered, left out)" if m["unanswered"] else ""
        print(f"Category: {category}, # samples: {m['samples']}{note}")
        print("TP\tFP\tTN\tFN\t")
        print(f"{m['TP']}\t{m['FP']}\t{m['TN']}\t{m['FN']}")
        print(f"Accuracy: {m['accuracy']}")
        print(f"Precision: {m['precision']}")
        print(f"Recall: {m['recall']}")
        print(f"F1 score: {m['f1']}")
        print(f"Yes ratio: {m['yes_ratio']}")
        print(f"{m['f1']:.3f}, {m['accuracy']:.3f}, {m['precision']:.3f}, {m['recall']:.3f}, {m['yes_ratio']:.3f}")
        print("====================================")
    print(f"Mean over {len(result['categories'])} categories: F1 {result['f1']:.3f}, accuracy {result['accuracy']:.3f}")
    if args.metrics_out:
        with open(args.metrics_out, "w") as handle:
            json.dump(flat_metrics(result), handle, indent=2)


if __name__ == "__main__":
    main()
