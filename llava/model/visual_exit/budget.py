"""A visual-token budget for every method, by one of two named rules: `method_stages(method, budget, layers,
visual_tokens, rule)` is the stage spec that runs `method` at `budget` on a model of `layers` layers and
`visual_tokens` per image.

`paper` (the default): each method's own published setting for that many retained tokens on LLaVA-1.5-7B (32
layers, 576 tokens per image; BASELINES.md §10.5), or, where its authors published none, the rule they suggest:
- `fastv` / `random`: K = 2 and the kept count x of SparseVLM's table convention, 2·576 + 30·x = 32·T (166 / 98 /
  30), which the papers comparing against FastV used (FastV itself released K and R, no budgets);
- `pdrop`: boundaries [2, 8, 16] with λ solved for the average, the authors' advice (PyramidDrop#29: λ = 0.19 for
  64; its code released no 192 / 128 / 64 settings);
- `dart`: K = 2 and M = T (its README runs `… 0.778 128`; it keeps M + 4 tokens);
- `visionzip`: T = D + C split as its Table 8 (162 + 30, 108 + 20, 54 + 10: 54 : 10);
- `sparsevlm`: v1.5's `score.py` counts after layers [2, 6, 15]: 192 [300, 200, 110], 128 [303, 110, 36], 96 [238,
  48, 26], 64 [66, 30, 17] (no other budget: it published these);
- `fixed`: the exit layer whose whole-image average is T (VTW publishes a layer, not a budget).
On another model the published setting is carried over: its token counts scaled by visual_tokens / 576 (the same
share of the image), its layers to the same relative depth (round(ℓ·L / 32), at least 1).

`equal`: one amount of LM compute for every method: the layer average Σ_l n_l / L of the visual tokens entering each
decoder layer (SparseVLM's "equivalent tokens", recycled clusters counted) is T on this model; each method's free
setting is solved for it, its other settings as under `paper`. The two rules agree for FastV, random, PyramidDrop,
VisionZip and fixed; they differ for DART (M from the average) and SparseVLM (its counts scaled together).

`dynamic` (DyVTE's gates) has no setting that fixes its average in advance: its threshold is calibrated on data
(llava.analysis.compare).
"""

from __future__ import annotations

import math

METHODS = ("fastv", "random", "pdrop", "dart", "visionzip", "sparsevlm", "fixed")
RULES = ("paper", "equal")
_REFERENCE_LAYERS = 32  # LLaVA-1.5-7B's depth, the one the papers' layer settings are given for
_REFERENCE_TOKENS = 576  # and its visual tokens per image
_SPARSEVLM_COUNTS = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
_SPARSEVLM_RECYCLED = 0.3  # the share (+1) of the pruned tokens it clusters, into ⌊n/10⌋ + 1 merged tokens
_VISIONZIP_SPLIT = (54, 10)  # dominant : contextual


class OutOfReach(ValueError):
    """A budget a method cannot meet on this model (its fixed layers alone cost more, or it exceeds the image)."""


def _scaled(layer: int, num_layers: int) -> int:
    """A layer of a 32-layer setting at the same relative depth of a `num_layers` model (at least 1)."""
    return max(1, min(num_layers - 1, round(layer * num_layers / _REFERENCE_LAYERS)))


def method_stages(
    method: str, budget: float, num_layers: int, visual_tokens: int, rule: str = "paper", keep_positions: bool = False
) -> str:
    """The stage spec of `method` at `budget` by `rule`, for a model of `num_layers` layers and `visual_tokens` per
    image; `keep_positions` runs the methods that renumber positions with `:keep` (a model whose multi-row positions
    have no renumbering). ValueError (OutOfReach) when the budget is out of the method's reach there."""
    try:
        spec = _method_stages(method, budget, num_layers, visual_tokens, rule)
    except OutOfReach as error:
        carried = f", {budget * visual_tokens / _REFERENCE_TOKENS:.3g} of this model's {visual_tokens}" if rule == "paper" else ""
        raise OutOfReach(f"{method} at {budget:g} tokens ({rule} rule{carried}): {error}") from None
    return spec + ":keep" if keep_positions and method in ("pdrop", "sparsevlm") else spec


