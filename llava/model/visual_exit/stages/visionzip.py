"""`visionzip:D:C`: VisionZip (arXiv 2412.04467) keeps, per image, D dominant and C contextual tokens of the vision
tower's feature layer, before the projector and the LLM; the LLM then runs on the shorter image block.

It acts on the vision side, so in the decoder it is a marker that drops nothing: a multimodal model that supports
it reads it from the stage list before encoding images (`find_visionzip`). Our LLaVA class does
(`llava.model.multimodal_encoder.visionzip`); a model that does not read it runs as if the stage were absent, so
transformers' own VLM classes (`vlm.py`) must refuse it themselves. D counts the CLS token, which VisionZip always
keeps; D + C at least the tower's tokens keeps them all.
"""

from __future__ import annotations

from dataclasses import dataclass

from llava.model.visual_exit.budget import Budget
from llava.model.visual_exit.stages.base import ExitState, LayerStep, Stage, spec_number
from llava.model.visual_exit.tokens import TokenLayout


PUBLISHED_SPLIT = (54, 10)  # dominant : contextual, its Table 8's settings


@dataclass(frozen=True)
class VisionZip(Stage):
    dominant: int
    contextual: int
    usage = "visionzip:D:C"

    @classmethod
    def parse(cls, args: list[str]) -> VisionZip:
        dominant, contextual = args
        return cls(spec_number(dominant, int, 1), spec_number(contextual, int, 0))

    @classmethod
    def at_budget(cls, budget: Budget) -> str:
        """Both rules: every layer sees D + C = T tokens, split as its published settings (162 + 30, 108 + 20,
        54 + 10: 54 : 10)."""
        kept = round(budget.target)
        dominant = max(1, round(kept * PUBLISHED_SPLIT[0] / sum(PUBLISHED_SPLIT)))
        return f"visionzip:{dominant}:{max(kept - dominant, 0)}"

    def after_layer(self, step: LayerStep, state: ExitState, layout: TokenLayout):
        return None  # the tokens it removes never reached the decoder


def find_visionzip(stages: tuple[Stage, ...]) -> VisionZip | None:
    """The stage list's VisionZip stage, or None; ValueError for more than one."""
    found = [stage for stage in stages if isinstance(stage, VisionZip)]
    if len(found) > 1:
        specs = ", ".join(f"visionzip:{stage.dominant}:{stage.contextual}" for stage in found)
        raise ValueError(f"an exit holds at most one visionzip stage (the tower reduces an image once), got {specs}")
    return found[0] if found else None
