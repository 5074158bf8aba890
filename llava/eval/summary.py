"""One summary per evaluation run: `python -m llava.eval.summary --benchmark gqa --answers-file merge.jsonl
--metrics-json scores.json` prints a table row and writes `<answers>.summary.json` beside the answers.

Fields: benchmark, the model folder and exit settings that made the answers (from `<answers>.settings.json`; the
JSON keeps all the settings), the scorer's metrics, samples, errors (error records of the loader), mean exit
layer, mean LM-prefill TFLOPs, their reduction against mode none on the same inputs, mean latency and prefill time,
and (in the JSON) the mean visual tokens per decoder layer and the vision side's TFLOPs.
"""

from __future__ import annotations

import argparse
import json
import os

from llava.eval.io import read_jsonl
from llava.eval.run_settings import read_settings

COLUMNS = ("benchmark", "samples", "errors", "exit_layer", "tflops", "flops_reduction", "latency_ms")
LEADING = ("model", "exit")  # which run a row is, right after the benchmark
HIDDEN = ("prefill_ms", "visual_tokens_avg", "vision_tflops", "settings")  # in the JSON, not in the row


def summarize(answers: list[dict], benchmark: str, metrics: dict, settings: dict | None = None) -> dict:
    answered = [record for record in answers if "error" not in record]

    def mean(key: str) -> float | None:
        values = [record[key] for record in answered if record.get(key) is not None]
        return sum(values) / len(values) if values else None

    full = sum(record.get("tflops_full") or 0.0 for record in answered)
    used = sum(record.get("tflops") or 0.0 for record in answered)
    settings = settings or {}
    return {
        "benchmark": benchmark,
        "model": settings.get("model_path") and os.path.basename(settings["model_path"]),
        "exit": settings.get("exit_label"),
        **metrics,
        "samples": len(answers),
        "errors": len(answers) - len(answered),
        "exit_layer": mean("exit_layer"),
        "tflops": mean("tflops"),
        "flops_reduction": 1 - used / full if full else None,
        "latency_ms": mean("latency_ms"),
        "prefill_ms": mean("prefill_ms"),
        "visual_tokens_avg": mean("visual_tokens_avg"),  # visual tokens entering a decoder layer, on average
        "vision_tflops": mean("vision_tflops"),  # the vision tower and projector (None: a family model)
        "settings": settings,
    }


def write_summary(answers_file: str, benchmark: str, metrics: dict) -> dict:
    """Summarize an answers file with its scorer's metrics (their scalars) into `<answers>.summary.json`."""
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
    summary = summarize(read_jsonl(answers_file, ("question_id",)), benchmark, scalars, read_settings(answers_file))
    with open(os.path.splitext(answers_file)[0] + ".summary.json", "w") as handle:
        json.dump(summary, handle, indent=2)
    return summary


def format_row(summary: dict, header: bool = True) -> str:
    metrics = [k for k in summary if k not in COLUMNS + LEADING + HIDDEN]
    keys = list(LEADING) + metrics + list(COLUMNS[1:])
    cells = [summary["benchmark"]] + [_cell(summary[key]) for key in keys]
    widths = [max(len(name), len(cell)) for name, cell in zip(["benchmark", *keys], cells)]
    row = " | ".join(cell.rjust(width) for cell, width in zip(cells, widths))
    if not header:
        return row
    names = " | ".join(name.rjust(width) for name, width in zip(["benchmark", *keys], widths))
    return f"{names}\n{row}"


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", required=True)
    parser.add_argument("--answers-file", required=True)
    parser.add_argument("--metrics-json", default=None, help="the scorer's metrics (a JSON object)")
    args = parser.parse_args(argv)
    metrics = {}
    if args.metrics_json:
        with open(args.metrics_json) as handle:
            metrics = json.load(handle)
    print(format_row(write_summary(args.answers_file, args.benchmark, metrics)))


if __name__ == "__main__":
    main()
