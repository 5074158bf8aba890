"""MME: turn LLaVA answers into the official eval-tool files and score them as the official `calculation.py` does.

`python -m llava.eval.eval_mme convert --question-file llava_mme.jsonl --result-file answers.jsonl
--data-dir MME_Benchmark_release_version --out-dir eval_tool/answers/<ckpt>` writes `<category>.txt` per category,
lines `file\\tquestion\\tgt\\tprediction`: `file` is the ground-truth file name (`<image stem>.txt`, the stem being the
image name up to its first '.'), `question` is the prompt with the short-answer suffix removed and ` Please answer
yes or no.` re-added (with two spaces when only that spelling is in the ground truth), `gt` is looked up in
`<category>/<image stem>.txt` or `<category>/questions_answers_YN/<image stem>.txt` (when the category has `images/`)
with `question\\tanswer` lines. The category is the first component of `question_id`. Lines keep the answers-file
order, as in the reference (acc+ pairs adjacent lines, so the answers must keep the question order, as the loader
and chunk merging do); the question file, when given, is a check: every answer id must be in it, and questions
without an answer are reported.
Tabs and newlines inside a prediction become spaces, which keeps every line readable and leaves the parse unchanged.

`python -m llava.eval.eval_mme score --results-dir eval_tool/answers/<ckpt>`: the prediction is lower-cased; exactly
"yes"/"no" decide, otherwise its first 4 characters are searched for "yes", then for "no", and anything else is
"other" (always wrong). Per category: acc (per question) and acc+ (share of consecutive line pairs with both answers
right); score = acc × 100 + acc+ × 100, summed in that order as the tool does (`100 × (acc + acc+)` can differ in
the last bit), at most 200. Perception and Cognition are sums over their categories, in the tool's category order.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Iterable, Mapping

from llava.eval.io import EvalInputError, read_jsonl

SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."
YES_NO_SUFFIX = "Please answer yes or no."
PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
EVAL_TYPES = {"Perception": PERCEPTION, "Cognition": COGNITION}

GroundTruth = Mapping[tuple[str, str, str], str]


# ---------------------------------------------------------------- convert


def load_ground_truth(data_dir: str) -> dict[tuple[str, str, str], str]:
    """(category, `<stem>.txt`, question) → answer for every category folder of the MME release."""
    if not os.path.isdir(data_dir):
        raise EvalInputError(f"{data_dir}: MME data folder not found")
    truth = {}
    for category in sorted(os.listdir(data_dir)):
        category_dir = os.path.join(data_dir, category)
        if not os.path.isdir(category_dir):
            continue
        qa_dir = category_dir
        if os.path.isdir(os.path.join(category_dir, "images")):
            qa_dir = os.path.join(category_dir, "questions_answers_YN")
            if not os.path.isdir(qa_dir):
                raise EvalInputError(f"{qa_dir}: folder not found (the category has images/)")
        for name in sorted(os.listdir(qa_dir)):
            if not name.endswith(".txt"):
                continue
            path = os.path.join(qa_dir, name)
            with open(path, encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    fields = line.strip().split("\t")
                    if len(fields) != 2:
                        raise EvalInputError(f"{path}:{number}: expected 'question<TAB>answer'")
                    truth[(category, name, fields[0])] = fields[1]
    return truth


def category_of(question_id: str) -> str:
    """The category folder of an MME question id `<category>/[images/]<file>`."""
    return question_id.split("/")[0]


def gt_file_of(question_id: str) -> str:
    """`<image stem>.txt` for an MME question id; the stem ends at the image name's first '.'."""
    return question_id.split("/")[-1].split(".")[0] + ".txt"


