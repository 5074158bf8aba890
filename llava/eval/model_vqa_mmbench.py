"""MMBench answers: `python -m llava.eval.model_vqa_mmbench --question-file mmbench_dev_20230712.tsv
--answers-file a.jsonl --single-pred-prompt [--all-rounds] [--lang cn]` (LLaVA's variant).

Images come base64-encoded in the TSV. The question is `[hint\\n]question` plus one `X. option` line per option;
`--all-rounds` asks again with the options rotated once per option (circular evaluation), each round its own
answer line with `round_id`, the rotated `options` and their `option_char`. Everything else is model_vqa_loader's.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import os
import sys

from PIL import Image, UnidentifiedImageError

from llava.eval.io import EvalInputError
from llava.eval.model_vqa_loader import add_loader_arguments, run_loader

LETTERS = "ABCD"
LETTER_PROMPTS = {
    "en": "\nAnswer with the option's letter from the given choices directly.",
    "cn": "\n请直接回答选项字母。",
}


def _present(value: str | None) -> bool:
    return value is not None and value.strip() != "" and value.strip().lower() != "nan"


def decode_image(data: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
    except (ValueError, UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot decode image ({error})") from None


def read_mmbench_questions(args: argparse.Namespace) -> list[dict]:
    path = args.question_file
    if not os.path.isfile(path):
        raise EvalInputError(f"{path}: file not found")
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    questions = []
    with open(path, newline="") as handle:
        for number, row in enumerate(csv.DictReader(handle, delimiter="\t"), start=2):
            if not row.get("index") or not row.get("question") or not row.get("image"):
                raise EvalInputError(f"{path}:{number}: missing index, question or image")
            options = [row[letter] for letter in LETTERS if _present(row.get(letter))]
            try:
                image = decode_image(row["image"])
            except ValueError as error:
                raise EvalInputError(f"{path}:{number}: {error}") from None
            question = f"{row['hint']}\n{row['question']}" if _present(row.get("hint")) else row["question"]
            rounds = len(options) if args.all_rounds else 1
            for round_id in range(rounds):
                rotated = options[round_id:] + options[:round_id]
                # Each shown letter's original letter, rotated alongside the options (LLaVA's `option_char`).
                letters = LETTERS[: len(options)]
                original = list(letters[round_id:] + letters[:round_id])
                prompt = question + "".join(f"\n{letter}. {option}" for letter, option in zip(LETTERS, rotated))
                text = prompt + (LETTER_PROMPTS[args.lang] if args.single_pred_prompt else "")
                questions.append({
                    "question_id": int(row["index"]) if row["index"].isdigit() else row["index"],
                    "round_id": round_id,
                    "text": text,
                    "prompt": prompt,
                    "image": image,
                    "extra": {"round_id": round_id, "options": rotated, "option_char": original},
                })
    return questions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_loader_arguments(parser)
    parser.add_argument("--single-pred-prompt", action="store_true")
    parser.add_argument("--all-rounds", action="store_true")
    parser.add_argument("--lang", choices=sorted(LETTER_PROMPTS), default="en")
    run_loader(parser.parse_args(argv), read_mmbench_questions, "model_vqa_mmbench")


if __name__ == "__main__":
    main()
