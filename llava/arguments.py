"""Argument types the command lines share."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """A count of at least one: `--batch-size 0` or `--gate-hidden-size 0` is refused by argparse, by name."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
