"""`dart:K:M` (DART, Wen et al. 2025: duplication matters more than importance): after the first K layers each
sample keeps a few pivot tokens and the visual tokens least duplicated with them; the rest leave the sequence and
the later layers' caches. LLaVA-1.5's setting is `dart:2:128` (132 of 576 kept).

Signals of layer K (1-based), as DART reads them: its keys after RoPE (the ones it cached, or projected again
without a cache; heads concatenated, the KV heads of a GQA model: repeating them scales every norm alike) and its
output through the decoder's final norm, both read in fp32. The set order costs one host read per DART layer.
1. Pivots: the 4 visual tokens, and the 4 text tokens after the sample's last visual token, whose keys have the
   largest L1 norm. All of a sample's visual tokens (every image) are "the image"; text between images is neither.
2. Candidates: the visual tokens that are not pivots. The pivots are visited in the order CPython iterates
   `set(image_pivots + text_pivots)` of the tokens' indices in the sample's own unpadded input (as DART builds it,
   where they are sequence indices of a batch of one; tokens earlier stages dropped still count), so a padded
   sample chooses as it would alone. Each pivot takes the ⌊M / 8⌋ candidates whose normed states have the lowest
   cosine similarity to its own.
3. Kept: the visual pivots and what the pivots took: 4 + 8·⌊M / 8⌋ tokens when there are enough candidates.

Edge cases (DART, written for 576 tokens and a batch of one, has none of them): a sample with at most M visual
tokens keeps them all, the budget covers them; when the candidates run out a pivot takes what is left, so all
are kept (DART's topk would fail there); a sample with fewer than 4 text tokens after its visual ones has that
many text pivots, each still taking ⌊M / 8⌋; one with fewer than 4 visual tokens keeps them all. A sample always
keeps its visual pivots, so DART never empties one: pruned tokens count as pruned, never as an exit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llava.model.visual_exit.budget import Budget
from llava.model.visual_exit.scorers.fastv import rotated_keys
from llava.model.visual_exit.stages.base import ExitState, LayerStep, Stage, spec_number
from llava.model.visual_exit.stages.prune import outside_top, record_pruning
from llava.model.visual_exit.tokens import TokenLayout

IMAGE_PIVOTS = TEXT_PIVOTS = 4


def highest(scores: torch.Tensor, eligible: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's `count` highest-scored eligible slots, best first (ties: the earlier slot), as (B, count)
    slots and whether each exists (a sample may have fewer)."""
    order = scores.masked_fill(~eligible, float("-inf")).argsort(dim=1, descending=True, stable=True)[:, :count]
    return order, eligible.gather(1, order)


def visiting_order(pivots: torch.Tensor, found: torch.Tensor, own_index: torch.Tensor) -> torch.Tensor:
    """(B, P) slots of each sample's pivots in the order CPython iterates the set of their own indices, built
    from the list of image then text pivots (best first) as DART builds it; -1 after a sample's last pivot."""
    visits = []
    for slots, indices, exists in zip(*torch.stack([pivots, own_index.gather(1, pivots), found.long()]).tolist()):
        slot_of = {index: slot for slot, index, real in zip(slots, indices, exists) if real}
        visits.append([slot_of[index] for index in set([index for index, real in zip(indices, exists) if real])])
    return torch.tensor([row + [-1] * (pivots.shape[1] - len(row)) for row in visits], device=pivots.device)


@dataclass(frozen=True)
class Dart(Stage):
    layer: int
    budget: int
    usage = "dart:K:M"

    @classmethod
    def parse(cls, args: list[str]) -> Dart:
        layer, budget = args
        return cls(spec_number(layer, int, 1), spec_number(budget, int, 0))

    @classmethod
    def at_budget(cls, budget: Budget) -> str:
        """K = 2 (of 32). `paper`: M = T, carried (its README runs `0.778 128`; 192 and 64 by analogy), rounded down
        to its 8 pivots' multiple; it keeps M + 4. `equal`: M + 4 kept after K with K·n + (L − K)·(M + 4) = L·T."""
        k = budget.layer(2)
        kept = budget.kept_after(k)  # refuses a budget below the first K full layers under either rule
        chosen = budget.target if budget.paper else kept - 4
        return f"dart:{k}:{max(0, math.floor(chosen / 8) * 8)}"

    @property
    def pruning_layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def check(self, num_layers: int, has_gates: bool) -> None:
        if self.layer > num_layers:
            raise ValueError(f"dart layer {self.layer} exceeds the model's {num_layers} layers")

    def after_layer(self, step: LayerStep, state: ExitState, layout: TokenLayout):
        # K = L would prune after the last layer, which changes nothing.
        if step.index + 1 != self.layer or self.layer == state.num_layers or not state.any_active:
            return None
        visual = layout.visual & state.active[:, None]
        pruned = self.duplicated(step, layout, visual & (visual.sum(dim=1) > self.budget)[:, None])
        record_pruning(state, pruned, visual, self.layer, layout)
        return pruned

    def duplicated(self, step: LayerStep, layout: TokenLayout, visual: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: the `visual` slots that neither are pivots nor were taken by one."""
        keys = step.cached_keys
        if keys is None:
            keys = rotated_keys(step.layer, step.input, layout.rotation(step.index))
        key_norms = keys.float().abs().sum(dim=(1, 3))  # L1 over all heads' keys: (B, T)
        states = step.decoder.norm(step.output).float()
        slots = torch.arange(visual.shape[1], device=visual.device)
        after_visual = slots > torch.where(visual, slots, -1).amax(dim=1, keepdim=True)
        text = layout.valid_keys.valid & ~layout.visual & after_visual
        image_pivots, image_found = highest(key_norms, visual, IMAGE_PIVOTS)
        text_pivots, text_found = highest(key_norms, text, TEXT_PIVOTS)
        own_index = (layout.input_valid.long().cumsum(dim=1) - 1).gather(1, layout.origin)
        visits = visiting_order(
            torch.cat([image_pivots, text_pivots], dim=1), torch.cat([image_found, text_found], dim=1), own_index
        )
        candidates = visual & ~torch.zeros_like(visual).scatter_(1, image_pivots, image_found)
        per_pivot = self.budget // (IMAGE_PIVOTS + TEXT_PIVOTS)
        rows = torch.arange(len(visual), device=visual.device)
        for pivot in visits.unbind(dim=1):
            similarity = torch.cosine_similarity(states[rows, pivot.clamp(min=0), None], states, dim=-1)
            take = torch.where(pivot >= 0, per_pivot, 0)  # asking for more than are left takes them all
            candidates = candidates & outside_top(-similarity, candidates, take)
        return candidates
