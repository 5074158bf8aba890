"""GQA test-dev balanced: LLaVA's prediction converter and exact-match scoring, `python -m llava.eval.eval_gqa`.

- `convert --src merge.jsonl --dst testdev_balanced_predictions.json`: LLaVA's `convert_gqa_for_eval`: a JSON list
  of `{"questionId", "prediction"}`, one per answer record in file order, prediction = the answer text with its
  trailing periods removed, then lower-cased. Whitespace is not stripped (" yes" stays " yes" and is wrong).
- `score --questions testdev_balanced_questions.json --predictions testdev_balanced_predictions.json
  [--metrics-out m.json]`: exact string match of prediction and `answer` over the balanced questions of the GQA
  questions file (a dict `{questionId: {"answer", "types": {"structural", "semantic"}, "isBalanced", ...}}`),
  overall, binary/open (open = structural type `query`, binary = every other: verify, logical, compare, choose)
  and per structural and semantic type, as the official `eval.py` reports them, each computed as it does:
  `correct / count * 100`. Unlike the official script, which stops on a missing prediction, a question without a
  prediction counts as wrong and is counted in `missing`; an empty binary/open group is None where it prints 0.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Iterator, Sequence

from llava.eval.eval_vqa import _text, _where
from llava.eval.io import EvalInputError, read_json, read_jsonl, read_jsonl_lines, write_json


def gqa_prediction(text: str) -> str:
    """LLaVA's GQA conversion of one answer: trailing periods dropped, lower case."""
    return text.rstrip(".").lower()


def convert_gqa(results: Sequence[dict], source: str = "results", lines: Sequence[int] | None = None) -> list[dict]:
    """LLaVA's GQA converter on answer records: `{"questionId", "prediction": text.rstrip('.').lower()}`."""
    predictions = []
    for index, record in enumerate(results):
        text = _text(record, _where(source, lines, index))
        predictions.append({"questionId": record["question_id"], "prediction": gqa_prediction(text)})
    return predictions


def _percent(values: list[bool]) -> float:
    """eval.py's order: the mean first, then times 100 (`100 * s / n` can differ in the last bit)."""
    return sum(values) / len(values) * 100


def balanced_answers(questions: dict, predictions: Sequence[dict]) -> Iterator[tuple[dict, str | None, bool]]:
    """(question, its prediction or None, right?) per balanced question, in the questions dict's order; ids compared
    as strings, a later prediction for an id replacing an earlier one."""
    predicted = {str(entry["questionId"]): entry["prediction"] for entry in predictions}
    for question_id, question in questions.items():
        if question.get("isBalanced", True):
            prediction = predicted.get(str(question_id))
            yield question, prediction, prediction is not None and prediction == question["answer"]


def score_gqa(questions: dict, predictions: Sequence[dict]) -> dict:
    """Exact-match accuracy (percent) of `predictions` on the balanced questions of a GQA questions dict.

    Question ids are compared as strings; a later prediction for the same id replaces an earlier one. Returns
    `accuracy`, `binary`, `open` (None when a group is empty), `questions`, `correct`, `missing` (questions without
    a prediction, scored wrong) and dicts `structural` and `semantic` of per-type accuracy.
    """
    overall: list[bool] = []
    groups: dict[str, list[bool]] = {"binary": [], "open": []}
    structural: dict[str, list[bool]] = defaultdict(list)
    semantic: dict[str, list[bool]] = defaultdict(list)
    missing = 0
    for question, prediction, correct in balanced_answers(questions, predictions):
        missing += prediction is None
        kind = question["types"]["structural"]
        overall.append(correct)
        groups["open" if kind == "query" else "binary"].append(correct)
        structural[kind].append(correct)
        if "semantic" in question["types"]:
            semantic[question["types"]["semantic"]].append(correct)
    if not overall:
        raise ValueError("no balanced questions to score")
    return {
        "accuracy": _percent(overall),
        "binary": _percent(groups["binary"]) if groups["binary"] else None,
        "open": _percent(groups["open"]) if groups["open"] else None,
        "questions": len(overall),
        "correct": sum(overall),
        "missing": missing,
        "structural": {kind: _percent(values) for kind, values in sorted(structural.items())},
        "semantic": {kind: _percent(values) for kind, values in sorted(semantic.items())},
    }


def run_convert(src: str, dst: str) -> int:
    """Convert an answers file to the GQA predictions file; returns the number of predictions."""
    results, lines = read_jsonl_lines(src, ("question_id", "text"))
    predictions = convert_gqa(results, source=src, lines=lines)
    write_json(dst, predictions)
    return len(predictions)


def load_questions(path: str) -> dict:
    questions = read_json(path)
    if not isinstance(questions, dict):
        raise EvalInputError(f"{path}: expected a JSON object {{questionId: question}}")
    for question_id, question in questions.items():
        if not isinstance(question, dict) or "answer" not in question:
            raise EvalInputError(f"{path}: question {question_id}: missing field 'answer'")
        types = question.get("types")
        if not isinstance(types, dict) or "structural" not in types:
            raise EvalInputError(f"{path}: question {question_id}: missing field 'types.structural'")
    return questions


def _load_predictions(path: str) -> list[dict]:
    predictions = read_json(path)
    if not isinstance(predictions, list):
        raise EvalInputError(f"{path}: expected a JSON list of {{questionId, prediction}}")
    for index, entry in enumerate(predictions):
        missing = [key for key in ("questionId", "prediction") if not isinstance(entry, dict) or key not in entry]
        if missing:
            raise EvalInputError(f"{path}: entry {index}: missing field(s) {', '.join(missing)}")
    return predictions


def run_score(questions_file: str, predictions_file: str, asked_file: str | None = None) -> dict:
    """`score_gqa` on files; with `asked_file` (the question file a run was given, e.g. the first LIMIT questions)
    only on the questions it holds."""
    questions = load_questions(questions_file)
    if asked_file is not None:
        asked = {str(record["question_id"]) for record in read_jsonl(asked_file, ("question_id",))}
        questions = {question_id: q for question_id, q in questions.items() if str(question_id) in asked}
    return score_gqa(questions, _load_predictions(predictions_file))


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}%"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llava.eval.eval_gqa", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="answers (jsonl) -> GQA predictions file")
    convert.add_argument("--src", required=True)
    convert.add_argument("--dst", required=True)
    score = commands.add_parser("score", help="exact-match accuracy on the GQA questions file")
    score.add_argument("--questions", required=True)
    score.add_argument("--predictions", required=True)
    score.add_argument("--metrics-out", default=None, help="also write the metrics as a JSON object")
    score.add_argument("--asked", default=None, help="score only the questions of this question file (a LIMIT run's)")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            count = run_convert(args.src, args.dst)
            print(f"wrote {count} predictions to {args.dst}")
            return
        metrics = run_score(args.questions, args.predictions, args.asked)
    except ValueError as error:
        sys.exit(f"eval_gqa: error: {error}")
    print(f"Questions: {metrics['questions']}  (without a prediction, scored wrong: {metrics['missing']})")
    print(f"Binary: {_format(metrics['binary'])}")
    print(f"Open: {_format(metrics['open'])}")
    print(f"Accuracy: {_format(metrics['accuracy'])}")
    print("Accuracy per structural type:")
    for kind, value in metrics["structural"].items():
        print(f"  {kind}: {_format(value)}")
    if metrics["semantic"]:
        print("Accuracy per semantic type:")
        for kind, value in metrics["semantic"].items():
            print(f"  {kind}: {_format(value)}")
    if args.metrics_out:
        write_json(args.metrics_out, metrics)


if __name__ == "__main__":
    main()
