"""VTW's choice of its withdrawal layer ("findk", Lin et al., AAAI 2025), for any checkpoint the loader reads.

    python -m llava.analysis.vtw --model-path M --question-file Q.jsonl --image-folder DIR [--limit 20]
        [--eta 0.003] [--first 5] [--save]

Per question, the first generated token's distribution with every visual token withdrawn at the input of layer d
(our `fixed:d`: layers 0 … d−1 see the image), P_d, against the whole model's, P: KL(P_d ‖ P), as its code computes
it (`KLDivLoss(batchmean)(log_softmax(P), softmax(P_d))`, one sample at a time), for d = --first … L − 1 (its code:
5 … 31), averaged over the questions. K is the first d whose mean is at most η (its code: 0.003 for LLaVA-1.5-7B,
0.0005 for 13B, 0.0001 for LLaVA-1.6-vicuna-7B; its README calibrates on 20 ScienceQA questions). Prints the curve,
writes `vtw.json` to --output-dir; `--save` makes `fixed:K` the checkpoint's default exit (config.json), which the
loader, the eval scripts and lmms-eval then run.
"""

from __future__ import annotations

import argparse
import sys

from llava.analysis.calibration import calibration_cli, mean_divergences, save_default_exit, write_report
from llava.model.checkpoint import Checkpoint
from llava.model.visual_exit import ExitRequest

FIRST_LAYER = 5  # its code starts the search at layer 5
DEFAULT_ETA = 0.003  # its threshold for LLaVA-1.5-7B (and any model it has no own value for)


def first_layer_within(mean_divergence: dict[int, float], eta: float) -> int | None:
    """The first withdrawal layer (in increasing order) whose mean divergence is at most `eta`, None if none is."""
    return next((layer for layer in sorted(mean_divergence) if mean_divergence[layer] <= eta), None)


def withdrawal_exits(layers: int, first: int) -> dict:
    """{d: fixed:d} for the layers VTW tries, from `first` to the last."""
    if not 0 < first < layers:
        raise ValueError(f"--first {first}: the search runs from it to layer {layers - 1} of this {layers}-layer model")
    return {layer: ExitRequest("fixed", layer).expand() for layer in range(first, layers)}


def choice(measured: dict, eta: float) -> dict:
    """VTW's report of `divergences` over its exits: the curve and K (None when no layer is within η)."""
    mean = measured["mean"]
    return {"questions": measured["questions"], "skipped": measured["skipped"], "eta": eta,
            "mean_kl": {str(layer): value for layer, value in mean.items()}, "layer": first_layer_within(mean, eta)}


def calibrate(args: argparse.Namespace) -> dict:
    checkpoint = Checkpoint.resolve(args.model_path)
    exits = withdrawal_exits(checkpoint.config.num_hidden_layers, args.first)
    result = {"model": checkpoint.path, **choice(mean_divergences(args, checkpoint, exits, "VTW calibration"), args.eta)}
    write_report(args.output_dir, "vtw.json", result)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eta", type=float, default=DEFAULT_ETA, help="KL threshold η")
    parser.add_argument("--first", type=int, default=FIRST_LAYER, help="the first withdrawal layer tried")


def main(argv: list[str] | None = None) -> None:
    args, result = calibration_cli(
        "llava.analysis.vtw", __doc__, "make fixed:K the checkpoint's default exit (config.json)", add_arguments, calibrate, argv
    )
    print("| withdrawn at layer d | mean KL(P_d ‖ P) |\n|---|---|")
    for layer, value in result["mean_kl"].items():
        print(f"| {layer} | {value:.6g} |")
    if result["layer"] is None:
        sys.exit(f"llava.analysis.vtw: no layer from {args.first} keeps the mean KL within η = {args.eta} "
                 f"({result['questions']} questions); raise --eta or lower --first")
    print(f"K = {result['layer']}: the first layer within η = {args.eta} ({result['questions']} questions)")
    if args.save:
        save_default_exit(args.model_path, mode="fixed", layer=result["layer"])
        print(f"saved: {args.model_path}/config.json now runs fixed:{result['layer']} by default")


if __name__ == "__main__":
    main()
