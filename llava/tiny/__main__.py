"""Tiny random checkpoints, offline: `python -m llava.tiny --out DIR [--format llava|hf] [--anyres]` writes our
LLaVA layouts (llava.tiny.llava), `--family F` one of transformers' VLM classes with its processor files
(llava.tiny.families)."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from llava.model.families import FAMILY_MODULES
from llava.tiny.families import write_tiny_family
from llava.tiny.llava import TinyGeometry, write_tiny_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--format", choices=("llava", "hf"), default="llava")
    parser.add_argument("--anyres", action="store_true", help="llava-v1.6-style: anyres tiles, spatial_unpad merge")
    parser.add_argument(
        "--family", choices=list(FAMILY_MODULES), default=None,
        help="instead: transformers' own class of this VLM family with its processor files "
        "(llava.tiny.families); the text sizes below apply, the vision tower is the family's tiny one",
    )
    parser.add_argument(
        "--gate-hidden-size", type=int, default=None, help="with --family: fresh exit gates of this width"
    )
    for name, default in asdict(TinyGeometry()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    args = parser.parse_args(argv)
    geometry = TinyGeometry(**{name: getattr(args, name) for name in asdict(TinyGeometry())})
    if args.family:
        write_tiny_family(args.out, args.family, geometry, args.gate_hidden_size)
        return
    if args.gate_hidden_size is not None:
        parser.error("--gate-hidden-size needs --family (init_weight.py adds gates to a LLaVA checkpoint)")
    write_tiny_checkpoint(args.out, args.format, geometry, args.anyres)


if __name__ == "__main__":
    main()
