"""A visual-token budget, by one of two named rules; each method's stage file answers what it runs at one
(`Stage.at_budget`), and `stages.method_stages` picks the method.

`paper` (the default): each method's own published setting for that many retained tokens on LLaVA-1.5-7B (32
layers, 576 tokens per image; BASELINES.md §10.5), or, where its authors published none, the rule they suggest —
each stage file says which. On another model the published setting is carried over: token counts scaled by
visual_tokens / 576 (the same share of the image), layers to the same relative depth (round(ℓ·L / 32), at least 1).

`equal`: one amount of LM compute for every method: the layer average Σ_l n_l / L of the visual tokens entering each
decoder layer (SparseVLM's "equivalent tokens", recycled clusters counted) is T on this model; each method's free
setting is solved for it, its other settings as under `paper`. The two rules agree for FastV, random, PyramidDrop,
VisionZip and fixed; they differ for DART (M from the average) and SparseVLM (its counts scaled together).

`dynamic` (DyVTE's gates) has no setting that fixes its average in advance: its threshold is calibrated on data
(llava.analysis.compare).
"""

from __future__ import annotations

from dataclasses import dataclass

RULES = ("paper", "equal")
REFERENCE_LAYERS = 32  # LLaVA-1.5-7B's depth, the one the papers' layer settings are given for
REFERENCE_TOKENS = 576  # and its visual tokens per image


class OutOfReach(ValueError):
    """A budget a method cannot meet on this model (its fixed layers alone cost more, or it exceeds the image)."""


@dataclass(frozen=True)
class Budget:
    """`tokens` retained visual tokens by `rule`, on a model of `layers` layers and `visual` tokens per image."""

    tokens: float
    rule: str
    layers: int
    visual: int

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown budget rule {self.rule!r}; known: {', '.join(RULES)}")
        highest = REFERENCE_TOKENS if self.paper else self.visual
        if not 0 <= self.tokens <= highest:
            what = "LLaVA-1.5's tokens, which paper budgets count" if self.paper else "the model's visual tokens per image"
            raise OutOfReach(f"outside [0, {highest}] ({what})")

    @property
    def paper(self) -> bool:
        return self.rule == "paper"

    @property
    def target(self) -> float:
        """The budget's layer average of visual tokens on this model (a paper budget: the same share of the image)."""
        return self.tokens * self.visual / REFERENCE_TOKENS if self.paper else self.tokens

    def carried(self, count: float) -> float:
        """A count of LLaVA-1.5's 576 tokens as the same share of this model's."""
        return count * self.visual / REFERENCE_TOKENS

    def kept_after(self, first: int) -> float:
        """The x kept after the `first` full layers that meets the target: first·n + (L − first)·x = L·T; OutOfReach
        when those full layers alone already average more."""
        kept = (self.layers * self.target - first * self.visual) / (self.layers - first)
        if kept < 0:
            floor = first * self.visual / self.layers
            raise OutOfReach(f"its first {first} layers, which see every token, alone average {floor:.1f}: it reaches "
                             f"[{floor:.1f}, {self.visual}] here")
        return kept

    def layer(self, reference: int) -> int:
        """A layer of a 32-layer setting at the same relative depth of this model (at least 1)."""
        return max(1, min(self.layers - 1, round(reference * self.layers / REFERENCE_LAYERS)))


def schedule_average(edges: list[int], counts: list[float], n: int, layers: int) -> float:
    """The layer average of a schedule: the first `edges[0]` layers see all n tokens, then `counts[s]` from
    `edges[s]` up to the next edge (the last up to the model's depth)."""
    bounds = edges + [layers]
    return (edges[0] * n + sum((end - start) * count for count, start, end in zip(counts, bounds, bounds[1:]))) / layers


def solve(average, budget: float, high: float = 1.0) -> float:
    """The setting in [0, high] whose layer average comes closest to `budget` (it grows with the setting)."""
    lowest = average(0.0)
    if budget < lowest:
        raise OutOfReach(f"its first layers alone average {lowest:.1f}: it reaches [{lowest:.1f}, {average(high):.1f}] here")
    low = 0.0
    for _ in range(60):  # bisection: the average is monotone in the setting
        middle = (low + high) / 2
        low, high = (middle, high) if average(middle) < budget else (low, middle)
    return high
