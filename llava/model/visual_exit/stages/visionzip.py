"""`visionzip:D:C`: VisionZip (arXiv 2412.04467) keeps, per image, D dominant and C contextual tokens of the vision
tower's feature layer, before the projector and the LLM; the LLM then runs on the shorter image block.

It acts on the vision side, so it takes the exit's vision slot (`ExitConfig.vision_stage`), not a place in the
decoder's loop: a multimodal model that supports it reads it there before encoding images. Our LLaVA class does
(`llava.model.multimodal_encoder.visionzip`); transformers' own VLM classes (`vlm.py`) refuse it. D counts the CLS
token, which VisionZip always keeps; D + C at least the tower's tokens keeps them all.
"""

from __future__ import annotations

from dataclasses import dataclass

from llava.model.visual_exit.budget import Budget
from llava.model.visual_exit.stages.base import Stage, spec_number


PUBLISHED_SPLIT = (54, 10)  # dominant : contextual, its Table 8's settings


@dataclass(frozen=True)
class VisionZip(Stage):
    dominant: int
    contextual: int
    usage = "visionzip:D:C"
    before_llm = True
    reduces_input = True

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

