"""Can the gate features tell a safe exit from an unsafe one at all? A linear probe per layer, apart from any gate.

    python -m llava.analysis.gate_probe --model-path M --data-path train_single_turn.json --image-folder I
                                        --output-dir OUT [--samples 4000] [--layers 0,1,2] [--batch-size 16]

M is a checkpoint with gates (init_weight.py's output will do: the gates' weights are not used). For each sample and
each layer k, gate training's own pass (llava.model.visual_exit.training) gives the features gate k reads and the
sample's label (exit after k is safe, by --agree-threshold / --ratio-threshold, the training defaults). A logistic
regression on standardised features is fitted on the first (1 − held-out) share of the samples and scored on the
rest: held-out accuracy beside the majority label's, and the ROC AUC (0.5: the features say nothing about which
samples may leave; 1: they separate them). When trained gates stay at the majority label's accuracy, this says
whether the features or the training are to blame.

Writes OUT/gate_probe.csv and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from llava.model.builder import load_model
from llava.model.checkpoint import Checkpoint, CheckpointError
from llava.model.visual_exit.training import ExitLabelRule
from llava.train.data import DataError
from llava.train.train import training_data

COLUMNS = ("layer", "samples", "safe_share", "majority_accuracy", "heldout_accuracy", "auc")
FIT_STEPS = 500
WEIGHT_DECAY = 1e-3


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative, ties counting one half (Mann–Whitney U
    from average ranks); NaN when one class is absent."""
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = scores.argsort()
    ranks = torch.empty(len(scores), dtype=torch.float64)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    for value in scores.unique():  # ties share their average rank
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    rank_sum = ranks[labels.bool()].sum().item()
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def fit_probe(features: torch.Tensor, labels: torch.Tensor, train: int, seed: int = 0) -> dict[str, float]:
    """Logistic regression on the first `train` rows (full-batch Adam, standardised by their statistics), scored on
    the rest: held-out accuracy, the majority label's accuracy there and the AUC."""
    torch.manual_seed(seed)
    features, labels = features.double(), labels.double()
    mean, scale = features[:train].mean(0), features[:train].std(0).clamp(min=1e-6)
    standard = (features - mean) / scale
    probe = torch.nn.Linear(features.shape[1], 1).double()
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=WEIGHT_DECAY)
    for _ in range(FIT_STEPS):
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(probe(standard[:train]).squeeze(-1), labels[:train])
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        scores, truth = probe(standard[train:]).squeeze(-1), labels[train:]
    majority = float(labels[:train].mean() >= 0.5)
    return {
        "heldout_accuracy": ((scores > 0).double() == truth).double().mean().item(),
        "majority_accuracy": (truth == majority).double().mean().item(),
        "auc": roc_auc(scores, truth),
    }


def collect(model, loader, layers: list[int], rule: ExitLabelRule) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (features (n, 2H), labels (n,))} over the loader's samples that have an image and an answer."""
    collected = {layer: ([], []) for layer in layers}
    with torch.no_grad():
        for batch in tqdm(loader, desc="gate features", unit="batch"):
            for layer in layers:
                out = model(**batch, gate_training_layer=layer, exit_label_rule=rule)
                usable = out.exit_labels.usable
                collected[layer][0].append(out.gate_features[usable].float())
                collected[layer][1].append(out.exit_labels.label[usable])
    return {layer: (torch.cat(features), torch.cat(labels)) for layer, (features, labels) in collected.items()}


def probe_rows(collected: dict, held_out: float) -> list[dict]:
    rows = []
    for layer, (features, labels) in collected.items():
        train = int(round(len(labels) * (1 - held_out)))
        if not 0 < train < len(labels):
            raise ValueError(f"layer {layer}: {len(labels)} usable samples cannot be split {1 - held_out:g} / {held_out:g}")
        rows.append({"layer": layer, "samples": len(labels), "safe_share": labels.float().mean().item(),
                     **fit_probe(features, labels, train)})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| gate layer | samples | exit safe | majority label, held out | probe, held out | probe AUC |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['samples']} | {100 * r['safe_share']:.1f} % | {100 * r['majority_accuracy']:.1f} % "
              f"| {100 * r['heldout_accuracy']:.1f} % | {r['auc']:.3f} |" for r in rows]
    return "\n".join(lines)


def parse_layers(text: str, num_layers: int) -> list[int]:
    layers = [int(part) for part in text.split(",")] if text else list(range(num_layers - 1))
    wrong = [layer for layer in layers if not 0 <= layer < num_layers - 1]
    if wrong:
        raise ValueError(f"--layers {text}: gates sit after layers 0..{num_layers - 2}, not {wrong}")
    return layers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--data-path", required=True, help="LLaVA conversation JSON (gate training's data)")
    parser.add_argument("--image-folder", default=None)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--version", default="v1", help="conversation template, as train.py's --version")
    parser.add_argument("--samples", type=int, default=4000, help="samples drawn at random (0: all)")
    parser.add_argument("--layers", default="", help="gate layers, comma-separated (default: all)")
    parser.add_argument("--held-out", type=float, default=0.3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--agree-threshold", type=float, default=ExitLabelRule.agree_threshold)
    parser.add_argument("--ratio-threshold", type=float, default=ExitLabelRule.ratio_threshold)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        checkpoint = Checkpoint.resolve(args.model_path)
        if not checkpoint.has_gates:
            raise CheckpointError(f"{args.model_path}: holds no gates; add them with init_weight.py")
        layers = parse_layers(args.layers, checkpoint.config.num_hidden_layers)
        loaded = load_model(checkpoint, device="cpu")
        model = loaded.model
        dataset, collator = training_data(args.data_path, args.image_folder, loaded.tokenizer, loaded.image_processor,
                                          model.config, args.version)
    except (CheckpointError, DataError, ValueError, OSError) as error:
        sys.exit(f"gate_probe: error: {error}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed)).tolist()
    chosen = Subset(dataset, order[: args.samples] if args.samples else order)
    loader = DataLoader(chosen, batch_size=args.batch_size, collate_fn=collator)
    model.eval()
    rows = probe_rows(collect(model, loader, layers, ExitLabelRule(args.agree_threshold, args.ratio_threshold)),
                      args.held_out)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "gate_probe.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(table(rows))


if __name__ == "__main__":
    main()
