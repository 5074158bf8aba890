"""VQA-style scoring and submission files: `python -m llava.eval.eval_vqa
{textvqa,vqav2,vizwiz,vqav2-submission,vizwiz-submission}`.

- `textvqa --annotation-file TextVQA_0.5.1_val.json --result-file answers.jsonl [--metrics-out m.json]`: LLaVA's
  TextVQA scorer. Each answer is matched to an annotation by (image id = the answer's `question_id`, lower-cased
  question recovered from its `prompt`), then scored with soft VQA accuracy under EvalAI normalisation. Prints
  `Samples: N` and `Accuracy: X.XX%`, the accuracy being `100 * (sum / N)` in that order, as LLaVA computes it.
- `vqav2 --annotation-file v2_mscoco_val2014_annotations.json --result-file answers.jsonl [--metrics-out m.json]`
  and `vizwiz --annotation-file val.json --question-file llava_val.jsonl --result-file answers.jsonl
  [--metrics-out m.json]`: val accuracy under the official evaluators' rules (`llava.eval.vqa_eval`) of the
  answers the upload would carry; VizWiz answers reach their image through the question file.
- `vqav2-submission --src merge.jsonl --test-file llava_vqav2_mscoco_test2015.jsonl --dst answers_upload.json`: the
  EvalAI upload, `{"question_id", "answer"}` for every question of the full test file (unanswered -> "").
- `vizwiz-submission --annotation-file llava_test.jsonl --result-file answers.jsonl --dst upload.json`: the EvalAI
  upload, `{"image", "answer"}` for every question; a question without an answer is an error.

Answers are EvalAI-normalised (`llava.eval.answer_processor`). Malformed input stops with one line naming the file
(and the line, for JSON lines). The same work is available without files: `score_textvqa`, `vqav2_submission`,
`vizwiz_submission`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

from llava.eval.answer_processor import normalize_answer, vqa_accuracy
from llava.eval.io import EvalInputError, read_json, read_jsonl, read_jsonl_lines, write_json
from llava.eval.vqa_eval import load_vizwiz_annotations, load_vqav2_annotations, score_vizwiz, score_vqav2


def _where(source: str, lines: Sequence[int] | None, index: int) -> str:
    return f"{source}:{lines[index] if lines is not None else index + 1}"


def _text(record: dict, where: str) -> str:
    text = record.get("text")
    if not isinstance(text, str):
        raise EvalInputError(f"{where}: 'text' is not a string")
    return text


def _answers_by_id(results: Sequence[dict], source: str, lines: Sequence[int] | None) -> dict:
    """question_id -> answer text (checked to be a string); a later record of the same id wins."""
    return {record["question_id"]: _text(record, _where(source, lines, index)) for index, record in enumerate(results)}


# ----------------------------------------------------------------------------------------------------------- textvqa

_OCR_TOKENS_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def question_from_prompt(prompt: str) -> str:
    """The lower-cased question inside a TextVQA answer's `prompt`, found as LLaVA's scorer finds it.

    `OCR tokens: … Question: Q Short answer:` prompts give Q; a 3-line prompt with a `Reference OCR token: ` line
    gives its first line (its second when the OCR line comes first); any other prompt gives its first line.
    """
    if prompt.startswith("OCR tokens: "):
        match = _OCR_TOKENS_QUESTION.search(prompt)
        if match is None:
            raise ValueError("prompt starts with 'OCR tokens: ' but has no 'Question: … Short answer:'")
        question = match.group(1)
    else:
        lines = prompt.split("\n")
        if "Reference OCR token: " in prompt and len(lines) == 3 and prompt.startswith("Reference OCR token:"):
            question = lines[1]
        else:
            question = lines[0]
    return question.lower()


def score_textvqa(
    annotations: dict | list[dict],
    results: Sequence[dict],
    source: str = "results",
    lines: Sequence[int] | None = None,
) -> dict:
    """LLaVA's TextVQA score of answer records against `TextVQA_0.5.1_val.json` (the object or its `data` list).

    Returns `{"samples": N, "accuracy": percent}`. Annotations are keyed by (image_id, lower-cased question), a later
    duplicate replacing an earlier one; an answer without a matching annotation is an error naming
    `source:line` (`lines` gives the line numbers of `results`, else their 1-based positions).
    """
    entries = annotations["data"] if isinstance(annotations, dict) else annotations
    table = {(entry["image_id"], entry["question"].lower()): entry for entry in entries}
    scores = []
    for index, result in enumerate(results):
        where = _where(source, lines, index)
        try:
            question = question_from_prompt(result["prompt"])
        except ValueError as error:
            raise EvalInputError(f"{where}: {error}") from None
        entry = table.get((result["question_id"], question))
        if entry is None:
            raise EvalInputError(
                f"{where}: no annotation for image {result['question_id']!r} with question {question!r}"
            )
        scores.append(vqa_accuracy(_text(result, where), entry["answers"]))
    accuracy = 100.0 * (sum(scores) / len(scores)) if scores else 0.0
    return {"samples": len(scores), "accuracy": accuracy}


def _textvqa_annotations(path: str) -> list[dict]:
    payload = read_json(path)
    entries = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(entries, list):
        raise EvalInputError(f"{path}: expected a JSON object with a 'data' list")
    for index, entry in enumerate(entries):
        fields = ("image_id", "question", "answers")
        missing = [key for key in fields if not isinstance(entry, dict) or key not in entry]
        if missing:
            raise EvalInputError(f"{path}: data[{index}]: missing field(s) {', '.join(missing)}")
        if not isinstance(entry["answers"], list):
            raise EvalInputError(f"{path}: data[{index}]: 'answers' is not a list")
    return entries


def run_textvqa(annotation_file: str, result_file: str) -> dict:
    """`score_textvqa` on files."""
    annotations = _textvqa_annotations(annotation_file)
    results, lines = read_jsonl_lines(result_file, ("question_id", "prompt", "text"))
    return score_textvqa(annotations, results, source=result_file, lines=lines)


# ----------------------------------------------------------------------------------------------------------- vqav2


def vqav2_submission(
    results: Sequence[dict],
    test_questions: Sequence[dict],
    source: str = "results",
    lines: Sequence[int] | None = None,
) -> list[dict]:
    """EvalAI VQAv2 upload: `{"question_id", "answer"}` for every test question, in test-file order.

    Answers are normalised; a question without an answer record gets "" (a later record of the same id wins).
    """
    answers = _answers_by_id(results, source, lines)
    return [
        {
            "question_id": question["question_id"],
            "answer": normalize_answer(answers[question["question_id"]]) if question["question_id"] in answers else "",
        }
        for question in test_questions
    ]


def run_vqav2_submission(src: str, test_file: str, dst: str) -> dict:
    """Write the VQAv2 upload; returns counts of questions, answer records and unanswered questions."""
    results, lines = read_jsonl_lines(src, ("question_id", "text"))
    questions = read_jsonl(test_file, ("question_id",))
    upload = vqav2_submission(results, questions, source=src, lines=lines)
    write_json(dst, upload)
    answered = {record["question_id"] for record in results}
    missing = sum(question["question_id"] not in answered for question in questions)
    return {"questions": len(questions), "results": len(results), "missing": missing}


def run_vqav2(annotation_file: str, result_file: str) -> dict:
    """`score_vqav2` of the answers' normalised texts (what the upload carries) against VQAv2 val annotations."""
    annotations = load_vqav2_annotations(annotation_file)
    results, lines = read_jsonl_lines(result_file, ("question_id", "text"))
    answers = _answers_by_id(results, result_file, lines)
    predictions = {question_id: normalize_answer(text) for question_id, text in answers.items()}
    return score_vqav2(annotations, predictions, source=result_file)


