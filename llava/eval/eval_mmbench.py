"""MMBench: build the evaluation-server submission and score dev answers locally.

`python -m llava.eval.eval_mmbench convert --annotation-file mmbench_dev_20230712.tsv --result-file answers.jsonl
--out submission.tsv` writes, as LLaVA's converter does, the TSV without the columns hint, category, source, image,
comment and l2-category, with a `prediction` column inserted as the 7th column (the answer's `text`, verbatim; empty
when a row has no answer; when several answers share a `question_id`, e.g. `--all-rounds`, the last one wins, as in
the reference). It also writes the same table as `.xlsx` next to it when openpyxl is importable, and logs a note
and skips the workbook otherwise. Columns named for removal that the TSV lacks are ignored.

`python -m llava.eval.eval_mmbench score --annotation-file mmbench_dev_20230712.tsv --result-file answers.jsonl`
(the TSV needs an `answer` column) reports plain per-row accuracy and circular accuracy: rows are grouped by
`index % 1,000,000` (circular copies of a question share it) and a group is right only if all its rows are right.

Letter rule (ours; the server uses its own matching): after leading whitespace and an optional '(', the text must
start with one of A, B, C, D that is not followed by a letter or digit, so "B", "B.", "(B) cat", "B: cat" give B and
"Banana", "b" or "The answer is B" give none (wrong). When an answer record carries `option_char` (a rotated round
of `model_vqa_mmbench --all-rounds`), the letter shown to the model is mapped back through it to the original
letter; a row answered in several rounds is right only if every round is right. A row without an answer is wrong.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence

from llava.eval.io import EvalInputError, read_jsonl

DROPPED_COLUMNS = ("hint", "category", "source", "image", "comment", "l2-category")
PREDICTION_POSITION = 6  # 0-based: the 7th column
LETTERS = ("A", "B", "C", "D")
CIRCULAR_MODULUS = 1_000_000
LETTER_PATTERN = re.compile(r"^\s*\(?([A-D])(?![A-Za-z0-9])")

logger = logging.getLogger(__name__)


def read_tsv(path: str, required: tuple[str, ...] = ("index",)) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows (column → text) of an MMBench TSV; every `index` must be an integer."""
    if not os.path.isfile(path):
        raise EvalInputError(f"{path}: file not found")
    csv.field_size_limit(sys.maxsize)  # the image column holds whole base64 images
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        header = next(reader, None)
        if header is None:
            raise EvalInputError(f"{path}: empty file")
        missing = [name for name in required if name not in header]
        if missing:
            raise EvalInputError(f"{path}: missing column(s) {', '.join(missing)}")
        rows = []
        for row in reader:
            if not row:
                continue
            line = reader.line_num
            if len(row) != len(header):
                raise EvalInputError(f"{path}:{line}: {len(row)} fields but the header has {len(header)}")
            record = dict(zip(header, row))
            if index_key(record["index"]) is None:
                raise EvalInputError(f"{path}:{line}: index {record['index']!r} is not an integer")
            rows.append(record)
    return header, rows


