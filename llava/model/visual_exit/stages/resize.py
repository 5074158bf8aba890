"""`resize:r`: the downsampling control (BASELINES.md §10.6) for dynamic-resolution models, as VTC-Bench runs it on
Qwen2-VL: every image is shrunk to (⌊w / r⌋, ⌊h / r⌋) with bicubic resampling and re-encoded as JPEG (PIL's default
quality; JPEG at r = 1 as well), then handed to the model's own processor, which gives it ≈ 1/r² of the tokens.

It acts before the processor, so whoever loads the question's images applies it (the loader's `Answerer.prepare`,
and through it lmms-eval and the world evaluation); the models never run it. It takes the exit's vision slot
(`ExitConfig.vision_stage`). A fixed-grid model (LLaVA-1.5) resizes every image to its tower's size and would see
the same token count, so it is refused there (`downsample:S` pools its grid instead).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from PIL import Image

from llava.model.visual_exit.budget import Budget
from llava.model.visual_exit.stages.base import Stage, spec_number


@dataclass(frozen=True)
class Resize(Stage):
    factor: float
    usage = "resize:r"
    before_llm = True
    reduces_input = True
    before_processor = True

    @classmethod
    def parse(cls, args: list[str]) -> Resize:
        return cls(spec_number(args[0], float, 1.0))

    @classmethod
    def at_budget(cls, budget: Budget) -> str:
        """Both rules: r = √(n / T), VTC-Bench's mapping of a factor r to the retained share 1/r² (n: the nominal
        tokens per image a budget is a share of, `--visual-tokens`; the tokens an image really gets follow its size)."""
        return f"resize:{math.sqrt(budget.visual / max(budget.target, 1e-9)):.4f}"

    def apply(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        smaller = image.convert("RGB").resize(
            (max(1, int(width / self.factor)), max(1, int(height / self.factor))), Image.Resampling.BICUBIC
        )
        encoded = io.BytesIO()
        smaller.save(encoded, format="JPEG")
        return Image.open(io.BytesIO(encoded.getvalue())).convert("RGB")
