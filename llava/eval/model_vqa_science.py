"""ScienceQA answers: `python -m llava.eval.model_vqa_science --question-file llava_test_CQM-A.json
--image-folder scienceqa/images/test --answers-file a.jsonl --single-pred-prompt` (LLaVA's variant).

The question file is a JSON list in LLaVA's training format; the question is the first human turn with `<image>`
removed. The recorded `prompt` carries `<image>\\n` in front for image samples (what ScienceQA's IMG-Accuracy
looks for) and the letter instruction when `--single-pred-prompt` is set. Everything else is model_vqa_loader's.
"""

from __future__ import annotations

import argparse
import json
import os

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.eval.io import EvalInputError
from llava.eval.model_vqa_loader import add_loader_arguments, run_loader

LETTER_PROMPT = "\nAnswer with the option's letter from the given choices directly."


def read_science_questions(args: argparse.Namespace) -> list[dict]:
    path = args.question_file
    if not os.path.isfile(path):
        raise EvalInputError(f"{path}: file not found")
    with open(path) as handle:
        try:
            records = json.load(handle)
        except json.JSONDecodeError as error:
            raise EvalInputError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
    questions = []
    for number, record in enumerate(records):
        try:
            text = record["conversations"][0]["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
            question_id = record["id"]
        except (KeyError, IndexError, TypeError):
            raise EvalInputError(f"{path}: sample #{number} has no id or no first conversation turn") from None
        if args.single_pred_prompt:
            text += LETTER_PROMPT
        image = record.get("image")
        prompt = f"{DEFAULT_IMAGE_TOKEN}\n{text}" if image else text
        questions.append({"question_id": question_id, "text": text, "image": image, "prompt": prompt})
    return questions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_loader_arguments(parser)
    parser.add_argument("--single-pred-prompt", action="store_true")
    parser.add_argument("--answer-prompter", action="store_true", help="accepted for LLaVA's scripts; unused")
    parser.set_defaults(question_file="tables/question.json", max_new_tokens=1024)
    run_loader(parser.parse_args(argv), read_science_questions, "model_vqa_science")


if __name__ == "__main__":
    main()
