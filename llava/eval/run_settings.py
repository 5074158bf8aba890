"""What produced an answers file, so that a rerun never reports answers made with other settings.

Beside `answers.jsonl` the loader keeps `answers.settings.json`: model, exit settings, template, decoding. A rerun
into the same file must ask for the same settings (or start afresh with `--overwrite`); `llava.eval.merge` carries
them to the merged file and `llava.eval.summary` into the summary. `answers.lock` keeps two runs from writing one
file at once.

    python -m llava.eval.run_settings --model-path DIR [--exit-mode ...]   # prints the run's folder name
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager

from llava.eval.io import EvalInputError, read_json

# Loader flags that change the prompts (ScienceQA, MMBench); absent ones are left out.
PROMPT_FLAGS = ("single_pred_prompt", "all_rounds", "lang")


def settings_path(answers_file: str) -> str:
    return os.path.splitext(answers_file)[0] + ".settings.json"


def run_label(args: argparse.Namespace, exit_config) -> str:
    """The run's name in folders and tables: the exit's label, or `METHOD-RULE+T` for a method at a budget by a
    rule (`pdrop-paper64`, `sparsevlm-equal64`)."""
    if getattr(args, "exit_method", None) is not None:
        return f"{args.exit_method}-{budget_rule(args)}{args.visual_budget:g}"
    return exit_config.label


def budget_rule(args: argparse.Namespace) -> str:
    return getattr(args, "budget_rule", None) or "paper"


def run_settings(args: argparse.Namespace, exit_config, conv_mode: str) -> dict:
    """Everything that changes an answer: not the batch size (a batch answers as each sample alone) nor the
    image folder (a fixed folder only turns error records into answers)."""
    settings = {
        "model_path": os.path.abspath(args.model_path),
        "model_base": args.model_base and os.path.abspath(args.model_base),
        "exit": exit_config.settings(),
        "exit_label": run_label(args, exit_config),
        "conv_mode": conv_mode,
        "decoding": {
            "temperature": args.temperature,
            "top_p": args.top_p,
            "num_beams": args.num_beams,
            "max_new_tokens": args.max_new_tokens,
        },
        "device": args.device_type,
        **{flag: getattr(args, flag) for flag in PROMPT_FLAGS if hasattr(args, flag)},
    }
    if getattr(args, "exit_method", None) is not None:
        settings["budget"] = {"method": args.exit_method, "visual_budget": args.visual_budget, "rule": budget_rule(args)}
    return settings


def read_settings(answers_file: str) -> dict | None:
    path = settings_path(answers_file)
    return read_json(path) if os.path.isfile(path) else None


def write_settings(answers_file: str, settings: dict) -> None:
    with open(settings_path(answers_file), "w") as handle:
        json.dump(settings, handle, indent=1)


def differences(recorded: dict, wanted: dict, prefix: str = "") -> list[str]:
    """`key: recorded -> wanted` for every setting that differs, nested keys joined by dots."""
    lines = []
    for key in sorted(set(recorded) | set(wanted)):
        old, new = recorded.get(key), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            lines += differences(old, new, f"{prefix}{key}.")
        elif old != new:
            lines.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return lines


def check_resumable(answers_file: str, settings: dict, has_answers: bool) -> None:
    """Refuse to add answers made with `settings` to a file that holds answers made with others."""
    if not has_answers:
        return
    recorded = read_settings(answers_file)
    if recorded is None:
        raise EvalInputError(
            f"{answers_file}: holds answers but no {os.path.basename(settings_path(answers_file))} saying what made "
            "them; --overwrite starts afresh"
        )
    changed = differences(recorded, settings)
    if changed:
        raise EvalInputError(
            f"{answers_file}: holds answers made with other settings ({'; '.join(changed)}); "
            "--overwrite starts afresh, or write to another --answers-file"
        )


@contextmanager
def answers_lock(answers_file: str) -> Iterator[None]:
    """Hold `<answers>.lock` for the run; a second run into the same file stops at once with a clear message."""
    path = os.path.splitext(answers_file)[0] + ".lock"
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EvalInputError(f"{answers_file}: another run is writing it (it holds {path}); wait for it to end") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> None:
    """Print `<model folder>_<exit label>`: the eval scripts' default answers folder for these settings."""
    # Imported here: the merge and the summary read settings files and need neither torch nor a model.
    from llava.model.builder import read_family_decoder_config, read_llava_config
    from llava.model.exit_args import add_exit_arguments, exit_config_from_args

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model-path", required=True)
    add_exit_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = read_family_decoder_config(args.model_path) or read_llava_config(args.model_path)[0]
        label = run_label(args, exit_config_from_args(args, config))
    except ValueError as error:
        raise SystemExit(f"run_settings: error: {error}") from None
    print(f"{os.path.basename(os.path.normpath(args.model_path))}_{label}")


if __name__ == "__main__":
    main()
