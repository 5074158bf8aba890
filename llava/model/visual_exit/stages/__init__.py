"""Exit stages, registered by name, and the spec that composes them: `prune:fastv:2:0.5,gates:0.9` runs the
stages in that order after every layer. A new stage is a file here and a line below."""

from __future__ import annotations

from llava.model.visual_exit.stages.base import ExitState, LayerStep, Stage
from llava.model.visual_exit.stages.dart import Dart
from llava.model.visual_exit.stages.fixed import FixedExit
from llava.model.visual_exit.stages.gates import GateExit
from llava.model.visual_exit.stages.prune import Prune
from llava.model.visual_exit.stages.pyramid import PyramidDrop
from llava.model.visual_exit.stages.sparsevlm import SparseVLM, SparseVLMWithoutRecycling
from llava.model.visual_exit.stages.visionzip import VisionZip

STAGES: dict[str, type[Stage]] = {
    "fixed": FixedExit,
    "gates": GateExit,
    "prune": Prune,
    "pdrop": PyramidDrop,
    "dart": Dart,
    "visionzip": VisionZip,
    "sparsevlm": SparseVLM,
    "sparsevlm-drop": SparseVLMWithoutRecycling,
}


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


__all__ = ["STAGES", "ExitState", "LayerStep", "Stage", "parse_stages"]
