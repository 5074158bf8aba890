"""VQAv2 and VizWiz *val* accuracy under each benchmark's official evaluator, so val numbers match what its server
would report for the upload `eval_vqa` writes.

Both score the answer the upload carries (the model's text after EvalAI normalisation, `normalize_answer`) with the
leave-one-annotator-out accuracy (`leave_one_out_accuracy`) and the shared punctuation / digit / article /
contraction steps (`process_punctuation`, `process_digit_article`); they differ where their reference code does:

- VQAv2, GT-Vision-Lab `vqaEval.py` as of its 2021 fix (Python 2 code): newlines and tabs in the prediction and the 10 answers become
  spaces, then strip. Only when the 10 answers are not all the same string are prediction and answers normalised;
  with 10 identical answers the comparison is exact ("Yes" against ten "yes" scores 0). An answer's "others" are
  the entries that differ from it as whole dicts (text after normalisation, confidence, `answer_id`). Reported
  accuracies are `round(100 * sum / n, 2)` with Python 2's round: ties (in the double's exact value) away from zero.
- VizWiz, its challenge `vqaEval` port (Python 3): the prediction is always normalised, with a contraction table
  whose apostrophes are mostly U+2019; the ground-truth answers are never normalised; the others of answer i are
  the answers at other positions. Reported accuracies are `round(100 * sum / n, 2)` with Python 3's round (ties to
  even).

Questions are scored in annotation order (the order of the sums), restricted to the questions that have an answer:
the reference's `evaluate(quesIds)`. A prediction for a question the annotations lack is an error; annotated
questions without a prediction are not scored and are counted in `unscored`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal

from llava.eval.answer_processor import (
    CONTRACTIONS,
    leave_one_out_accuracy,
    process_digit_article,
    process_punctuation,
)
from llava.eval.io import EvalInputError, read_json

DIGITS = 2  # vqaEval's `n`, the decimals it reports

_VIZWIZ_STRAIGHT_KEYS = frozenset(("couldn'tve", "hadn'tve"))
_VIZWIZ_STRAIGHT_VALUES = frozenset(("aint", "arent", "cant", "couldve", "couldnt", "weve", "wheres", "whove"))


def _curly(text: str) -> str:
    return text.replace("'", "\u2019")


VIZWIZ_CONTRACTIONS: dict[str, str] = {
    (key if key in _VIZWIZ_STRAIGHT_KEYS else _curly(key)): (
        value if key in _VIZWIZ_STRAIGHT_VALUES else _curly(value)
    )
    for key, value in CONTRACTIONS.items()
}


def round_python2(value: float, digits: int = DIGITS) -> float:
    """Python 2's `round(value, digits)`: the double's exact value rounded half away from zero (vqaEval runs on 2)."""
    return float(Decimal(value).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def round_python3(value: float, digits: int = DIGITS) -> float:
    """Python 3's `round(value, digits)`: the double's exact value rounded half to even (VizWiz's port runs on 3)."""
    return round(value, digits)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqaeval_normalize(text: str, contractions: Mapping[str, str] = CONTRACTIONS) -> str:
    """vqaEval's `processPunctuation` then `processDigitArticle`: unlike EvalAI's processor, commas are not deleted
    first, so they count as punctuation and a digit-comma-digit deletes every mark, and "'s" is not split off."""
    return process_digit_article(process_punctuation(text), contractions)


def vqav2_question_accuracy(prediction: str, answers: Sequence[dict]) -> float:
    """vqaEval's accuracy in [0, 1] of one prediction against one question's answer entries (`answer`, ...)."""
    texts = [_clean(entry["answer"]) for entry in answers]
    prediction = _clean(prediction)
    if len(set(texts)) > 1:
        texts = [vqaeval_normalize(text) for text in texts]
        prediction = vqaeval_normalize(prediction)
    entries = [{**entry, "answer": text} for entry, text in zip(answers, texts)]
    return leave_one_out_accuracy(prediction, texts, entries)


def vizwiz_question_accuracy(prediction: str, answers: Sequence[dict]) -> float:
    """VizWiz's accuracy in [0, 1]: normalised prediction against the raw answers, one left out by position."""
    prediction = vqaeval_normalize(_clean(prediction), VIZWIZ_CONTRACTIONS)
    return leave_one_out_accuracy(prediction, [entry["answer"] for entry in answers])


def _percent(values: list[float], rounding: Callable[[float], float]) -> float:
    return rounding(100 * sum(values) / len(values))


def _score(
    annotations: Sequence[dict],
    predictions: Mapping,
    key: str,
    question_accuracy: Callable[[str, Sequence[dict]], float],
    rounding: Callable[[float], float],
    type_fields: Sequence[str],
    source: str,
) -> dict:
    """The reference's accumulation: per-question accuracies in annotation order, overall and per type."""
    annotated = {entry[key] for entry in annotations}
    stray = [name for name in predictions if name not in annotated]
    if stray:
        raise EvalInputError(f"{source}: no annotation for {key} {stray[0]!r} (do the annotations match the split?)")
    overall: list[float] = []
    per_type: dict[str, dict[str, list[float]]] = {field: {} for field in type_fields}
    for entry in annotations:
        if entry[key] not in predictions:
            continue
        accuracy = question_accuracy(predictions[entry[key]], entry["answers"])
        overall.append(accuracy)
        for field in type_fields:
            per_type[field].setdefault(entry[field], []).append(accuracy)
    if not overall:
        raise EvalInputError(f"{source}: no predictions to score")
    result: dict = {"accuracy": _percent(overall, rounding), "questions": len(overall),
                    "unscored": len(annotations) - len(overall)}
    for field, groups in per_type.items():
        result[f"per_{field}"] = {name: _percent(values, rounding) for name, values in groups.items()}
    return result


def score_vqav2(annotations: Sequence[dict], predictions: Mapping, source: str = "predictions") -> dict:
    """VQAv2 accuracy (percent, rounded as vqaEval reports it) of `predictions` (question_id -> answer).

    Returns `accuracy`, `questions`, `unscored`, `per_answer_type` and `per_question_type`; errors name `source`.
    """
    return _score(annotations, predictions, "question_id", vqav2_question_accuracy, round_python2,
                  ("answer_type", "question_type"), source)


def score_vizwiz(annotations: Sequence[dict], predictions: Mapping, source: str = "predictions") -> dict:
    """VizWiz accuracy (percent, rounded as its evaluator reports it) of `predictions` (image -> answer).

    Returns `accuracy`, `questions`, `unscored` and `per_answer_type`; errors name `source`.
    """
    return _score(annotations, predictions, "image", vizwiz_question_accuracy, round_python3, ("answer_type",),
                  source)


def _check_entries(path: str, entries: object, fields: Sequence[str]) -> list[dict]:
    if not isinstance(entries, list):
        raise EvalInputError(f"{path}: expected a list of annotations")
    for index, entry in enumerate(entries):
        missing = [field for field in fields if not isinstance(entry, dict) or field not in entry]
        if missing:
            raise EvalInputError(f"{path}: annotation {index}: missing field(s) {', '.join(missing)}")
        answers = entry["answers"]
        if not isinstance(answers, list) or not all(isinstance(a, dict) and "answer" in a for a in answers):
            raise EvalInputError(f"{path}: annotation {index}: 'answers' must be a list of {{\"answer\", ...}}")
    return entries


def load_vqav2_annotations(path: str) -> list[dict]:
    """The `annotations` list of an official VQAv2 annotation file (`v2_mscoco_val2014_annotations.json`)."""
    payload = read_json(path)
    entries = payload.get("annotations") if isinstance(payload, dict) else None
    return _check_entries(path, entries, ("question_id", "answers", "answer_type", "question_type"))


def load_vizwiz_annotations(path: str) -> list[dict]:
    """VizWiz's annotation list (`val.json`: `image`, `answers`, `answer_type`, ...)."""
    return _check_entries(path, read_json(path), ("image", "answers", "answer_type"))