# ----------------------------------------------------------------------------------------------------------- vizwiz


def vizwiz_submission(
    test_questions: Sequence[dict],
    results: Sequence[dict],
    source: str = "results",
    lines: Sequence[int] | None = None,
) -> list[dict]:
    """EvalAI VizWiz upload: `{"image", "answer"}` (normalised) for every test question, in question-file order.

    Every question must have an answer record; a missing one is an error naming the question id.
    """
    answers = _answers_by_id(results, source, lines)
    upload = []
    for question in test_questions:
        if question["question_id"] not in answers:
            raise EvalInputError(f"{source}: no answer for question_id {question['question_id']!r}")
        upload.append({"image": question["image"], "answer": normalize_answer(answers[question["question_id"]])})
    return upload


def run_vizwiz_submission(annotation_file: str, result_file: str, dst: str) -> dict:
    """Write the VizWiz upload; returns the number of questions."""
    questions = read_jsonl(annotation_file, ("question_id", "image"))
    results, lines = read_jsonl_lines(result_file, ("question_id", "text"))
    upload = vizwiz_submission(questions, results, source=result_file, lines=lines)
    write_json(dst, upload)
    return {"questions": len(upload)}


def run_vizwiz(annotation_file: str, question_file: str, result_file: str) -> dict:
    """`score_vizwiz` of the answers' normalised texts, each under its question's image, against VizWiz val.json."""
    annotations = load_vizwiz_annotations(annotation_file)
    questions = read_jsonl(question_file, ("question_id", "image"))
    image_of = {question["question_id"]: question["image"] for question in questions}
    results, lines = read_jsonl_lines(result_file, ("question_id", "text"))
    predictions = {}
    for question_id, text in _answers_by_id(results, result_file, lines).items():
        if question_id not in image_of:
            raise EvalInputError(f"{result_file}: question_id {question_id!r} is not in {question_file}")
        predictions[image_of[question_id]] = normalize_answer(text)
    return score_vizwiz(annotations, predictions, source=result_file)


