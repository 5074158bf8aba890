"""The exit flags every CLI shares: --exit-mode, --exit-layer, --exit-threshold, --fastv-k, --fastv-r, --exit-stages."""

from __future__ import annotations

import argparse
import os
import sys

from transformers import CLIPVisionConfig

from llava.arguments import positive_int
from llava.model.checkpoint import Checkpoint, CheckpointError
from llava.model.visual_exit import EXIT_MODES, ExitConfig, ExitRequest
from llava.model.visual_exit.budget import RULES
from llava.model.visual_exit.stages import METHODS, method_stages


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
        "(fixed:K, gates:τ, prune:SCORER:K:R with scorers fastv, pdrop, random; pdrop:L1-L2-..:λ, ...); "
        "implies --exit-mode stages",
    )
    group.add_argument(
        "--exit-method", choices=METHODS, default=None,
        help="a reduction method run at --visual-budget (llava.model.visual_exit.budget); implies --exit-mode stages",
    )
    group.add_argument("--visual-budget", type=float, default=None, help="retained visual tokens, by --budget-rule")
    group.add_argument(
        "--budget-rule", choices=RULES, default=None,
        help="paper (default): each method's published setting for that budget on LLaVA-1.5-7B, carried to this "
        "model; equal: every method at the same layer average of visual tokens on this model",
    )
    group.add_argument(
        "--visual-tokens", type=positive_int, default=None,
        help="visual tokens per image the budget is a share of (default: the LLaVA tower's patch count)",
    )


EXIT_FLAGS = (
    "exit_mode", "exit_layer", "exit_threshold", "fastv_k", "fastv_r", "exit_stages", "exit_method", "visual_budget",
    "budget_rule", "visual_tokens",
)


def exit_flags(args: argparse.Namespace) -> dict:
    """The exit flags a CLI parsed, as keywords of `exit_config_from_flags` (absent ones None)."""
    return {name: getattr(args, name, None) for name in EXIT_FLAGS}


def exit_config_from_args(args: argparse.Namespace, model_config) -> ExitConfig:
    return exit_config_from_flags(model_config, **exit_flags(args))


def exit_config_from_flags(
    model_config, exit_mode=None, exit_layer=None, exit_threshold=None, fastv_k=None, fastv_r=None, exit_stages=None,
    exit_method=None, visual_budget=None, budget_rule=None, visual_tokens=None,
) -> ExitConfig:
    """The checkpoint's exit settings with the flags given on top; a flag the resulting mode ignores is an error
    (`--exit-mode none --exit-layer 4` would otherwise run mode none under a name that says layer 4). A method at a
    visual budget becomes its stage list."""
    stages, mode = exit_stages, exit_mode
    if exit_method is not None or visual_budget is not None or budget_rule is not None:
        if exit_method is None or visual_budget is None or mode is not None or stages is not None:
            raise ValueError("--exit-method and --visual-budget go together (with --budget-rule, if any), without "
                             "--exit-mode or --exit-stages")
        stages = method_stages(exit_method, visual_budget, model_config.num_hidden_layers,
                               budget_tokens(visual_tokens, model_config), budget_rule or "paper",
                               keep_positions=has_multirow_positions(model_config),
                               native_resolution=has_multirow_positions(model_config))
    given = {"layer": exit_layer, "threshold": exit_threshold, "fastv_k": fastv_k, "fastv_r": fastv_r, "stages": stages}
    if stages is not None:
        if mode not in (None, "stages"):
            raise ValueError(f"--exit-stages composes its own exit: leave out --exit-mode {mode}")
        mode = "stages"
    request = ExitRequest.from_model_config(model_config).with_overrides(mode, **given)
    request.check_overrides_used(**given)
    return request.expand()


def has_multirow_positions(model_config) -> bool:
    """M-RoPE (Qwen2-VL and the families on it): positions with three rows, which no method renumbers; their
    images take as many tokens as their size gives (native resolution)."""
    rope = getattr(model_config, "rope_parameters", None) or getattr(model_config, "rope_scaling", None) or {}
    return isinstance(rope, dict) and "mrope_section" in rope


def budget_tokens(given: int | None, model_config) -> int:
    """The visual tokens per image a budget is a share of: `given` (--visual-tokens), which must match a
    checkpoint whose count is fixed, or that count."""
    if given is not None and given < 1:
        raise ValueError(f"--visual-tokens {given}: an image takes at least one visual token")
    try:
        known = visual_tokens_per_image(model_config)
    except ValueError:
        if given is None:
            raise
        return given
    if given is not None and given != known:
        raise ValueError(f"--visual-tokens {given}: this checkpoint's images take {known} visual tokens each; leave it out")
    return known


def visual_tokens_per_image(model_config) -> int:
    """A LLaVA checkpoint's visual tokens per image (its tower's patch grid, plus CLS under `cls_patch`)."""
    vision = getattr(model_config, "mm_vision_config", None)
    tower = getattr(model_config, "mm_vision_tower", None)
    if vision is None and tower is not None and os.path.isdir(tower):
        vision = CLIPVisionConfig.from_pretrained(tower).to_dict()
    if vision is None:
        raise ValueError("pass --visual-tokens: this checkpoint's visual tokens per image depend on the image")
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    return patches + (getattr(model_config, "mm_vision_select_feature", "patch") == "cls_patch")


def main(argv: list[str] | None = None) -> None:
    """`python -m llava.model.exit_args --model-path M EXIT FLAGS`: the stage list those flags run on that
    checkpoint (e.g. a method at a budget), to compose further with --exit-stages."""
    parser = argparse.ArgumentParser(description=main.__doc__.split(":")[0])
    parser.add_argument("--model-path", required=True)
    add_exit_arguments(parser)
    args = parser.parse_args(argv)
    try:
        checkpoint = Checkpoint.resolve(args.model_path)
        config = exit_config_from_args(args, checkpoint.config)
        checkpoint.check_exit(config)
    except (CheckpointError, ValueError) as error:
        sys.exit(f"llava.model.exit_args: error: {error}")
    print(config.request.stages or config.label)


if __name__ == "__main__":
    main()
