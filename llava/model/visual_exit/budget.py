"""One visual-token budget for every method: `method_stages(method, budget, layers, visual_tokens)` is the stage spec
that runs `method` at `budget` *equivalent* visual tokens — the layer average Σ_l n_l / L of the visual tokens
that enter each decoder layer, the count SparseVLM's table (and the VisionZip and DART tables comparing against
it) use. So "64 / 128 / 192 tokens" is one amount of LM compute for every method, whichever layer it reduces at.

Each method's free setting is solved for that average, with its paper's fixed settings scaled to the model's depth
(LLaVA-1.5-7B: 32 layers, 576 tokens per image):
- `fastv` / `random`: prune after K = 2 layers, keeping x with 2·n + (L − 2)·x = L·T;
- `pdrop`: boundaries [2, 8, 16] (the authors' advice for budgets below its default's 270), λ solved;
- `dart`: after K = 2 layers it keeps M + 4 tokens (its 8 pivots' greedy picks plus the 4 image pivots);
- `visionzip`: every layer sees D + C = T tokens, split 54 : 10 as its 64-token setting;
- `sparsevlm`: layers [2, 6, 15] (0-based; each prunes its own output) with v1.5's keep counts for 128 tokens,
  scaled to the budget (its recycled cluster means count as tokens, as SparseVLM counts them);
- `fixed`: the exit layer k with k·n = L·T (the budget's compute as a whole-image exit), refused when no whole k
  comes within one token of it.
`dynamic` (DyVTE's gates) has no setting that fixes its average in advance: its threshold is calibrated on data
(llava.analysis.compare).
"""

from __future__ import annotations

import math

METHODS = ("fastv", "random", "pdrop", "dart", "visionzip", "sparsevlm", "fixed")
_REFERENCE_LAYERS = 32  # LLaVA-1.5-7B's depth, the one the papers' layer settings are given for
_SPARSEVLM_COUNTS_128 = (303, 110, 36)


class OutOfReach(ValueError):
    """A budget a method cannot meet on this model (its fixed layers alone cost more, or it exceeds the image)."""


def _scaled(layer: int, num_layers: int) -> int:
    """A layer of a 32-layer setting at the same relative depth of a `num_layers` model (at least 1)."""
    return max(1, min(num_layers - 1, round(layer * num_layers / _REFERENCE_LAYERS)))


def method_stages(method: str, budget: float, num_layers: int, visual_tokens: int) -> str:
    """The stage spec of `method` at `budget` equivalent visual tokens, for a model of `num_layers` layers and
    `visual_tokens` per image. ValueError when the budget is out of reach (above the full count, or below what the
    method's fixed layers already cost)."""
    n, layers = visual_tokens, num_layers
    if not 0 <= budget <= n:
        raise OutOfReach(f"visual budget {budget:g} outside [0, {n}] (the model's visual tokens per image)")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} for a visual budget; known: {', '.join(METHODS)}")
    if method == "visionzip":
        kept = round(budget)
        dominant = max(1, round(kept * 54 / 64))
        return f"visionzip:{dominant}:{max(kept - dominant, 0)}"
    if method == "fixed":
        exit_layer = round(budget * layers / n)
        if abs(exit_layer * n / layers - budget) > 1:  # a whole layer of the image per step: never another budget
            step = n / layers
            below, above = math.floor(budget / step), math.ceil(budget / step)
            raise OutOfReach(
                f"fixed at {budget:g} tokens: an exit after K layers averages K × {step:g}; the nearest are "
                f"{below * step:g} (K = {below}) and {above * step:g} (K = {above}): ask for one, or --exit-layer K"
            )
        return f"fixed:{exit_layer}"
    if method == "pdrop":
        boundaries = sorted({_scaled(layer, layers) for layer in (2, 8, 16)})
        ratio = _solve(lambda r: _pdrop_average(boundaries, r, n, layers), budget, n, "pdrop")
        return f"pdrop:{'-'.join(map(str, boundaries))}:{ratio:.4f}"
    if method == "sparsevlm":
        boundaries = sorted({_scaled(layer, layers) for layer in (2, 6, 15)})
        scale = _solve(lambda s: _sparsevlm_average(boundaries, s, n, layers), budget, n, "sparsevlm", high=n)
        counts = [max(1, round(c * scale)) for c in _SPARSEVLM_COUNTS_128[: len(boundaries)]]
        return f"sparsevlm:{'-'.join(map(str, boundaries))}:{'-'.join(map(str, counts))}"
    k = _scaled(2, layers)
    kept = (layers * budget - k * n) / (layers - k)
    if kept < 0:
        raise OutOfReach(f"{method} at {budget:g} tokens: its first {k} layers alone average more")
    if method == "dart":
        return f"dart:{k}:{max(0, math.floor((kept - 4) / 8) * 8)}"
    return f"prune:{method}:{k}:{1 - kept / n:.4f}"


def _schedule_average(edges: list[int], counts: list[int], n: int, layers: int) -> float:
    """The layer average of a schedule: the first `edges[0]` layers see all n tokens, then `counts[s]` from
    `edges[s]` up to the next edge (the last up to the model's depth)."""
    bounds = edges + [layers]
    return (edges[0] * n + sum((end - start) * count for count, start, end in zip(counts, bounds, bounds[1:]))) / layers


def _pdrop_average(boundaries: list[int], ratio: float, n: int, layers: int) -> float:
    counts = [math.floor(n * ratio**stage) for stage in range(1, len(boundaries) + 1)]
    return _schedule_average(boundaries, counts, n, layers)


def _sparsevlm_average(boundaries: list[int], scale: float, n: int, layers: int) -> float:
    """SparseVLM's layers are 0-based and prune their own output: layer ℓ still sees every token."""
    counts = [min(max(1, round(count * scale)), n - 1) for count in _SPARSEVLM_COUNTS_128[: len(boundaries)]]
    return _schedule_average([layer + 1 for layer in boundaries], counts, n, layers)


def _solve(average, budget: float, n: int, method: str, high: float = 1.0) -> float:
    """The setting in [0, high] whose layer average comes closest to `budget` (it grows with the setting)."""
    lowest = average(0.0)
    if budget < lowest:
        raise OutOfReach(f"{method} at {budget:g} tokens: its first layers alone average {lowest:.1f}")
    low = 0.0
    for _ in range(60):  # bisection: the average is monotone in the setting
        middle = (low + high) / 2
        low, high = (middle, high) if average(middle) < budget else (low, middle)
    return high
