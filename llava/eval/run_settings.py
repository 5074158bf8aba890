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

# Loader flags that change the prompts (ScienceQA, MMBench), recorded with the run's settings (RunSpec.prompt_flags).
PROMPT_FLAGS = ("single_pred_prompt", "all_rounds", "lang")


def budget_settings(exit_flags: dict) -> dict | None:
    """The method, budget and rule of an `--exit-method` run (its settings' `budget`), None for any other."""
    if exit_flags.get("exit_method") is None:
        return None
    return {"method": exit_flags["exit_method"], "visual_budget": exit_flags["visual_budget"],
            "rule": exit_flags.get("budget_rule") or "paper"}


def run_label(exit_config, budget: dict | None) -> str:
    """A run's name in folders and tables: the exit's label, or `METHOD-RULE+T` for a method at a budget by a rule
    (`pdrop-paper64`, `sparsevlm-equal64`)."""
    if budget is not None:
        return f"{budget['method']}-{budget['rule']}{budget['visual_budget']:g}"
    return exit_config.label


def settings_path(answers_file: str) -> str:
    return os.path.splitext(answers_file)[0] + ".settings.json"


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
    """Print `<model folder>_<run label>`: the eval scripts' default answers folder for these settings."""
    # Imported here: the merge and the summary read settings files and need neither torch nor a model.
    from llava.model.checkpoint import Checkpoint
    from llava.model.exit_args import add_exit_arguments, exit_config_from_flags, exit_flags

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model-path", required=True)
    add_exit_arguments(parser)
    args = parser.parse_args(argv)
    try:
        checkpoint, flags = Checkpoint.resolve(args.model_path), exit_flags(args)
        exit_config = exit_config_from_flags(checkpoint.config, **flags)
        checkpoint.check_exit(exit_config)
        label = run_label(exit_config, budget_settings(flags))
    except ValueError as error:
        raise SystemExit(f"run_settings: error: {error}") from None
    print(f"{os.path.basename(os.path.normpath(args.model_path))}_{label}")


if __name__ == "__main__":
    main()