def _print_val(metrics: dict) -> None:
    """The reference demo's report: overall, then per answer type, two decimals."""
    print(f"Questions: {metrics['questions']} (annotated without an answer, not scored: {metrics['unscored']})")
    print(f"Overall Accuracy is: {metrics['accuracy']:.2f}")
    print("Per Answer Type Accuracy is the following:")
    for kind, value in metrics["per_answer_type"].items():
        print(f"{kind} : {value:.2f}")


# -------------------------------------------------------------------------------------------------------------- cli


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llava.eval.eval_vqa", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    textvqa = commands.add_parser("textvqa", help="score TextVQA val answers")
    textvqa.add_argument("--annotation-file", required=True)
    textvqa.add_argument("--result-file", required=True)
    textvqa.add_argument("--metrics-out", default=None, help="also write the metrics as a JSON object")
    vqav2_val = commands.add_parser("vqav2", help="score VQAv2 val answers (vqaEval rules)")
    vqav2_val.add_argument("--annotation-file", required=True, help="v2_mscoco_val2014_annotations.json")
    vqav2_val.add_argument("--result-file", required=True)
    vqav2_val.add_argument("--metrics-out", default=None, help="also write the metrics as a JSON object")
    vizwiz_val = commands.add_parser("vizwiz", help="score VizWiz val answers (VizWiz evaluator rules)")
    vizwiz_val.add_argument("--annotation-file", required=True, help="VizWiz val.json")
    vizwiz_val.add_argument("--question-file", required=True, help="the answered questions (question_id, image)")
    vizwiz_val.add_argument("--result-file", required=True)
    vizwiz_val.add_argument("--metrics-out", default=None, help="also write the metrics as a JSON object")
    vqav2 = commands.add_parser("vqav2-submission", help="write the VQAv2 EvalAI upload")
    vqav2.add_argument("--src", required=True)
    vqav2.add_argument("--test-file", required=True)
    vqav2.add_argument("--dst", required=True)
    vizwiz = commands.add_parser("vizwiz-submission", help="write the VizWiz EvalAI upload")
    vizwiz.add_argument("--annotation-file", required=True)
    vizwiz.add_argument("--result-file", required=True)
    vizwiz.add_argument("--dst", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "textvqa":
            metrics = run_textvqa(args.annotation_file, args.result_file)
            print(os.path.splitext(os.path.basename(args.result_file))[0])
            print(f"Samples: {metrics['samples']}")
            print(f"Accuracy: {metrics['accuracy']:.2f}%")
            if args.metrics_out:
                write_json(args.metrics_out, metrics)
        elif args.command in ("vqav2", "vizwiz"):
            if args.command == "vqav2":
                metrics = run_vqav2(args.annotation_file, args.result_file)
            else:
                metrics = run_vizwiz(args.annotation_file, args.question_file, args.result_file)
            _print_val(metrics)
            if args.metrics_out:
                write_json(args.metrics_out, metrics)
        elif args.command == "vqav2-submission":
            counts = run_vqav2_submission(args.src, args.test_file, args.dst)
            print(
                f"questions: {counts['questions']}, answer records: {counts['results']}, "
                f"unanswered (empty answer): {counts['missing']}"
            )
            print(f"wrote {args.dst}")
        else:
            counts = run_vizwiz_submission(args.annotation_file, args.result_file, args.dst)
            print(f"questions: {counts['questions']}")
            print(f"wrote {args.dst}")
    except ValueError as error:
        sys.exit(f"eval_vqa: error: {error}")


if __name__ == "__main__":
    main()
