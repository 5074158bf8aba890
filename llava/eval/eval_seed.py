"""SEED-Bench: score LLaVA answers and write the upload file, as LLaVA's SEED converter does:
`python -m llava.eval.eval_seed --annotation-file SEED-Bench.json --result-file merge.jsonl
--result-upload-file upload.jsonl`.

`SEED-Bench.json` holds `questions` (each with `question_id`, `answer` letter, `question_type_id`, `data_type`
image/video) and `question_type` (name → id). An answer is right when its `text` equals the answer letter exactly
(no stripping, no case folding); a question without an answer is wrong. Prints the accuracy per question type (in
type-id order), the total, and the image and video accuracies (the image one is the reported SEED number).
The upload file has one line `{"question_id", "prediction"}` per annotation question, in annotation order, with the
annotation's `question_id`; every question must have an answer (the reference stops there as well).

Answers are looked up by the integer value of a question id when it has one, else by the id itself, on both sides,
so "101669" and 101669 match; the reference only tried the integer on the lookup side.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence

from llava.eval.io import EvalInputError, read_jsonl

DATA_TYPES = ("image", "video")


def read_annotation(path: str) -> dict:
    """SEED-Bench.json, checked: `questions` with the needed fields and a `question_type` name → id map."""
    if not os.path.isfile(path):
        raise EvalInputError(f"{path}: file not found")
    with open(path, encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as error:
            raise EvalInputError(f"{path}: invalid JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise EvalInputError(f"{path}: expected an object with a `questions` list")
    if not isinstance(data.get("question_type"), dict):
        raise EvalInputError(f"{path}: expected a `question_type` object (name -> id)")
    for number, question in enumerate(data["questions"]):
        needed = ("question_id", "answer", "question_type_id", "data_type")
        missing = [key for key in needed if not isinstance(question, dict) or key not in question]
        if missing:
            raise EvalInputError(f"{path}: questions[{number}] lacks {', '.join(missing)}")
    return data


def id_key(question_id):
    """The lookup key of a question id: its integer value when it has one, else the id itself."""
    if isinstance(question_id, bool):
        return question_id
    try:
        return int(question_id)
    except (TypeError, ValueError):
        return question_id


def _accuracy(correct: int, count: int) -> float | None:
    return correct / count * 100 if count else None


def score_seed(questions: Sequence[Mapping], answers: Mapping, type_names: Mapping | None = None) -> dict:
    """Accuracies (%) of `answers` (id_key → text) on SEED `questions`.

    Returns `types` (question_type_id → {name, count, correct, accuracy}, sorted by id), `total`, `image`, `video`
    (accuracy, None for an empty subset) and the matching counts.
    """
    names = {type_id: name for name, type_id in (type_names or {}).items()}
    per_type: dict = {}
    per_data: dict[str, list[int]] = {kind: [0, 0] for kind in DATA_TYPES}
    for question in questions:
        right = answers.get(id_key(question["question_id"])) == question["answer"]
        counts = per_type.setdefault(question["question_type_id"], [0, 0])
        counts[0] += 1
        counts[1] += right
        if question["data_type"] in per_data:
            per_data[question["data_type"]][0] += 1
            per_data[question["data_type"]][1] += right
    try:
        order = sorted(per_type)
    except TypeError:  # mixed id types: fall back to their text
        order = sorted(per_type, key=str)
    types = {
        type_id: {
            "name": names.get(type_id, str(type_id)),
            "count": count,
            "correct": correct,
            "accuracy": _accuracy(correct, count),
        }
        for type_id in order
        for count, correct in [per_type[type_id]]
    }
    count = sum(c for c, _ in per_type.values())
    correct = sum(r for _, r in per_type.values())
    result = {"types": types, "count": count, "correct": correct, "total": _accuracy(correct, count)}
    for kind, (kind_count, kind_correct) in per_data.items():
        result[kind] = _accuracy(kind_correct, kind_count)
        result[f"{kind}_count"] = kind_count
        result[f"{kind}_correct"] = kind_correct
    return result


def upload_records(questions: Sequence[Mapping], answers: Mapping) -> list[dict]:
    """`{"question_id", "prediction"}` per question in annotation order; KeyError naming the first unanswered id."""
    records = []
    for question in questions:
        key = id_key(question["question_id"])
        if key not in answers:
            raise KeyError(question["question_id"])
        records.append({"question_id": question["question_id"], "prediction": answers[key]})
    return records


def load(annotation_file: str, result_file: str) -> tuple[dict, dict]:
    """The annotation and the answers as id_key → text (a repeated id keeps its last answer)."""
    data = read_annotation(annotation_file)
    answers = {
        id_key(record["question_id"]): record["text"]
        for record in read_jsonl(result_file, ("question_id", "text"), ("text",))
    }
    return data, answers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotation-file", required=True)
    parser.add_argument("--result-file", required=True)
    parser.add_argument("--result-upload-file", required=True)
    parser.add_argument("--metrics-out", default=None, help="also write the headline metrics here (JSON object)")
    args = parser.parse_args(argv)
    try:
        data, answers = load(args.annotation_file, args.result_file)
    except (EvalInputError, OSError) as error:
        sys.exit(f"eval_seed: error: {error}")
    result = score_seed(data["questions"], answers, data["question_type"])

    def show(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}%"

    for entry in result["types"].values():
        print(f"{entry['name']}: {show(entry['accuracy'])}")
    print(f"Total accuracy: {show(result['total'])}")
    for kind in DATA_TYPES:
        print(f"{kind} accuracy: {show(result[kind])}")
    if args.metrics_out:
        with open(args.metrics_out, "w") as handle:
            json.dump({"image_accuracy": result["image"], "video_accuracy": result["video"],
                       "accuracy": result["total"]}, handle, indent=2)
    try:
        records = upload_records(data["questions"], answers)
    except KeyError as error:
        sys.exit(f"eval_seed: error: {args.result_file}: question {error.args[0]!r} has no answer; "
                 f"{args.result_upload_file} not written")
    os.makedirs(os.path.dirname(os.path.abspath(args.result_upload_file)), exist_ok=True)
    with open(args.result_upload_file, "w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)


if __name__ == "__main__":
    main()
