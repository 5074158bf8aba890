"""Accuracy against cost for a set of evaluation runs: one table, and PNGs of accuracy vs TFLOPs and exit layers.

    python -m llava.world.report --answers-root ANSWERS --out RESULTS

ANSWERS holds one folder per run, each with the `merge.jsonl` and `merge.summary.json` that
`scripts/v1_5/eval/gqa.sh` writes. Which exit a run used (none, dynamic τ, fixed K, FastV K R, dynamic+FastV) is
read from the settings its answers were made with, not from the folder's name; rows are named by those settings
(`dynamic-0.9`, `fastv-2-0.5`, ...).
Writes RESULTS/table.md, RESULTS/accuracy_vs_tflops.png and RESULTS/exit_layer_histogram.png.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from llava.eval.io import read_jsonl  # noqa: E402
from llava.model.visual_exit.budget import METHODS  # noqa: E402

# Each mode's settings (symbol: the field of the run's recorded exit settings), in the order its label gives them.
SETTINGS = {
    "none": {},
    "dynamic": {"τ": "threshold"},
    "fixed": {"K": "layer"},
    "fastv": {"K": "fastv_k", "R": "fastv_r"},
    "dynamic+fastv": {"τ": "threshold", "K": "fastv_k", "R": "fastv_r"},
}
# Reduction methods run at a visual budget (llava.model.visual_exit.budget): one setting, the budget T.
BUDGETED = {method: f"{method}-budget" for method in METHODS}  # their modes here, apart from modes fastv / fixed
SETTINGS.update({mode: {"T": "visual_budget"} for mode in BUDGETED.values()})
MODES = tuple(SETTINGS)
STYLES = {  # mode: (line style, legend)
    "fixed": ("s--", "fixed exit after K"),
    "dynamic": ("o-", "dynamic exit (τ)"),
    "fastv": ("^:", "FastV, K={K:g} (R)"),
    "dynamic+fastv": ("D", "dynamic + FastV"),
    **{mode: (marker + "-.", f"{method} at budget T") for (method, mode), marker in zip(BUDGETED.items(), "v<>phx+")},
}


@dataclass
class Run:
    name: str
    mode: str
    settings: tuple[float, ...]
    accuracy: float
    exit_layer: float
    tflops: float
    flops_reduction: float
    exit_layers: list[int]

    @property
    def setting(self) -> dict[str, float]:
        return dict(zip(SETTINGS[self.mode], self.settings))


def recorded_run(summary_path: str, summary: dict) -> tuple[str, str, tuple[float, ...]]:
    """(name, mode, settings) of a run, from the settings its answers were made with (never from its folder)."""
    settings = summary.get("settings") or {}
    exit_settings = settings.get("exit")
    if exit_settings is None:
        raise ValueError(f"{summary_path}: records no exit settings; rerun its evaluation")
    budget = settings.get("budget")
    if budget is not None:  # a method at a budget: named and plotted by the method, not by its stage list
        return settings["exit_label"], BUDGETED[budget["method"]], (float(budget["visual_budget"]),)
    mode = exit_settings["mode"]
    if mode not in SETTINGS:
        raise ValueError(f"{summary_path}: exit mode {mode!r} is not one this report plots ({', '.join(MODES)})")
    return settings["exit_label"], mode, tuple(float(exit_settings[field]) for field in SETTINGS[mode].values())


def load_runs(answers_root: str) -> list[Run]:
    runs = []
    for name in sorted(os.listdir(answers_root)):
        folder = os.path.join(answers_root, name)
        summary_path = os.path.join(folder, "merge.summary.json")
        if not os.path.isfile(summary_path):
            continue
        with open(summary_path) as handle:
            summary = json.load(handle)
        run_name, mode, settings = recorded_run(summary_path, summary)
        answers = read_jsonl(os.path.join(folder, "merge.jsonl"), ("question_id",))
        runs.append(Run(
            run_name, mode, settings, summary["accuracy"], summary["exit_layer"], summary["tflops"],
            summary["flops_reduction"], [a["exit_layer"] for a in answers if "error" not in a],
        ))
    if not any(run.mode == "none" for run in runs):
        raise ValueError(f"{answers_root}: no 'none' run to compare against")
    return sorted(runs, key=lambda run: (MODES.index(run.mode), run.settings))


def flops_unit(runs: list[Run]) -> tuple[str, float]:
    """GFLOPs for models too small to read in TFLOPs (the tiny world), else TFLOPs."""
    return ("GFLOPs", 1e3) if max(run.tflops for run in runs) < 0.1 else ("TFLOPs", 1.0)


def table(runs: list[Run]) -> str:
    reference = next(run for run in runs if run.mode == "none")
    unit, scale = flops_unit(runs)
    lines = [
        f"| run | accuracy (%) | Δ vs none (pt) | mean exit layer | prefill {unit} / sample | FLOPs reduction |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run.name} | {run.accuracy:.1f} | {run.accuracy - reference.accuracy:+.1f} | {run.exit_layer:.2f} "
            f"| {run.tflops * scale:.4g} | {100 * run.flops_reduction:.1f} % |"
        )
    return "\n".join(lines)


def plot_accuracy_vs_tflops(runs: list[Run], path: str) -> None:
    unit, scale = flops_unit(runs)
    figure, axes = plt.subplots(figsize=(7.2, 4.8))
    curves: dict[tuple[str, float | None], list[Run]] = {}
    for run in runs:
        if run.mode != "none":  # FastV: one curve over R per K; a budgeted method: one over T
            key = (run.mode, run.setting.get("K") if run.mode == "fastv" else None)
            curves.setdefault(key, []).append(run)
    for (mode, k), members in curves.items():
        style, legend = STYLES[mode]
        points = sorted((run.tflops * scale, run.accuracy, run) for run in members)
        axes.plot([p[0] for p in points], [p[1] for p in points], style, label=legend.format(K=k or 0))
        for x, y, run in points:
            shown = {key: value for key, value in run.setting.items() if not (mode == "fastv" and key == "K")}
            text = ", ".join(f"{key}={value:g}" for key, value in shown.items())
            axes.annotate(text, (x, y), textcoords="offset points", xytext=(4, -10 if mode == "fixed" else 5), fontsize=7)
    reference = next(run for run in runs if run.mode == "none")
    axes.plot([reference.tflops * scale], [reference.accuracy], "k*", markersize=12, label="no exit")
    axes.set_xlabel(f"LM prefill {unit} per sample")
    axes.set_ylabel("accuracy (%)")
    axes.set_title("Accuracy vs prefill cost: dynamic exit against fixed K, FastV and the reduction methods")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_exit_histogram(runs: list[Run], layers: int, path: str) -> None:
    dynamic = [run for run in runs if run.mode == "dynamic"]
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    width = 0.8 / max(1, len(dynamic))
    for index, run in enumerate(dynamic):
        counts = Counter(run.exit_layers)
        total = max(1, len(run.exit_layers))
        xs = [layer + (index - (len(dynamic) - 1) / 2) * width for layer in range(layers + 1)]
        axes.bar(xs, [100 * counts[layer] / total for layer in range(layers + 1)], width, label=f"τ={run.settings[0]:g}")
    axes.set_xticks(range(layers + 1), [str(k) for k in range(layers)] + [f"{layers}\n(no exit)"])
    axes.set_xlabel("exit layer K (visual tokens leave after layer K)")
    axes.set_ylabel("samples (%)")
    axes.set_title("Where the gates send visual tokens out, per threshold")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers-root", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    runs = load_runs(args.answers_root)
    layers = next(run for run in runs if run.mode == "none").exit_layers[0]
    os.makedirs(args.out, exist_ok=True)
    text = table(runs)
    with open(os.path.join(args.out, "table.md"), "w") as handle:
        handle.write(text + "\n")
    plot_accuracy_vs_tflops(runs, os.path.join(args.out, "accuracy_vs_tflops.png"))
    plot_exit_histogram(runs, layers, os.path.join(args.out, "exit_layer_histogram.png"))
    print(text)
    print(f"plots: {os.path.abspath(args.out)}/accuracy_vs_tflops.png, exit_layer_histogram.png")


if __name__ == "__main__":
    main()
