"""The exit flags every CLI shares: --exit-mode, --exit-layer, --exit-threshold, --fastv-k, --fastv-r, --exit-stages."""

from __future__ import annotations

import argparse

from llava.model.visual_exit import EXIT_MODES, ExitConfig


def add_exit_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("visual-token exit (defaults: the checkpoint's config)")
    group.add_argument("--exit-mode", choices=EXIT_MODES, default=None)
    group.add_argument("--exit-layer", type=int, default=None, help="fixed mode: layers that see the visual tokens")
    group.add_argument("--exit-threshold", type=float, default=None, help="dynamic mode: exit when P(exit) > T")
    group.add_argument("--fastv-k", type=int, default=None, help="fastv modes: layers that see every visual token")
    group.add_argument("--fastv-r", type=float, default=None, help="fastv modes: share of visual tokens pruned after K")
    group.add_argument(
        "--exit-stages", default=None, metavar="SPEC",
        help="any list of stages, run in order after every layer, e.g. prune:fastv:2:0.5,gates:0.9 "
        "(fixed:K, gates:τ, prune:SCORER:K:R with scorers fastv, random); implies --exit-mode stages",
    )


def exit_config_from_args(args: argparse.Namespace, model_config) -> ExitConfig:
    """The checkpoint's exit settings with the flags given on top; a flag the resulting mode ignores is an error
    (`--exit-mode none --exit-layer 4` would otherwise run mode none under a name that says layer 4)."""
    given = {
        "layer": args.exit_layer, "threshold": args.exit_threshold, "fastv_k": args.fastv_k, "fastv_r": args.fastv_r,
        "stages": args.exit_stages,
    }
    mode = args.exit_mode
    if args.exit_stages is not None:
        if mode not in (None, "stages"):
            raise ValueError(f"--exit-stages composes its own exit: leave out --exit-mode {mode}")
        mode = "stages"
    config = ExitConfig.from_model_config(model_config).with_overrides(mode, **given)
    config.check_overrides_used(**given)
    return config
