"""`shortv:L1-L2-...` (ShortV, Yuan et al., ICCV 2025): in the listed layers (0-based, as its code's
REPLACED_LAYERS) the visual tokens skip the layer's update — their hidden states pass through unchanged — while
they stay in the sequence and the cache as keys and values, so the text still attends to them. Nothing leaves.
LLaVA-1.5-7B's published list holds 19 of 32 layers, the lowest Layer Contribution first; `python -m
llava.analysis.shortv` computes the list for a checkpoint (Layer Contribution on a calibration set).

ShortV's layers compute queries, attention rows, the output projection and the MLP for the text only, and keys and
values for every token from the unchanged states. Running the layer on every token and giving the visual slots back
their input states is the same outcome (each query row and each MLP row is its own); the statistics count the
skipped work (`ExitStats.layer_frozen`), so the FLOPs are ShortV's, the wall-clock time is not."""

from __future__ import annotations

from dataclasses import dataclass

from llava.model.visual_exit.stages.base import ExitState, LayerStep, Rewrite, Stage, spec_number
from llava.model.visual_exit.tokens import TokenLayout


@dataclass(frozen=True)
class ShortV(Stage):
    layers: tuple[int, ...]
    usage = "shortv:L1-L2-..."

    @classmethod
    def parse(cls, args: list[str]) -> ShortV:
        layers = tuple(spec_number(text, int, 0) for text in args[0].split("-"))
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers {args[0]} name a layer twice")
        return cls(layers)  # in the calibration's order, as its code lists them

    def check(self, num_layers: int, has_gates: bool) -> None:
        if max(self.layers) >= num_layers:
            raise ValueError(f"shortv layer {max(self.layers)} is not one of the model's layers 0..{num_layers - 1}")

    def after_layer(self, step: LayerStep, state: ExitState, layout: TokenLayout):
        if step.index not in self.layers or not state.any_active:
            return None
        visual = layout.visual & state.active[:, None]
        return Rewrite(None, visual, step.input, skipped=True)
