"""What every exit stage works with: the step after a decoder layer, and the per-sample state of one prefill."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llava.model.visual_exit.tokens import TokenLayout


@dataclass
class LayerStep:
    """What a decision after decoder layer `index` may read: the layer, its input and output hidden states
    (B, T, H), the keys it has just cached for these T slots (None without a cache), and the decoder running it
    (its `layers`, final `norm` and `config`: some methods score with the next layer or the normed states)."""

    index: int
    layer: nn.Module
    input: torch.Tensor
    output: torch.Tensor
    cached_keys: torch.Tensor | None
    decoder: nn.Module | None = None

    def window(self, index: int) -> int | None:
        """Decoder layer `index`'s sliding window in positions (None: full attention)."""
        return None if self.decoder is None else self.decoder.attention_window(index)


class ExitState:
    """Per sample, over one prefill: whether it still holds visual tokens (`active`), its `exit_layer` (layers that
    processed them: L if they never left, 0 without any) and the visual tokens pruned before it exited. `any_active`
    is the host's (possibly stale) view, so that stages skip work once nothing is left. `gates` and `num_layers`
    come from the model."""

    def __init__(self, layout: TokenLayout, num_layers: int, gates: nn.ModuleList | None):
        self.num_layers, self.gates = num_layers, gates
        self.num_visual = layout.visual.sum(dim=1)
        self.has_visual = self.num_visual > 0
        self.active = self.has_visual
        self.exit_layer = torch.where(self.has_visual, num_layers, 0)
        self.pruned_visual = torch.zeros_like(self.num_visual)
        self.any_active = bool(self.has_visual.any())
        self.memory: dict = {}  # what a stage keeps from one layer for a later one of this prefill, under its key

    def exit(self, exiting: torch.Tensor, layer: int, layout: TokenLayout) -> torch.Tensor:
        """Samples `exiting` (B,) lose their visual tokens after `layer` layers; their visual slots (B, T)."""
        self.exit_layer = torch.where(exiting, layer, self.exit_layer)
        self.active = self.active & ~exiting  # not in place: `exiting` may be `self.active` itself
        return layout.visual & exiting[:, None]


@dataclass
class Rewrite:
    """A stage's decision that, besides the visual slots that leave (`drop`, (B, T), or None), gives some slots that
    stay new hidden states from the next layer on: `rewritten` (B, T) and their `states` (B, T, H), read only there
    (SparseVLM's recycled clusters); `order` (B, T), when given, is the order the remaining slots take (SparseVLM's
    code puts its merged tokens behind the kept visual ones). `skipped`: the states are the layer's input, the
    rewritten slots skipped its update (ShortV), which the cost counts. A bare drop mask is the decision that
    rewrites nothing."""

    drop: torch.Tensor | None
    rewritten: torch.Tensor
    states: torch.Tensor
    order: torch.Tensor | None = None
    skipped: bool = False


POSITION_RULES = ("renumber", "keep")


def spec_positions(args: list[str], required: int) -> bool:
    """Whether a stage renumbers positions after its drops: its optional last spec field, `renumber` (its official
    code's rule, the default) or `keep` (every token keeps its original position, as the exit does)."""
    if len(args) == required:
        return True
    if args[required] not in POSITION_RULES:
        raise ValueError(f"positions {args[required]!r}: expected {' or '.join(POSITION_RULES)}")
    return args[required] == "renumber"


def spec_number(text: str, kind: type, lowest: float, highest: float = float("inf")) -> int | float:
    """A number of a stage spec, in [lowest, highest]; ValueError otherwise."""
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not lowest <= value <= highest:
        raise ValueError(f"{text} lies outside [{lowest:g}, {highest:g}]")
    return value


class Stage:
    """One decision source of an exit: before layer 0 and after each layer, the visual slots that leave (or None;
    after a layer, a `Rewrite` when kept slots also get new states). `usage` is its spec (`name:ARG:...`);
    `parse` builds it from the spec's arguments."""

    usage = ""
    optional_fields = 0  # trailing spec fields that may be left out (shown in brackets in `usage`)
    renumbers = False  # numbers the remaining tokens' positions 0, 1, ... again after its drops
    # Reduces the image's tokens before the LLM sees them (VisionZip): it takes the exit's vision slot
    # (ExitConfig.vision_stage), read by the model that encodes the images, and never enters the decoder's loop.
    before_llm = False
    # Changes the images before the model's processor sees them (the downsampling control's smaller image): the
    # caller that loads them applies it; the models never run it.
    before_processor = False
    # Reduces each image's tokens once, before the decoder's first layer runs (in the vision slot or on the input
    # embeddings): after it the gates may still decide the exit of what it kept.
    reduces_input = False
    # Ranks the image's tokens by the question's text through CLIP's text tower (CDPruner): our LLaVA class only.
    reads_instruction = False
    # Decides from device tensors alone and reads nothing of the layout a drop would compact (the gates, a fixed
    # exit): its drops may be carried out layers later, masked until then (decoder.run_layers).
    decides_on_device = False

    def check(self, num_layers: int, has_gates: bool) -> None:
        """Raise ValueError when this stage cannot run on the model."""

    @property
    def pruning_layers(self) -> tuple[int, ...]:
        """The layer counts after which this stage prunes some visual tokens (ExitStats.prune_layer: the first)."""
        return ()

    def before_first_layer(self, state: ExitState, layout: TokenLayout, hidden: torch.Tensor) -> torch.Tensor | Rewrite | None:
        """The visual slots that leave before layer 0 (a `Rewrite` when kept slots take new input states), given the
        LLM's input embeddings `hidden` (B, T, H)."""
        return None

    def after_layer(self, step: LayerStep, state: ExitState, layout: TokenLayout) -> torch.Tensor | Rewrite | None:
        raise NotImplementedError


class InputReduction(Stage):
    """A stage that reduces each sample's visual tokens once, on the LLM's input embeddings, before layer 0
    (DivPrune, the downsampling control); `reduce` decides for the samples that still hold visual tokens."""

    reduces_input = True

    @property
    def pruning_layers(self) -> tuple[int, ...]:
        return (0,)

    def before_first_layer(self, state: ExitState, layout: TokenLayout, hidden: torch.Tensor):
        if not state.any_active:
            return None
        return self.reduce(state, layout, hidden, layout.visual & state.active[:, None])

    def reduce(self, state: ExitState, layout: TokenLayout, hidden: torch.Tensor, visual: torch.Tensor):
        """The decision (drop mask or `Rewrite`) for the `visual` (B, T) slots given the input states `hidden`."""
        raise NotImplementedError

    def after_layer(self, step: LayerStep, state: ExitState, layout: TokenLayout):
        return None