def gt_question(prompt: str, category: str, gt_file: str, truth: GroundTruth) -> str:
    """The ground-truth spelling of a prompt: suffix removed, ` Please answer yes or no.` re-added (two-space form
    when only that one is known). Raises KeyError when neither spelling is in `truth`."""
    question = prompt
    if SHORT_ANSWER_SUFFIX in question:
        question = question.replace(SHORT_ANSWER_SUFFIX, "").strip()
    if YES_NO_SUFFIX not in question:
        question = f"{question} {YES_NO_SUFFIX}"
        if (category, gt_file, question) not in truth:
            question = question.replace(f" {YES_NO_SUFFIX}", f"  {YES_NO_SUFFIX}")
    if (category, gt_file, question) not in truth:
        raise KeyError(f"no ground truth for {category}/{gt_file}: {question!r}")
    return question


def convert_answers(answers: Iterable[dict], truth: GroundTruth) -> dict[str, list[str]]:
    """Category → eval-tool lines (`file\\tquestion\\tgt\\tprediction`, no newline) in the order of `answers`."""
    lines: dict[str, list[str]] = {}
    for answer in answers:
        qid = str(answer["question_id"])
        category, gt_file = category_of(qid), gt_file_of(qid)
        question = gt_question(answer["prompt"], category, gt_file, truth)
        prediction = answer["text"].replace("\t", " ").replace("\r", " ").replace("\n", " ")
        gt = truth[(category, gt_file, question)]
        lines.setdefault(category, []).append("\t".join((gt_file, question, gt, prediction)))
    return lines


def convert(question_file: str | None, result_file: str, data_dir: str, out_dir: str) -> dict:
    """Write `<out_dir>/<category>.txt` in answers-file order; returns {category: line count} and the question ids
    of `question_file` (when given) with fewer answers than questions."""
    answers = read_jsonl(result_file, ("question_id", "prompt", "text"), ("prompt", "text"))
    unanswered: list = []
    if question_file is not None:
        # Ids are not unique (both questions of an image share one), so they are counted, not mapped.
        expected = Counter(q["question_id"] for q in read_jsonl(question_file, ("question_id",)))
        given = Counter(answer["question_id"] for answer in answers)
        stray = [qid for qid in given if qid not in expected]
        if stray:
            raise EvalInputError(f"{result_file}: question_id {stray[0]!r} is not in {question_file}")
        unanswered = [qid for qid, count in expected.items() if given[qid] < count]
    truth = load_ground_truth(data_dir)
    try:
        lines = convert_answers(answers, truth)
    except KeyError as error:
        raise EvalInputError(f"{data_dir}: {error.args[0]}") from None
    os.makedirs(out_dir, exist_ok=True)
    for category, rows in lines.items():
        with open(os.path.join(out_dir, f"{category}.txt"), "w", encoding="utf-8") as handle:
            handle.writelines(row + "\n" for row in rows)
    return {"categories": {category: len(rows) for category, rows in lines.items()}, "unanswered": unanswered}


# ---------------------------------------------------------------- score


