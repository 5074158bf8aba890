"""Reading evaluation inputs, with one-line errors that name the file (and line)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any


class EvalInputError(ValueError):
    """An evaluation input cannot be used; the message names the file (and line)."""


def numbered_jsonl(path: str, required: Sequence[str] = (), strings: Sequence[str] = ()) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line of a JSON-lines file, all checked before any is used:
    `path:line: reason` on the first that is not a JSON object with the `required` keys (and `strings` as str)."""
    if not os.path.isfile(path):
        raise EvalInputError(f"{path}: file not found")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise EvalInputError(f"{path}:{number}: invalid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise EvalInputError(f"{path}:{number}: expected a JSON object")
            missing = [key for key in required if key not in record]
            if missing:
                raise EvalInputError(f"{path}:{number}: missing field(s) {', '.join(missing)}")
            for key in strings:
                if key in record and not isinstance(record[key], str):
                    raise EvalInputError(f"{path}:{number}: field {key} is not a string")
            records.append((number, record))
    return records


def read_jsonl(path: str, required: Sequence[str] = (), strings: Sequence[str] = ()) -> list[dict]:
    """The records of a JSON-lines file, checked as `numbered_jsonl` does."""
    return [record for _, record in numbered_jsonl(path, required, strings)]


def read_jsonl_lines(path: str, required: Sequence[str] = ()) -> tuple[list[dict], list[int]]:
    """The records of a JSON-lines file and their line numbers (for messages about a record later on)."""
    numbered = numbered_jsonl(path, required)
    return [record for _, record in numbered], [number for number, _ in numbered]


def read_json(path: str) -> Any:
    """A whole JSON file; `path:line: invalid JSON (reason)` when it does not parse."""
    if not os.path.isfile(path):
        raise EvalInputError(f"{path}: file not found")
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise EvalInputError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None


def write_json(path: str, payload: Any) -> None:
    """Write `payload` as JSON, creating the parent folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(payload, handle)
