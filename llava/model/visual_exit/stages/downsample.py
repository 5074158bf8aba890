"""`downsample:S`: the downsampling control (BASELINES.md §10.6) for models with a fixed square grid of visual tokens
per image (LLaVA-1.5: 24 × 24): each image's grid, as the LLM receives it (after the projector), average-pooled to
S × S before layer 0 — torch's adaptive average pooling, the choice (a) of §10.6 and VLMUniPruneBench's
`Pool_PreLLM` — so the model sees a smaller image of S² tokens, numbered 0, 1, … like any shorter prompt. A picture
with fewer tokens, not a selection: what a method must beat to be worth its selection. Each image's tokens must be
one square run (`g × g`, row-major); dynamic-resolution families get fewer tokens from a smaller image instead (their
processor's pixel bounds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llava.model.visual_exit.budget import Budget
from llava.model.visual_exit.stages.base import ExitState, InputReduction, Rewrite, spec_number
from llava.model.visual_exit.stages.prune import record_pruning
from llava.model.visual_exit.tokens import TokenLayout


def image_runs(visual: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per sample, its runs of consecutive visual slots as (start, length)."""
    runs = []
    for row in visual.tolist():
        found, start = [], None
        for slot, is_visual in enumerate(row + [False]):
            if is_visual and start is None:
                start = slot
            elif not is_visual and start is not None:
                found.append((start, slot - start))
                start = None
        runs.append(found)
    return runs


@dataclass(frozen=True)
class Downsample(InputReduction):
    side: int
    renumbers = True
    usage = "downsample:S"

    @classmethod
    def parse(cls, args: list[str]) -> Downsample:
        return cls(spec_number(args[0], int, 1))

    @classmethod
    def at_budget(cls, budget: Budget) -> str:
        """Both rules: the square grid nearest the budget (LLaVA-1.5's 576: 14 × 14 = 196, 11 × 11 = 121, 8 × 8 = 64
        for 192 / 128 / 64): every layer sees S² tokens."""
        return f"downsample:{max(1, round(math.sqrt(budget.target)))}"

    def reduce(self, state: ExitState, layout: TokenLayout, hidden: torch.Tensor, visual: torch.Tensor):
        rewritten = torch.zeros_like(visual)
        states = hidden.clone()
        for b, runs in enumerate(image_runs(visual)):
            for start, length in runs:
                grid = math.isqrt(length)
                if grid * grid != length:
                    raise ValueError(f"downsample: an image of {length} visual tokens is no square grid; it pools "
                                     "fixed square grids (LLaVA-1.5's), one image per run of visual tokens (text "
                                     "between images); give a dynamic-resolution model a smaller image")
                if self.side >= grid:
                    continue
                pooled = torch.nn.functional.adaptive_avg_pool2d(
                    hidden[b, start : start + length].T.reshape(1, -1, grid, grid), self.side
                )  # (1, H, S, S)
                kept = self.side * self.side
                states[b, start : start + kept] = pooled.reshape(-1, kept).T.to(hidden.dtype)
                rewritten[b, start : start + kept] = True
        pruned = visual & ~rewritten & _pooled_images(visual, rewritten)
        record_pruning(state, pruned, visual, 0, layout)
        return Rewrite(pruned, rewritten, states)


def _pooled_images(visual: torch.Tensor, rewritten: torch.Tensor) -> torch.Tensor:
    """(B, T) the visual slots of the images that were pooled (an image already S × S or smaller stays whole)."""
    pooled = torch.zeros_like(visual)
    for b, runs in enumerate(image_runs(visual)):
        for start, length in runs:
            if bool(rewritten[b, start]):
                pooled[b, start : start + length] = True
    return pooled
