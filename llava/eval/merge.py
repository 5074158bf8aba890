"""Merge the chunks of one evaluation run: `python -m llava.eval.merge --out merge.jsonl 2_0.jsonl 2_1.jsonl`.

The answers are concatenated in chunk order (an empty chunk adds nothing; a last line without its newline gets
one), and the chunks' settings, which must all be the same, become `merge.settings.json`.
"""

from __future__ import annotations

import argparse
import os
import sys

from llava.eval.io import EvalInputError
from llava.eval.run_settings import differences, read_settings, settings_path, write_settings


def merge_chunks(parts: list[str], out: str) -> int:
    """Write `out` from `parts`; the number of answer lines."""
    settings = None
    for part in parts:
        if not os.path.isfile(part):
            raise EvalInputError(f"{part}: chunk not found")
        recorded = read_settings(part)
        if recorded is None:
            raise EvalInputError(f"{part}: no {os.path.basename(settings_path(part))}: not written by the loader")
        if settings is not None and recorded != settings:
            raise EvalInputError(f"{part}: made with other settings than {parts[0]} ({'; '.join(differences(settings, recorded))})")
        settings = recorded
    lines = 0
    with open(out, "w") as merged:
        for part in parts:
            with open(part) as handle:
                for line in handle:
                    if line.strip():
                        merged.write(line if line.endswith("\n") else line + "\n")
                        lines += 1
    write_settings(out, settings)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("parts", nargs="+")
    args = parser.parse_args(argv)
    try:
        lines = merge_chunks(args.parts, args.out)
    except EvalInputError as error:
        sys.exit(f"llava.eval.merge: error: {error}")
    print(f"merged {lines} answer lines from {len(args.parts)} chunk(s) into {args.out}")


if __name__ == "__main__":
    main()
