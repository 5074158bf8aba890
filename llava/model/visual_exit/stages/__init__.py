"""Exit stages, registered by name, and the spec that composes them: `prune:fastv:2:0.5,gates:0.9` runs the
stages in that order after every layer. A new stage is a file here and a line below."""

from __future__ import annotations

from functools import partial

from llava.model.visual_exit.budget import REFERENCE_TOKENS, Budget, OutOfReach
from llava.model.visual_exit.stages.base import ExitState, LayerStep, Stage
from llava.model.visual_exit.stages.cdpruner import CDPruner
from llava.model.visual_exit.stages.dart import Dart
from llava.model.visual_exit.stages.divprune import DivPrune
from llava.model.visual_exit.stages.downsample import Downsample
from llava.model.visual_exit.stages.fixed import FixedExit
from llava.model.visual_exit.stages.gates import GateExit
from llava.model.visual_exit.stages.prune import Prune
from llava.model.visual_exit.stages.pyramid import PyramidDrop
from llava.model.visual_exit.stages.resize import Resize
from llava.model.visual_exit.stages.shortv import ShortV
from llava.model.visual_exit.stages.sparsevlm import SparseVLM, SparseVLMWithoutRecycling
from llava.model.visual_exit.stages.visionzip import VisionZip

STAGES: dict[str, type[Stage]] = {
    "fixed": FixedExit,
    "gates": GateExit,
    "prune": Prune,
    "pdrop": PyramidDrop,
    "dart": Dart,
    "visionzip": VisionZip,
    "divprune": DivPrune,
    "cdpruner": CDPruner,
    "downsample": Downsample,
    "sparsevlm": SparseVLM,
    "sparsevlm-drop": SparseVLMWithoutRecycling,
    "shortv": ShortV,
    "resize": Resize,
}


# The methods a visual budget runs (`--exit-method M --visual-budget T`): each stage file answers its own settings.
BUDGETED = {
    "fastv": partial(Prune.at_budget, scorer="fastv"),
    "random": partial(Prune.at_budget, scorer="random"),
    "pdrop": PyramidDrop.at_budget,
    "dart": Dart.at_budget,
    "visionzip": VisionZip.at_budget,
    "divprune": DivPrune.at_budget,
    "cdpruner": CDPruner.at_budget,
    "downsample": Downsample.at_budget,
    "sparsevlm": SparseVLM.at_budget,
    "fixed": FixedExit.at_budget,
}
METHODS = tuple(BUDGETED)
# The methods that reduce the image's tokens before the LLM sees them, after which the gates may still decide.
BEFORE_LLM = tuple(name for name in METHODS if name in STAGES and STAGES[name].reduces_input)


def method_stages(
    method: str, budget: float, num_layers: int, visual_tokens: int, rule: str = "paper", keep_positions: bool = False,
    native_resolution: bool = False,
) -> str:
    """The stage spec of `method` at `budget` retained visual tokens by `rule` (llava.model.visual_exit.budget), for
    a model of `num_layers` layers and `visual_tokens` per image; `keep_positions` adds `:keep` to the methods that
    renumber (a model whose multi-row positions have none); `native_resolution`: the model's token count follows the
    image's size, so the downsampling control gives it a smaller image (`resize:r`) instead of pooling a fixed grid.
    OutOfReach names the method, the budget and its reach."""
    if method not in BUDGETED:
        raise ValueError(f"unknown method {method!r} for a visual budget; known: {', '.join(METHODS)}")
    try:
        amount = Budget(budget, rule, num_layers, visual_tokens)
        spec = Resize.at_budget(amount) if method == "downsample" and native_resolution else BUDGETED[method](amount)
    except OutOfReach as error:
        here = f", {budget * visual_tokens / REFERENCE_TOKENS:.3g} of this model's {visual_tokens}" if rule == "paper" else ""
        raise OutOfReach(f"{method} at {budget:g} tokens ({rule} rule{here}): {error}") from None
    renumbering = STAGES[spec.split(":")[0]].optional_fields > 0
    return spec + ":keep" if keep_positions and renumbering else spec


def parse_stages(spec: str) -> tuple[Stage, ...]:
    """The stages of a spec such as `prune:fastv:2:0.5,gates:0.9`; ValueError naming the part that is wrong."""
    stages = []
    for part in spec.split(","):
        name, *args = part.strip().split(":")
        if name not in STAGES:
            known = ", ".join(stage.usage for stage in STAGES.values())
            raise ValueError(f"unknown exit stage {name!r} in {spec!r}; known: {known}")
        stage = STAGES[name]
        fields = stage.usage.count(":")
        if not fields - stage.optional_fields <= len(args) <= fields:
            raise ValueError(f"exit stage {part!r}: expected {stage.usage}")
        try:
            stages.append(stage.parse(args))
        except ValueError as error:
            raise ValueError(f"exit stage {part!r} ({stage.usage}): {error}") from None
    return tuple(stages)


__all__ = ["BEFORE_LLM", "METHODS", "STAGES", "ExitState", "LayerStep", "OutOfReach", "Stage", "method_stages", "parse_stages"]
