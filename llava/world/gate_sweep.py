"""How small can a gate be? Runs of dynamic exit that differ only in gate width, against the widest one.

    python -m llava.world.gate_sweep --answers-root ANSWERS [--out RESULTS] [--preset llava-1.5-7b]

ANSWERS holds one folder per width, `width-<G>`, each with the `merge.jsonl` and `merge.summary.json` that
`scripts/v1_5/eval/gqa.sh` writes (`scripts/gate_width_sweep.sh` makes them). For each width: the gates'
parameters on this model and at the preset's size (with their share of that LM), the share of questions whose exit
layer equals the widest gates' (decision agreement) or lies within one layer of it, accuracy, mean exit layer and FLOPs reduction. Writes
RESULTS/gate_widths.md and RESULTS/gate_widths.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re

from llava.bench.prefill import PRESETS
from llava.eval.io import read_json, read_jsonl

RUN = re.compile(r"width-(\d+)$")
VOCABULARY = 32000  # LLaMA's, for the LM's parameter count at a preset's size


def gate_parameters(hidden: int, width: int, layers: int) -> int:
    """One gate per layer, `w2(GELU(w1(x)))` with w1: 2H -> G and w2: G -> 2, no bias."""
    return layers * width * (2 * hidden + 2)


def llama_parameters(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> int:
    """A LLaMA decoder with untied embeddings: attention, MLP and two norms per layer, embeddings, head, norm."""
    kv = hidden // heads * kv_heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate + 2 * hidden
    return layers * per_layer + 2 * VOCABULARY * hidden + hidden


def read_runs(answers_root: str) -> dict[int, tuple[list[dict], dict]]:
    runs = {}
    for name in sorted(os.listdir(answers_root)):
        match = RUN.match(name)
        if match:
            folder = os.path.join(answers_root, name)
            runs[int(match.group(1))] = (read_jsonl(os.path.join(folder, "merge.jsonl")),
                                         read_json(os.path.join(folder, "merge.summary.json")))
    if len(runs) < 2:
        raise ValueError(f"{answers_root}: needs at least two width-<G> runs, found {sorted(runs)}")
    return runs


def sweep_rows(runs: dict[int, tuple[list[dict], dict]], model_config: dict, preset: str) -> list[dict]:
    widest = max(runs)
    reference = {r["question_id"]: r["exit_layer"] for r in runs[widest][0]}
    geometry = PRESETS[preset]
    lm = llama_parameters(geometry["hidden_size"], geometry["intermediate_size"], geometry["num_hidden_layers"],
                          geometry["num_attention_heads"], geometry["num_key_value_heads"])
    rows = []
    for width, (records, summary) in sorted(runs.items()):
        gaps = [abs(reference[r["question_id"]] - r["exit_layer"]) for r in records if r["question_id"] in reference]
        if len(gaps) != len(reference):
            raise ValueError(f"width {width} answered {len(gaps)} of the widest run's {len(reference)} questions")
        at_preset = gate_parameters(geometry["hidden_size"], width, geometry["num_hidden_layers"])
        rows.append({
            "width": width,
            "gate_parameters": gate_parameters(model_config["hidden_size"], width, model_config["num_hidden_layers"]),
            f"gate_parameters_{preset}": at_preset,
            f"share_of_{preset}_lm": at_preset / lm,
            "decision_agreement": sum(gap == 0 for gap in gaps) / len(gaps),
            "within_one_layer": sum(gap <= 1 for gap in gaps) / len(gaps),
            "accuracy": summary["accuracy"],
            "mean_exit_layer": summary["exit_layer"],
            "flops_reduction": summary["flops_reduction"],
            "questions": len(gaps),
        })
    return rows


def table(rows: list[dict], preset: str, widest: int) -> str:
    lines = [
        f"| gate width | gate params | at {preset} (share of LM) | same exit as width {widest} | within one layer "
        "| accuracy (%) | mean exit layer | FLOPs reduction |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['width']} | {row['gate_parameters']:,} | {row[f'gate_parameters_{preset}'] / 1e6:.1f} M "
            f"({100 * row[f'share_of_{preset}_lm']:.2f} %) | {100 * row['decision_agreement']:.1f} % "
            f"| {100 * row['within_one_layer']:.1f} % "
            f"| {row['accuracy']:.1f} | {row['mean_exit_layer']:.2f} | {100 * row['flops_reduction']:.1f} % |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers-root", required=True)
    parser.add_argument("--model-config", required=True, help="config.json of the model the gates sit on")
    parser.add_argument("--out", default=None, help="folder for gate_widths.md / .json (default: print only)")
    parser.add_argument("--preset", default="llava-1.5-7b", choices=[p for p in PRESETS if p != "tiny"])
    args = parser.parse_args(argv)
    runs = read_runs(args.answers_root)
    rows = sweep_rows(runs, read_json(args.model_config), args.preset)
    text = table(rows, args.preset, max(runs))
    print(text, end="")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gate_widths.md"), "w") as handle:
            handle.write(text)
        with open(os.path.join(args.out, "gate_widths.json"), "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
