"""ShortV's choice of its replaced layers (Layer Contribution, Yuan et al., ICCV 2025), for any checkpoint the loader
reads.

    python -m llava.analysis.shortv --model-path M --question-file Q.jsonl --image-folder DIR [--limit 20]
        [--layers N] [--save]

Per question and layer ℓ, the first generated token's distribution with only layer ℓ replaced — its attention and
MLP outputs zeroed at the visual positions, our `shortv:ℓ` — P_ℓ, against the whole model's, P: the Layer
Contribution LC_ℓ = KL(P_ℓ ‖ P), as its code computes it (`KLDivLoss(batchmean)(log_softmax(P), softmax(P_ℓ))`,
the last prompt token, one sample at a time), averaged over the questions. The layers sorted by LC, lowest first
(ties: the lower layer), are its replacement order; the first N are replaced (its README lists round(0.6·L) for
every model: 19 of LLaVA-1.5-7B's 32, calibrated on 20 GQA and 20 Flickr30k questions). Prints the table, writes
`shortv.json` to --output-dir; `--save` makes `shortv:...` the checkpoint's default exit (config.json).
"""

from __future__ import annotations

import argparse

from llava.analysis.calibration import calibration_cli, mean_divergences, save_default_exit, write_report
from llava.model.checkpoint import Checkpoint
from llava.model.visual_exit import ExitRequest

SHARE_REPLACED = 0.6  # the share of layers its README replaces on every model it lists


def replacement_order(contribution: dict[int, float]) -> list[int]:
    """The layers by Layer Contribution, lowest first; equal contributions keep the lower layer first."""
    return sorted(contribution, key=lambda layer: (contribution[layer], layer))


def replaced_count(layers: int, given: int | None) -> int:
    if given is None:
        return round(SHARE_REPLACED * layers)
    if not 1 <= given <= layers:
        raise ValueError(f"--layers {given}: replace between 1 and the model's {layers} layers")
    return given


def replacement_exits(layers: int) -> dict:
    """{ℓ: shortv:ℓ} for every layer."""
    return {layer: ExitRequest("stages", stages=f"shortv:{layer}").expand() for layer in range(layers)}


def choice(measured: dict, count: int) -> dict:
    """ShortV's report of `divergences` over its exits: the contributions, the order, the `count` replaced."""
    order = replacement_order(measured["mean"])
    return {"questions": measured["questions"], "skipped": measured["skipped"],
            "layer_contribution": {str(layer): value for layer, value in measured["mean"].items()},
            "order": order, "replaced": order[:count], "stages": "shortv:" + "-".join(map(str, order[:count]))}


def calibrate(args: argparse.Namespace) -> dict:
    checkpoint = Checkpoint.resolve(args.model_path)
    layers = checkpoint.config.num_hidden_layers
    count = replaced_count(layers, args.layers)
    measured = mean_divergences(args, checkpoint, replacement_exits(layers), "ShortV calibration")
    result = {"model": checkpoint.path, **choice(measured, count)}
    write_report(args.output_dir, "shortv.json", result)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=None, help="layers to replace (default: round(0.6 L))")


def main(argv: list[str] | None = None) -> None:
    args, result = calibration_cli(
        "llava.analysis.shortv", __doc__, "make the replaced layers the checkpoint's default exit (config.json)", add_arguments, calibrate, argv
    )
    print("| layer | Layer Contribution KL(P_ℓ ‖ P) | replaced |\n|---|---|---|")
    for layer, value in result["layer_contribution"].items():
        print(f"| {layer} | {value:.6g} | {'yes' if int(layer) in result['replaced'] else ''} |")
    print(f"{result['stages']}: the {len(result['replaced'])} lowest of {len(result['order'])} layers "
          f"({result['questions']} questions)")
    if args.save:
        save_default_exit(args.model_path, mode="stages", stages=result["stages"])
        print(f"saved: {args.model_path}/config.json now runs {result['stages']} by default")


if __name__ == "__main__":
    main()
