"""The prefill's token layout and the one operation on it: drop some positions of some samples."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from llava.model.visual_exit.cache import ValidKeys
from llava.model.visual_exit.gate import gate_feature_weights


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather along dim 1 of a (B, T, ...) tensor with a (B, T') index."""
    expanded = index.view(*index.shape, *([1] * (tensor.dim() - 2))).expand(*index.shape, *tensor.shape[2:])
    return tensor.gather(1, expanded)


def _map_rotations(fn, rotations: dict) -> dict:
    return {kind: tuple(fn(e) for e in pair) for kind, pair in rotations.items()}


@dataclass(frozen=True)
class VisualAdditions:
    """States a model adds onto its visual tokens after each of its first layers (Qwen3-VL's DeepStack): `states[i]`
    (N, H) after layer i, its row r for the r-th visual position of `positions` (B, T, the input's; batch first, as
    the stock model lays them out). A token still present gets its own rows wherever it now stands; one that left
    gets none; a merged token (SparseVLM's) takes its cluster centre's, whose slot it holds."""

    positions: torch.Tensor
    states: tuple[torch.Tensor, ...]

    def add(self, index: int, hidden: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """`hidden` (B, T', H) after layer `index`, with that layer's additions."""
        if index >= len(self.states):
            return hidden
        rows = self.positions.flatten().cumsum(0).view_as(self.positions) - 1
        origin = layout.origin.clamp(max=self.positions.shape[1] - 1)  # slots of left padding point anywhere
        here = self.positions.gather(1, origin) & layout.valid_keys.valid
        hidden = hidden.clone()
        hidden[here] = hidden[here] + self.states[index].to(hidden)[rows.gather(1, origin)[here]]
        return hidden


@dataclass
class TokenLayout:
    """Per slot of the current sequence: validity, RoPE position, original index, and whether it is visual.
    `valid_keys`: the slots a layer run now caches as real keys. For the gates only (None otherwise): per slot, its
    weight in the gate features (`feature_weights`, from `gate_feature_weights`), read off the prompt alone.
    `position_embeddings`: {rotation kind: (cos, sin)}, one kind per differently rotated layer type (Gemma 3's
    local and global layers; one kind, None, for most models); `layer_rotations[i]`: layer i's kind.
    `renumber`: None keeps every token's original position through drops (the exit's rule); otherwise the rotary
    function (position ids -> such a dict) that numbers each sample's remaining tokens 0, 1, ... again after each
    drop, as PyramidDrop's and SparseVLM's code do."""

    valid_keys: ValidKeys
    position_ids: torch.Tensor
    position_embeddings: dict[str | None, tuple[torch.Tensor, torch.Tensor]]
    origin: torch.Tensor
    visual: torch.Tensor
    feature_weights: torch.Tensor | None
    input_valid: torch.Tensor
    compacted: bool = False
    renumber: Callable | None = None
    additions: VisualAdditions | None = None
    layer_rotations: tuple = ()

    @property
    def input_length(self) -> int:
        return self.input_valid.shape[1]

    def rotation(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) (B, T, d) of layer `layer`'s kind of rotation."""
        return self.position_embeddings[self.layer_rotations[layer] if self.layer_rotations else None]

    @classmethod
    def start(
        cls, valid: torch.Tensor, position_ids: torch.Tensor, position_embeddings: dict, visual: torch.Tensor | None,
        with_gate_features: bool, prompt_end: torch.Tensor | None = None, additions: VisualAdditions | None = None,
        blocks: torch.Tensor | None = None, layer_rotations: tuple = (),
    ):
        """`prompt_end` (B,): per sample, the slot after its prompt's last token, where the gates stop reading (a
        training sequence goes on with its answer, which inference never has); None: the whole input is prompt.
        `additions`: what the model adds onto its visual tokens after its first layers (DeepStack). `blocks`
        (B, T): bidirectional block ids as in `ValidKeys`."""
        batch, length = valid.shape
        slots = torch.arange(length, device=valid.device).expand(batch, length)
        visual = valid & visual if visual is not None else torch.zeros_like(valid)
        feature_weights = None
        if with_gate_features:
            prompt = valid if prompt_end is None else valid & (slots < prompt_end[:, None])
            last_index = torch.where(prompt, slots, -1).amax(dim=1)
            last_visual = torch.where(visual & prompt, slots, -1).amax(dim=1, keepdim=True)
            text_span = prompt & (slots > last_visual) & (slots != last_index[:, None])
            feature_weights = gate_feature_weights(text_span, last_index)
        positions = position_ids.expand(batch, length)
        return cls(
            valid_keys=ValidKeys(valid, padded=not bool(valid.all()), positions=positions, blocks=blocks),
            position_ids=positions,
            position_embeddings=_map_rotations(lambda e: e.expand(batch, *e.shape[1:]), position_embeddings),
            origin=slots,
            visual=visual,
            feature_weights=feature_weights,
            input_valid=valid,
            additions=additions,
            layer_rotations=layer_rotations,
        )

    def drop(
        self, hidden: torch.Tensor, drop: torch.Tensor, order: torch.Tensor | None = None,
        sizes: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, TokenLayout]:
        """Remove the slots where `drop` is true (and any a `masked` layout already took out) and re-pack each
        sample to the right (left padding), in slot order or, given `order` (B, T), by it (stable; SparseVLM moves
        its merged tokens behind the kept visual ones). `sizes`: the longest and shortest sample after it, when the
        host knows them already (`PendingDrop`); else they are read here, the one host wait of a drop.

        Positions keep their RoPE values, or are numbered again under `renumber`; the new layout starts new
        ValidKeys for the layers after.
        """
        keep = self.valid_keys.valid & ~drop
        counts = keep.sum(dim=1)
        longest, shortest = sizes or torch.stack([counts.max(), counts.min()]).tolist()
        batch, length = keep.shape
        pad = longest - counts
        slots = torch.arange(length, device=keep.device).expand(batch, length)
        if order is None:
            rank = keep.long().cumsum(dim=1) - 1
        else:  # each kept slot's place among its sample's kept slots, by `order`
            by_order = order.masked_fill(~keep, float("inf")).argsort(dim=1, stable=True)
            rank = torch.empty_like(by_order).scatter_(1, by_order, slots)
        destination = torch.where(keep, pad[:, None] + rank, longest)
        index = torch.zeros(batch, longest + 1, dtype=torch.long, device=keep.device)
        index.scatter_(1, destination, slots)
        index = index[:, :longest]
        valid = torch.arange(longest, device=keep.device)[None, :] >= pad[:, None]
        if self.renumber is None:
            position_ids = self.position_ids.gather(1, index)
            position_embeddings = _map_rotations(lambda e: _gather(e, index), self.position_embeddings)
        else:
            position_ids = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
            position_embeddings = self.renumber(position_ids)
        blocks = None if self.valid_keys.blocks is None else self.valid_keys.blocks.gather(1, index)
        layout = replace(
            self,
            valid_keys=ValidKeys(valid, padded=shortest < longest, positions=position_ids, blocks=blocks),
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            origin=self.origin.gather(1, index),
            visual=self.visual.gather(1, index) & valid,
            feature_weights=None if self.feature_weights is None else _gather(self.feature_weights, index) * valid[..., None],
            compacted=True,
        )
        return _gather(hidden, index), layout

    def masked(self, drop: torch.Tensor) -> TokenLayout:
        """The slots where `drop` is true taken out as keys without moving anything (no host wait): to the layers
        after, masked slots are what dropped ones are, keys no query sees; `drop` compacts them later."""
        valid = self.valid_keys.valid & ~drop
        return replace(
            self, valid_keys=replace(self.valid_keys, valid=valid, padded=True), visual=self.visual & valid, compacted=True,
        )

    def restore(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scatter per-slot states back to the input layout; dropped positions become zeros."""
        if not self.compacted:
            return hidden
        length = self.input_length
        target = torch.where(self.valid_keys.valid, self.origin, length)
        restored = hidden.new_zeros(hidden.shape[0], length + 1, hidden.shape[-1])
        restored.scatter_(1, target.unsqueeze(-1).expand_as(hidden), hidden)
        return restored[:, :length]


class PendingDrop:
    """A drop decided on the device (the gates', a fixed exit's) before the host knows its size. On a CUDA device its
    summary — did anything leave, the longest and shortest sample after, does any sample still hold visual tokens —
    goes to pinned host memory without waiting, and `ready` polls for it while the next layers are queued; until
    then the decoder runs on the layout `masked` by it (`before`: the layout before any pending mask) and compacts
    when the summary arrives. Elsewhere the device is the host: it is ready at once, and `read` asks only whether
    anything left (most layers: nothing), leaving the sizes to the compaction."""

    def __init__(self, drop: torch.Tensor, layout: TokenLayout, active: torch.Tensor, earlier: PendingDrop | None = None):
        if earlier is not None:  # not compacted yet: one drop for both, on the same slots
            drop = drop | earlier.drop
        self.drop, self.active, self.event, self.summary, self.masked = drop, active, None, None, False
        self.before = None if earlier is None else earlier.before
        if drop.is_cuda:
            summary = self.summarize(drop, layout, active)
            self.summary = torch.empty(summary.shape, dtype=summary.dtype, pin_memory=True)
            self.summary.copy_(summary, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    @staticmethod
    def summarize(drop: torch.Tensor, layout: TokenLayout, active: torch.Tensor) -> torch.Tensor:
        """(4,) on the device: anything dropped, the longest and the shortest sample after the drop, any active."""
        kept = (layout.valid_keys.valid & ~drop).sum(dim=1)
        return torch.stack([drop.any(), kept.max(), kept.min(), active.any()]).long()

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def read(self) -> tuple[bool, tuple[int, int] | None, bool | None]:
        """(anything dropped, (longest, shortest) after it or None: not read yet, any sample still active or None:
        as before); waits when not `ready`."""
        if self.summary is None:
            if not bool(self.drop.any()):
                return False, None, None
            return True, None, bool(self.active.any())
        self.event.synchronize()
        dropped, longest, shortest, active = self.summary.tolist()
        return bool(dropped), (longest, shortest), bool(active)
