"""`sparsevlm:LAYERS:COUNTS` (SparseVLM v1.5, Zhang et al. 2025): text-guided pruning inside the LLM, with recycling;
`sparsevlm-drop:LAYERS:COUNTS` the same without it.

1. Raters, chosen once from the LLM's input embeddings (layer 0's input) E: with V the sample's visual tokens and T
   the text after its last visual token, M = E_V·E_Tᵀ, softmax over the text, mean over the visual tokens; the
   raters are the text tokens scoring above the mean (all of T when none does: one text token, or exact ties).
2. At each layer ℓ of LAYERS (0-based layer indices, as SparseVLM's `pruning_loc`: `2-6-15` for LLaVA-1.5) each
   visual token scores the raters' attention to it in layer ℓ (mean over heads, then over raters). Only the rater
   rows are computed, from the layer's input and its keys, RoPE at the tokens' positions, causal: no layer leaves
   its fast kernel and no (T x T) map is made. Layer ℓ and its cache see every token; its output keeps each
   sample's min(count, n_v − 1) best-scored visual tokens (COUNTS, one per layer; n_v its current visual count,
   recycled ones included), as SparseVLM does; in prune/pdrop terms, pruning after the first ℓ + 1 layers.
3. Recycling (v1.5): the ⌊0.3·n_drop⌋ + 1 best-scored of the n_drop pruned tokens are clustered by DPC-kNN
   (`density_peak_centers`, on layer ℓ's output) into ⌊n/10⌋ + 1 clusters, each merged into the uniform mean of
   its members; the other members leave. `sparsevlm-drop` (SparseVLM v2.0's choice, without v2.0's other
   changes): the pruned tokens just leave.
4. Positions, as SparseVLM v1.5's code has them (`renumber`, the default): the merged tokens follow the sample's
   kept visual tokens, in the order of their centers' rank (its `cluster_and_merge` output), and after each pruning
   layer the remaining tokens are numbered 0, 1, ... again; each decode token takes, in each layer, the position
   after that layer's own cached tokens (its attention reads it from the layer's cache length). `keep`: every token
   keeps its original position and each merged token sits at its cluster center's slot, as the exit keeps them.

LLaVA-1.5's budgets (SparseVLM v1.5's `score.py`): 192 tokens `sparsevlm:2-6-15:300-200-110`, 128
`sparsevlm:2-6-15:303-110-36`, 64 `sparsevlm:2-6-15:66-30-17`.

Edge cases: a count ≥ n_v − 1 keeps all but the lowest-scored token (SparseVLM's min(count, n_v − 1)); recycled,
that one is its own cluster, so nothing changes. A sample with no text after its visual tokens has no raters and
keeps them all. Without recycling a sample left with no visual token has exited after ℓ + 1 layers; recycling keeps
at least one center. Pruned counts the slots that left (merged members included). Layer ℓ = L − 1 changes nothing
(nothing runs after it). Sliding-window layers: the rater rows see every earlier key, as FastV's row does.
Deterministic: ties, wherever they occur, go to the earlier token. DPC-kNN's 1e-6 random density noise is dropped;
of two equal densities the earlier token counts as the denser (so one cluster of fewer than 10 recycled tokens,
k = 1, where every density is 1, is centered on its earliest member). The mean is exact (no +1e-6 in the count).
Raters, scores and clusters run in fp32. FLOPs count the tokens entering each layer (centers included); the rater
rows and the clustering, far below a layer, are not counted (as FastV's row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers.models.llama.modeling_llama import repeat_kv

from llava.model.visual_exit.budget import Budget, OutOfReach, schedule_average, solve
from llava.model.visual_exit.scorers.fastv import attention_of, projected_heads, rotated, rotated_keys
from llava.model.visual_exit.stages.base import ExitState, LayerStep, Rewrite, Stage, spec_number, spec_positions
from llava.model.visual_exit.stages.prune import outside_top, record_pruning
from llava.model.visual_exit.tokens import TokenLayout

RECYCLED_SHARE = 0.3  # of the pruned tokens, the best-scored share (+1) that is clustered
# v1.5's `score.py`: visual tokens kept after layers 2, 6, 15 for each budget it published
PUBLISHED_COUNTS = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}


@dataclass(frozen=True)
class SparseVLM(Stage):
    layers: tuple[int, ...]
    counts: tuple[int, ...]
    renumbers: bool = True
    recycle: ClassVar[bool] = True
    usage = "sparsevlm:LAYERS:COUNTS[:renumber|keep]"
    optional_fields = 1

    @classmethod
    def parse(cls, args: list[str]) -> SparseVLM:
        layers_text, counts_text = args[:2]
        layers, counts = spec_integers(layers_text, "layers"), spec_integers(counts_text, "keep counts")
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"layers {layers_text} must increase")
        if len(counts) != len(layers):
            raise ValueError(f"{len(layers)} layers need {len(layers)} keep counts, got {counts_text}")
        return cls(layers, counts, spec_positions(args, 2))

    @classmethod
    def at_budget(cls, budget: Budget) -> str:
        """Layers [2, 6, 15] (of 32). `paper`: v1.5's `score.py` counts for 192 / 128 / 96 / 64 (no other budget:
        it published these), carried. `equal`: its 128 counts scaled together until the layer average, merged tokens
        counted, is T."""
        boundaries = sorted({budget.layer(layer) for layer in (2, 6, 15)})
        n, layers = budget.visual, budget.layers
        if budget.paper:
            if budget.tokens not in PUBLISHED_COUNTS:
                published = ", ".join(map(str, sorted(PUBLISHED_COUNTS)))
                raise OutOfReach(f"SparseVLM published {published} tokens: --budget-rule equal solves any budget")
            counts = [max(1, round(budget.carried(c))) for c in PUBLISHED_COUNTS[int(budget.tokens)][: len(boundaries)]]
        else:
            reference = PUBLISHED_COUNTS[128][: len(boundaries)]
            scaled = lambda scale: [min(max(1, round(c * scale)), n - 1) for c in reference]  # noqa: E731
            edges = [layer + 1 for layer in boundaries]  # a pruning layer prunes its own output: it sees every token
            average = lambda scale: schedule_average(edges, schedule(scaled(scale), n), n, layers)  # noqa: E731
            counts = scaled(solve(average, budget.target, high=n))
        return f"sparsevlm:{'-'.join(map(str, boundaries))}:{'-'.join(map(str, counts))}"

    @property
    def pruning_layers(self) -> tuple[int, ...]:
        return tuple(layer + 1 for layer in self.layers)  # layer ℓ prunes its output: after ℓ + 1 layers

    def check(self, num_layers: int, has_gates: bool) -> None:
        if self.layers[-1] >= num_layers:
            raise ValueError(f"sparsevlm layer {self.layers[-1]} is not one of the model's layers 0..{num_layers - 1}")

    def after_layer(self, step: LayerStep, state: ExitState, layout: TokenLayout):
        if not state.any_active:
            return None
        if step.index == 0:
            raters = text_raters(step.input, layout)
            state.memory[self] = (restore_slots(raters, layout), int(raters.sum(dim=1).max()))
        by_origin, most = state.memory[self]
        if step.index not in self.layers or step.index == state.num_layers - 1 or most == 0:
            return None
        raters = by_origin.gather(1, layout.origin) & layout.valid_keys.valid
        visual = layout.visual & state.active[:, None]
        scores = rater_attention(step, layout, raters, most)
        count = visual.sum(dim=1)
        keep = (count - 1).clamp(min=0, max=self.counts[self.layers.index(step.index)])
        pruned = outside_top(scores, visual, torch.where(raters.any(dim=1), keep, count))
        if not self.recycle:
            record_pruning(state, pruned, visual, step.index + 1, layout)
            return pruned
        centers, states, rank = recycled_clusters(step.output, scores, pruned)
        record_pruning(state, pruned & ~centers, visual, step.index + 1, layout)
        order = behind_kept_visual(visual & ~pruned, visual, centers, rank) if self.renumbers else None
        return Rewrite(pruned & ~centers, centers, states, order)


@dataclass(frozen=True)
class SparseVLMWithoutRecycling(SparseVLM):
    """The pruned tokens leave; nothing is merged."""

    recycle = False
    usage = "sparsevlm-drop:LAYERS:COUNTS[:renumber|keep]"


def schedule(counts: list[int], n: int) -> list[int]:
    """The visual tokens after each pruning layer, merged tokens counted: min(count, n_v − 1) kept, plus
    ⌊(⌊0.3·n_drop⌋ + 1) / 10⌋ + 1 merged tokens of the n_drop pruned."""
    after, current = [], n
    for count in counts:
        kept = min(count, current - 1)
        dropped = current - kept
        merged = (math.floor(dropped * RECYCLED_SHARE) + 1) // 10 + 1 if dropped > 0 else 0
        current = kept + merged
        after.append(current)
    return after


def spec_integers(text: str, what: str) -> tuple[int, ...]:
    """`2-6-15` -> (2, 6, 15); ValueError for anything but non-negative integers joined by '-'."""
    parts = text.split("-")
    if "" in parts:
        raise ValueError(f"{what} {text!r}: expected non-negative integers joined by '-', e.g. 2-6-15")
    return tuple(spec_number(part, int, 0) for part in parts)


def text_raters(embeddings: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """(B, T) bool: each sample's raters among the text after its last visual token, from the input embeddings
    (B, T, H). The products run over all slot pairs (once per prefill, about 1 % of a layer's FLOPs)."""
    valid, visual = layout.valid_keys.valid, layout.visual
    slots = torch.arange(valid.shape[1], device=valid.device)
    last_visual = torch.where(visual, slots, -1).amax(dim=1, keepdim=True)  # -1 without any: no text qualifies
    text = valid & ~visual & (slots > last_visual) & (last_visual >= 0)
    embeddings = embeddings.float()
    relation = (embeddings @ embeddings.transpose(1, 2)).masked_fill(~text[:, None, :], float("-inf")).softmax(dim=-1)
    relation = relation.masked_fill(~(visual[:, :, None] & text[:, None, :]), 0.0)  # (B, visual rows, text columns)
    score = relation.sum(dim=1) / visual.sum(dim=1, keepdim=True).clamp(min=1)  # (B, T): mean over visual tokens
    mean = score.sum(dim=1, keepdim=True) / text.sum(dim=1, keepdim=True).clamp(min=1)
    raters = text & (score > mean)
    return torch.where(raters.any(dim=1, keepdim=True), raters, text)


def restore_slots(flags: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """(B, T) per-slot flags -> (B, input length) by original index, so later layouts gather them by `origin`."""
    length = layout.input_length
    target = torch.where(layout.valid_keys.valid, layout.origin, length)  # padding slots land past the end
    return flags.new_zeros(flags.shape[0], length + 1).scatter_(1, target, flags)[:, :length]


def rater_attention(step: LayerStep, layout: TokenLayout, raters: torch.Tensor, most: int) -> torch.Tensor:
    """(B, T) fp32: the attention of each sample's rater rows in the step's layer (Llama interface), mean over
    heads, then over its raters; `most` bounds the raters per sample. Each row as FastV's scorer computes its one
    (scorers/fastv.py), with the keys the layer cached or `rotated_keys` without a cache."""
    attention, valid = attention_of(step.layer), layout.valid_keys.valid
    batch, length = valid.shape
    slots = torch.arange(length, device=valid.device)
    rows = (~raters).long().argsort(dim=1, stable=True)[:, :most]  # (B, R): rater slots first, in order
    real = raters.gather(1, rows)
    picked = step.input.gather(1, rows[..., None].expand(-1, -1, step.input.shape[-1]))
    normed = step.layer.input_layernorm(picked)  # a per-token norm: the rater rows need only their own
    query = projected_heads(attention, normed, "q")  # (B, heads, R, d)
    cos, sin = (e.gather(1, rows[..., None].expand(-1, -1, e.shape[-1])) for e in layout.rotation(step.index))
    query = rotated(query, cos, sin)
    keys = step.cached_keys
    if keys is None:
        keys = rotated_keys(step.layer, step.input, layout.rotation(step.index))
    key = repeat_kv(keys, attention.num_key_value_groups)
    logits = (query.float() @ key.float().transpose(-1, -2)) * attention.scaling  # (B, heads, R, T)
    # A rater sees the valid keys up to itself; a padding row sees all of them (finite, weighted 0 below).
    allowed = valid[:, None, :] & ((slots[None, None, :] <= rows[:, :, None]) | ~real[:, :, None])
    window = step.window(step.index)
    if window is not None:  # a sliding layer's rater sees the keys within its window (masks.py)
        positions = layout.valid_keys.positions
        allowed &= (positions.gather(1, rows)[:, :, None] - positions[:, None, :] < window) | ~real[:, :, None]
    probabilities = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1).mean(dim=1)
    return (probabilities * real[..., None]).sum(dim=1) / real.sum(dim=1, keepdim=True).clamp(min=1)


def behind_kept_visual(kept: torch.Tensor, visual: torch.Tensor, centers: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """(B, T) order of the remaining slots with each sample's merged tokens (`centers`, by their `rank`) right behind
    its last kept visual token (behind the text before its visual tokens when none is kept), as SparseVLM's code
    concatenates kept visual tokens, merged tokens and the text after them."""
    slots = torch.arange(kept.shape[1], device=kept.device).expand_as(kept)
    anchor = torch.where(kept.any(dim=1), torch.where(kept, slots, -1).amax(dim=1),
                         torch.where(visual, slots, kept.shape[1]).amin(dim=1) - 1)
    behind = anchor[:, None] + (rank + 1).double() / (rank.shape[1] + 2)
    return torch.where(centers, behind, slots.double())


def recycled_clusters(hidden: torch.Tensor, scores: torch.Tensor, pruned: torch.Tensor):
    """(centers (B, T) bool, states (B, T, H), rank (B, T)): of each sample's pruned slots, the ⌊0.3·n_drop⌋ + 1
    best-scored are clustered; each cluster's center slot gets the mean of its members' states (`states` is read only
    there) and its center's rank among the sample's centers (`rank`, read only at centers)."""
    dropped = pruned.sum(dim=1)
    chosen = torch.where(dropped > 0, (dropped.double() * RECYCLED_SHARE).floor().long() + 1, 0)
    candidates = pruned & ~outside_top(scores, pruned, chosen)
    width = int(chosen.max())
    centers = torch.zeros_like(pruned)
    rank = torch.zeros_like(pruned, dtype=torch.long)
    if width == 0:
        return centers, hidden, rank
    slots = (~candidates).long().argsort(dim=1, stable=True)[:, :width]  # (B, W): candidate slots, in order
    members = torch.arange(width, device=slots.device) < chosen[:, None]
    states = hidden.gather(1, slots[..., None].expand(-1, -1, hidden.shape[-1])).float()  # (B, W, H)
    center_of, center_rank = density_peak_centers(states, members, chosen // 10 + 1)
    assigned = (center_of[:, :, None] == torch.arange(width, device=slots.device)) & members[:, :, None]  # [b, i, c]
    sizes = assigned.sum(dim=1)  # (B, W): members per center (0: not a center)
    means = (assigned.transpose(1, 2).float() @ states) / sizes.clamp(min=1)[..., None]
    centers.scatter_(1, slots, sizes > 0)
    rank.scatter_(1, slots, center_rank)
    states = torch.zeros_like(hidden).scatter_(1, slots[..., None].expand_as(means), means.to(hidden.dtype))
    return centers, states, rank


def density_peak_centers(x: torch.Tensor, members: torch.Tensor, clusters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN as SparseVLM clusters (its `cluster_and_merge`): for the members (B, W) of x (B, W, C), each one's
    center (an index into W) among `clusters` (B,) centers, and each member's rank by score (a center's rank orders
    SparseVLM's merged tokens). Distance: L2 / √C. Density: exp(−mean squared distance
    to the `clusters` nearest members, itself included). A member's parent distance: to the nearest denser member
    (equal densities: the earlier is denser; the densest: the largest distance of the sample). Centers: the highest
    parent distance × density. Each member joins its nearest center (ties: the better-ranked one), a center itself."""
    _, width, channels = x.shape
    index = torch.arange(width, device=x.device)
    pairs = members[:, :, None] & members[:, None, :]
    distance = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(channels)  # (B, W, W)
    nearest = distance.masked_fill(~pairs, float("inf")).sort(dim=-1).values
    within = index < clusters[:, None, None]
    density = (-nearest.masked_fill(~within, 0.0).square().sum(dim=-1) / clusters[:, None]).exp()  # (B, W)
    # [b, i, j]: j is denser than i. Equal densities (always for mutual nearest neighbours at k = 2) are ordered by
    # position, the earlier denser, where SparseVLM adds 1e-6 random noise: without an order both would be peaks.
    theirs, mine = density[:, None, :], density[:, :, None]
    denser = pairs & ((theirs > mine) | (theirs == mine) & (index[None, :] < index[:, None]))
    farthest = distance.masked_fill(~pairs, float("-inf")).amax(dim=(1, 2))
    to_denser = distance.masked_fill(~denser, float("inf")).amin(dim=-1)
    parent = torch.where(denser.any(dim=-1), to_denser, farthest[:, None])
    ranked = (parent * density).masked_fill(~members, float("-inf")).argsort(dim=1, descending=True, stable=True)
    is_center_rank = index < clusters[:, None]  # (B, W) over ranks
    to_ranked = distance.gather(2, ranked[:, None, :].expand(-1, width, -1))  # [b, i, r]: to the r-th ranked
    to_ranked = to_ranked.masked_fill(~is_center_rank[:, None], float("inf"))
    center_of = ranked.gather(1, to_ranked.argmin(dim=-1))  # argmin: the first minimum, the better-ranked center
    is_center = torch.zeros_like(members).scatter_(1, ranked, is_center_rank)
    rank_of = torch.empty_like(ranked).scatter_(1, ranked, index.expand_as(ranked))
    return torch.where(is_center, index, center_of), rank_of
