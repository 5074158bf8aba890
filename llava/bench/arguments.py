"""The arguments every bench takes, checked before any model is built: a bad one is one line from argparse, and
`--json` into a folder that cannot be written fails at once, not after the whole run."""

from __future__ import annotations

import argparse
import json
import os

import torch

from llava.arguments import positive_int


def bench_parser(description: str, presets, dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", choices=sorted(presets), default="llava-1.5-7b")
    parser.add_argument("--layers", type=positive_int, default=None, help="override the preset's layer count (e.g. 4 on a CPU)")
    parser.add_argument("--text-tokens", type=positive_int, default=60, help="text tokens besides the 576 visual ones")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--dtype", choices=dtypes, default=None)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return parser


def parse_bench_args(parser: argparse.ArgumentParser, argv: list[str] | None, presets) -> argparse.Namespace:
    """The parsed arguments, with `layers` resolved from the preset; a CUDA device without one and an unwritable
    --json are refused here."""
    args = parser.parse_args(argv)
    args.layers = args.layers or presets[args.preset]["num_hidden_layers"]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if args.json:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "a"):
                pass
        except OSError as error:
            parser.error(f"--json {args.json}: cannot write it ({error.strerror})")
    return args


def write_rows(path: str | None, args: argparse.Namespace, rows: list[dict]) -> None:
    if path:
        with open(path, "w") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=2)