def index_key(value) -> int | None:
    """An MMBench index / question_id as an int (accepts 12, "12", 12.0), None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def answers_by_index(answers: Sequence[dict], path: str = "answers") -> dict[int, list[dict]]:
    """Answer records grouped by integer question_id, in file order."""
    grouped: dict[int, list[dict]] = {}
    for answer in answers:
        key = index_key(answer["question_id"])
        if key is None:
            raise EvalInputError(f"{path}: question_id {answer['question_id']!r} is not an integer index")
        grouped.setdefault(key, []).append(answer)
    return grouped


# ---------------------------------------------------------------- convert


def submission_table(
    header: Sequence[str], rows: Sequence[Mapping[str, str]], answers: Mapping[int, list[dict]]
) -> tuple[list[str], list[list[str]]]:
    """The submission header and rows: dropped columns removed, `prediction` inserted as the 7th column."""
    kept = [name for name in header if name not in DROPPED_COLUMNS]
    position = min(PREDICTION_POSITION, len(kept))
    out_header = kept[:position] + ["prediction"] + kept[position:]
    out_rows = []
    for row in rows:
        records = answers.get(index_key(row["index"]), [])
        prediction = records[-1]["text"] if records else ""
        values = [row[name] for name in kept]
        out_rows.append(values[:position] + [prediction] + values[position:])
    return out_header, out_rows


def write_tsv(path: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A tab-separated table (fields with tabs, newlines or quotes are quoted)."""
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_xlsx(path: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> bool:
    """The table as an Excel workbook (index as a number, empty cells blank); False, with a logged note, when
    openpyxl is not installed."""
    try:
        from openpyxl import Workbook
        from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
    except ImportError:
        logger.warning("openpyxl is not installed: %s not written (pip install openpyxl)", path)
        return False
    book = Workbook()
    sheet = book.active
    sheet.append(list(header))
    index_column = list(header).index("index") if "index" in header else -1
    for row in rows:
        cells = []
        for column, value in enumerate(row):
            if column == index_column:
                cells.append(index_key(value))
            elif value == "":
                cells.append(None)
            else:
                cells.append(ILLEGAL_CHARACTERS_RE.sub("", value))
        sheet.append(cells)
    book.save(path)
    return True


def convert(annotation_file: str, result_file: str, out: str) -> dict:
    """Write the submission TSV (and .xlsx when possible); returns paths and row/answer counts."""
    header, rows = read_tsv(annotation_file)
    answers = answers_by_index(read_jsonl(result_file, ("question_id", "text"), ("text",)), result_file)
    known = {index_key(row["index"]) for row in rows}
    stray = [key for key in answers if key not in known]
    if stray:
        raise EvalInputError(f"{result_file}: question_id {stray[0]} is not an index of {annotation_file}")
    out_header, out_rows = submission_table(header, rows, answers)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_tsv(out, out_header, out_rows)
    xlsx = os.path.splitext(out)[0] + ".xlsx"
    wrote_xlsx = write_xlsx(xlsx, out_header, out_rows)
    return {
        "tsv": out,
        "xlsx": xlsx if wrote_xlsx else None,
        "rows": len(out_rows),
        "unanswered": sum(index_key(row["index"]) not in answers for row in rows),
    }


# ---------------------------------------------------------------- score


def parse_letter(text: str) -> str | None:
    """The option letter an answer starts with (module docstring rule), None when there is none."""
    match = LETTER_PATTERN.match(text)
    return match.group(1) if match else None


def original_letter(answer: Mapping) -> str | None:
    """The parsed letter mapped back through `option_char` (rotated rounds) when the record has one."""
    letter = parse_letter(answer["text"])
    chars = answer.get("option_char")
    if letter is None or not chars:
        return letter
    position = LETTERS.index(letter)
    return chars[position] if position < len(chars) else None


def score_mmbench(rows: Sequence[Mapping[str, str]], answers: Mapping[int, list[dict]]) -> dict:
    """Per-row and circular accuracy of answers (by integer index) against the rows' `answer` letters."""
    row_right = []
    groups: dict[int, list[bool]] = {}
    group_category: dict[int, str] = {}
    unanswered = 0
    for row in rows:
        key = index_key(row["index"])
        records = answers.get(key, [])
        unanswered += not records
        right = bool(records) and all(original_letter(r) == row["answer"].strip() for r in records)
        row_right.append(right)
        group = key % CIRCULAR_MODULUS
        groups.setdefault(group, []).append(right)
        group_category.setdefault(group, row.get("category", ""))
    group_right = {group: all(values) for group, values in groups.items()}
    per_category: dict[str, list[bool]] = {}
    for group, right in group_right.items():
        if group_category[group]:
            per_category.setdefault(group_category[group], []).append(right)
    return {
        "rows": len(row_right),
        "rows_correct": sum(row_right),
        "accuracy": sum(row_right) / len(row_right) if row_right else 0.0,
        "groups": len(group_right),
        "groups_correct": sum(group_right.values()),
        "circular_accuracy": sum(group_right.values()) / len(group_right) if group_right else 0.0,
        "unanswered": unanswered,
        "categories": {name: sum(v) / len(v) for name, v in sorted(per_category.items())},
    }


def score(annotation_file: str, result_file: str) -> dict:
    """Read the dev TSV and the answers and score them (`score_mmbench`)."""
    _, rows = read_tsv(annotation_file, ("index", "answer"))
    answers = answers_by_index(read_jsonl(result_file, ("question_id", "text"), ("text",)), result_file)
    return score_mmbench(rows, answers)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    conv = commands.add_parser("convert", help="submission TSV (+ .xlsx when openpyxl is installed)")
    conv.add_argument("--annotation-file", required=True)
    conv.add_argument("--result-file", required=True)
    conv.add_argument("--out", required=True, help="submission .tsv; the .xlsx goes beside it")
    sc = commands.add_parser("score", help="local per-row and circular accuracy (dev TSV with answers)")
    sc.add_argument("--annotation-file", required=True)
    sc.add_argument("--result-file", required=True)
    sc.add_argument("--metrics-out", default=None, help="also write the headline metrics here (JSON object)")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            done = convert(args.annotation_file, args.result_file, args.out)
        else:
            result = score(args.annotation_file, args.result_file)
    except (EvalInputError, OSError) as error:
        sys.exit(f"eval_mmbench: error: {error}")
    if args.command == "convert":
        print(f"wrote {done['tsv']} ({done['rows']} rows, {done['unanswered']} without an answer)")
        if done["xlsx"]:
            print(f"wrote {done['xlsx']}")
        return
    print(f"Rows: {result['rows']}, correct: {result['rows_correct']}, accuracy: {result['accuracy'] * 100:.2f}%")
    print(f"Circular groups: {result['groups']}, correct: {result['groups_correct']}, "
          f"circular accuracy: {result['circular_accuracy'] * 100:.2f}%")
    for name, accuracy in result["categories"].items():
        print(f"\t{name}: {accuracy * 100:.2f}%")
    if result["unanswered"]:
        print(f"note: {result['unanswered']} rows have no answer (counted wrong)")
    if args.metrics_out:
        with open(args.metrics_out, "w") as handle:
            json.dump({"circular_accuracy": result["circular_accuracy"], "accuracy": result["accuracy"]}, handle,
                      indent=2)


if __name__ == "__main__":
    main()