def _method_stages(method: str, budget: float, num_layers: int, visual_tokens: int, rule: str) -> str:
    n, layers = visual_tokens, num_layers
    if rule not in RULES:
        raise ValueError(f"unknown budget rule {rule!r}; known: {', '.join(RULES)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} for a visual budget; known: {', '.join(METHODS)}")
    if not 0 <= budget <= (_REFERENCE_TOKENS if rule == "paper" else n):
        limit = f"{_REFERENCE_TOKENS} (LLaVA-1.5's tokens, which paper budgets count)" if rule == "paper" else f"{n} (the model's visual tokens per image)"
        raise OutOfReach(f"outside [0, {limit}]")
    # What a paper budget is on this model: the same share of the image.
    target = budget * n / _REFERENCE_TOKENS if rule == "paper" else budget
    if method == "visionzip":
        kept = round(target)
        dominant = max(1, round(kept * _VISIONZIP_SPLIT[0] / sum(_VISIONZIP_SPLIT)))
        return f"visionzip:{dominant}:{max(kept - dominant, 0)}"
    if method == "fixed":
        return _fixed(target, layers, n)
    if method == "pdrop":
        boundaries = sorted({_scaled(layer, layers) for layer in (2, 8, 16)})
        ratio = _solve(lambda r: _pdrop_average(boundaries, r, n, layers), target)
        return f"pdrop:{'-'.join(map(str, boundaries))}:{ratio:.4f}"
    if method == "sparsevlm":
        return _sparsevlm(budget, target, layers, n, rule)
    k = _scaled(2, layers)
    kept = (layers * target - k * n) / (layers - k)
    if kept < 0:
        raise OutOfReach(f"its first {k} layers, which see every token, alone average {k * n / layers:.1f}: it reaches "
                         f"[{k * n / layers:.1f}, {n}] here")
    if method == "dart":
        if rule == "paper":  # M = T, carried; it keeps M + 4 (M rounded down to its 8 pivots' multiple)
            return f"dart:{k}:{max(0, math.floor(target / 8) * 8)}"
        return f"dart:{k}:{max(0, math.floor((kept - 4) / 8) * 8)}"
    return f"prune:{method}:{k}:{1 - kept / n:.4f}"


def _fixed(target: float, layers: int, n: int) -> str:
    exit_layer = round(target * layers / n)
    if abs(exit_layer * n / layers - target) > 1:  # a whole layer of the image per step: never another budget
        step = n / layers
        below, above = math.floor(target / step), math.ceil(target / step)
        raise OutOfReach(
            f"an exit after K layers averages K × {step:g}; the nearest are {below * step:g} (K = {below}) and "
            f"{above * step:g} (K = {above}): ask for one, or --exit-layer K"
        )
    return f"fixed:{exit_layer}"


def _sparsevlm(budget: float, target: float, layers: int, n: int, rule: str) -> str:
    boundaries = sorted({_scaled(layer, layers) for layer in (2, 6, 15)})
    if rule == "paper":
        if budget not in _SPARSEVLM_COUNTS:
            published = ", ".join(map(str, sorted(_SPARSEVLM_COUNTS)))
            raise OutOfReach(f"SparseVLM published {published} tokens: --budget-rule equal solves any budget")
        counts = [max(1, round(c * n / _REFERENCE_TOKENS)) for c in _SPARSEVLM_COUNTS[int(budget)][: len(boundaries)]]
    else:
        reference = _SPARSEVLM_COUNTS[128][: len(boundaries)]
        scale = _solve(lambda s: _sparsevlm_average(boundaries, _counts(reference, s, n), n, layers), target, high=n)
        counts = _counts(reference, scale, n)
    return f"sparsevlm:{'-'.join(map(str, boundaries))}:{'-'.join(map(str, counts))}"


def _counts(reference: tuple[int, ...], scale: float, n: int) -> list[int]:
    return [min(max(1, round(count * scale)), n - 1) for count in reference]


def _schedule_average(edges: list[int], counts: list[float], n: int, layers: int) -> float:
    """The layer average of a schedule: the first `edges[0]` layers see all n tokens, then `counts[s]` from
    `edges[s]` up to the next edge (the last up to the model's depth)."""
    bounds = edges + [layers]
    return (edges[0] * n + sum((end - start) * count for count, start, end in zip(counts, bounds, bounds[1:]))) / layers


def _pdrop_average(boundaries: list[int], ratio: float, n: int, layers: int) -> float:
    counts = [math.floor(n * ratio**stage) for stage in range(1, len(boundaries) + 1)]
    return _schedule_average(boundaries, counts, n, layers)


def sparsevlm_schedule(counts: list[int], n: int) -> list[int]:
    """The visual tokens after each of SparseVLM's pruning layers, its recycled clusters counted: min(count, n_v - 1)
    kept, plus ⌊(⌊0.3·n_drop⌋ + 1) / 10⌋ + 1 merged tokens of the n_drop pruned."""
    after, current = [], n
    for count in counts:
        kept = min(count, current - 1)
        dropped = current - kept
        merged = (math.floor(dropped * _SPARSEVLM_RECYCLED) + 1) // 10 + 1 if dropped > 0 else 0
        current = kept + merged
        after.append(current)
    return after


def _sparsevlm_average(boundaries: list[int], counts: list[int], n: int, layers: int) -> float:
    """SparseVLM's layers are 0-based and prune their own output: layer ℓ still sees every token."""
    return _schedule_average([layer + 1 for layer in boundaries], sparsevlm_schedule(counts, n), n, layers)


def _solve(average, budget: float, high: float = 1.0) -> float:
    """The setting in [0, high] whose layer average comes closest to `budget` (it grows with the setting)."""
    lowest = average(0.0)
    if budget < lowest:
        raise OutOfReach(f"its first layers alone average {lowest:.1f}: it reaches [{lowest:.1f}, {average(high):.1f}] here")
    low = 0.0
    for _ in range(60):  # bisection: the average is monotone in the setting
        middle = (low + high) / 2
        low, high = (middle, high) if average(middle) < budget else (low, middle)
    return high
