"""The exit flags every CLI shares: --exit-mode, --exit-layer, --exit-threshold, --fastv-k, --fastv-r."""

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


def exit_config_from_args(args: argparse.Namespace, model_config) -> ExitConfig:
    """The checkpoint's exit settings with the flags given on top; a flag the resulting mode ignores is an error
    (`--exit-mode none --exit-layer 4` would otherwise run mode none under a name that says layer 4)."""
    given = {"layer": args.exit_layer, "threshold": args.exit_threshold, "fastv_k": args.fastv_k, "fastv_r": args.fastv_r}
    config = ExitConfig.from_model_config(model_config).with_overrides(args.exit_mode, **given)
    config.check_overrides_used(**given)
    return config