def parse_prediction(prediction: str) -> str:
    """"yes", "no" or "other", as the official tool parses a prediction."""
    prediction = prediction.lower()
    if prediction in ("yes", "no"):
        return prediction
    prefix = prediction[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def score_category(pairs: list[tuple[str, str]]) -> dict:
    """acc, acc+ and score of one category from (ground truth, raw prediction) in file order; lines 2k and 2k+1
    are the two questions of one image."""
    if len(pairs) % 2:
        raise ValueError(f"{len(pairs)} lines: an odd count cannot be split into image pairs")
    if not pairs:
        raise ValueError("no lines")
    right = []
    other = 0
    for gt, prediction in pairs:
        gt = gt.lower()
        if gt not in ("yes", "no"):
            raise ValueError(f"ground truth must be yes or no, got {gt!r}")
        parsed = parse_prediction(prediction)
        other += parsed == "other"
        right.append(parsed == gt)
    images = len(pairs) // 2
    acc = sum(right) / len(right)
    acc_plus = sum(right[2 * i] and right[2 * i + 1] for i in range(images)) / images
    return {
        "questions": len(pairs),
        "images": images,
        "correct": sum(right),
        "other": other,
        "acc": acc,
        "acc_plus": acc_plus,
        "score": acc * 100 + acc_plus * 100,  # calculation.py's order; 100 * (acc + acc+) can differ in the last bit
    }


def totals(category_scores: Mapping[str, float]) -> dict[str, float]:
    """Perception and Cognition: sums of the category scores; every category of both must be present."""
    missing = [name for names in EVAL_TYPES.values() for name in names if name not in category_scores]
    if missing:
        raise ValueError(f"missing categories: {', '.join(missing)}")
    return {kind: sum(category_scores[name] for name in names) for kind, names in EVAL_TYPES.items()}


def read_result_file(path: str) -> list[tuple[str, str]]:
    """(gt, prediction) of each line `file\\tquestion\\tgt\\tprediction` of an eval-tool answers file."""
    pairs = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.rstrip("\n")
            if not line:
                continue
            fields = line.split("\t")
            if len(fields) != 4:
                raise EvalInputError(f"{path}:{number}: expected 4 tab-separated fields, got {len(fields)}")
            if fields[2].lower() not in ("yes", "no"):
                raise EvalInputError(f"{path}:{number}: ground truth must be yes or no, got {fields[2]!r}")
            pairs.append((fields[2], fields[3]))
    return pairs


def score(results_dir: str) -> dict:
    """Per-category results (`categories`) and the Perception / Cognition sums for an eval-tool answers folder."""
    if not os.path.isdir(results_dir):
        raise EvalInputError(f"{results_dir}: results folder not found")
    categories = {}
    for names in EVAL_TYPES.values():
        for name in names:
            path = os.path.join(results_dir, f"{name}.txt")
            if not os.path.isfile(path):
                raise EvalInputError(f"{path}: file not found (every MME category is needed for the totals)")
            try:
                categories[name] = score_category(read_result_file(path))
            except ValueError as error:
                if isinstance(error, EvalInputError):
                    raise
                raise EvalInputError(f"{path}: {error}") from None
    sums = totals({name: result["score"] for name, result in categories.items()})
    return {"categories": categories, **sums}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    conv = commands.add_parser("convert", help="answers jsonl -> eval_tool/answers/<ckpt>/<category>.txt")
    conv.add_argument("--question-file", default=None, help="llava_mme.jsonl: checks ids, reports unanswered ones")
    conv.add_argument("--result-file", required=True)
    conv.add_argument("--data-dir", required=True, help="MME_Benchmark_release_version")
    conv.add_argument("--out-dir", required=True)
    sc = commands.add_parser("score", help="acc / acc+ per category, Perception and Cognition")
    sc.add_argument("--results-dir", required=True)
    sc.add_argument("--metrics-out", default=None, help="also write the headline metrics here (JSON object)")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            done = convert(args.question_file, args.result_file, args.data_dir, args.out_dir)
        else:
            result = score(args.results_dir)
    except (EvalInputError, ValueError, OSError) as error:
        sys.exit(f"eval_mme: error: {error}")
    if args.command == "convert":
        for category, count in sorted(done["categories"].items()):
            print(f"{category}: {count} lines")
        if done["unanswered"]:
            print(f"note: {len(done['unanswered'])} questions have no answer, e.g. {done['unanswered'][0]}")
        return
    for kind, names in EVAL_TYPES.items():
        print(f"=========== {kind} ===========")
        print(f"total score: {result[kind]}\n")
        for name in names:
            c = result["categories"][name]
            print(f"\t {name}  score: {c['score']}  (acc {c['acc']:.4f}, acc+ {c['acc_plus']:.4f}, other {c['other']})")
        print()
    if args.metrics_out:
        flat = {"perception": result["Perception"], "cognition": result["Cognition"]}
        flat.update({f"score_{name}": c["score"] for name, c in result["categories"].items()})
        with open(args.metrics_out, "w") as handle:
            json.dump(flat, handle, indent=2)


if __name__ == "__main__":
    main()
