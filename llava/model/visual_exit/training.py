"""Gate training (docs/DESIGN.md §3): one shared pass to layer k, then two continuations, full and with the visual
tokens gone after k. A sample's label says whether leaving after k keeps its answer: teacher-forced argmax
agreement above `agree_threshold` and answer loss ratio (exit / full) below `ratio_threshold`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from llava.model.visual_exit.gate import gate_features

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ExitLabelRule:
    agree_threshold: float = 0.99
    ratio_threshold: float = 1.03


@dataclass
class ExitLabels:
    """Per sample: `label` 1 = exiting is safe; `usable` = has visual tokens and answer tokens to judge by."""

    label: torch.Tensor
    agree: torch.Tensor
    ratio: torch.Tensor
    usable: torch.Tensor


@dataclass
class GateTrainingOutput(ModelOutput):
    """`full_logits` / `exit_logits`: (N, V) logits of both continuations at the N answer positions
    (`answer_positions` = (sample, position) of each, predicting the token after it); `gate_features` the gate's
    input (B, 2H), detached: read off each sample's prompt as inference reads it (`prompt_ends`)."""

    loss: torch.Tensor | None = None
    gate_logits: torch.Tensor | None = None
    gate_features: torch.Tensor | None = None
    exit_labels: ExitLabels | None = None
    layer: int | None = None
    full_logits: torch.Tensor | None = None
    exit_logits: torch.Tensor | None = None
    answer_positions: tuple[torch.Tensor, torch.Tensor] | None = None


def exit_labels(
    full_logits: torch.Tensor,
    exit_logits: torch.Tensor,
    targets: torch.Tensor,
    sample: torch.Tensor,
    batch: int,
    rule: ExitLabelRule,
) -> ExitLabels:
    """Labels from the answer-token logits of both continuations ((N, V), N answer tokens of sample `sample`)."""
    count = torch.bincount(sample, minlength=batch).float()
    agree_tokens = (full_logits.argmax(dim=-1) == exit_logits.argmax(dim=-1)).float()
    loss_full = F.cross_entropy(full_logits.float(), targets, reduction="none")
    loss_exit = F.cross_entropy(exit_logits.float(), targets, reduction="none")
    per_sample = lambda values: torch.zeros(batch, device=values.device).index_add_(0, sample, values)  # noqa: E731
    agree = per_sample(agree_tokens) / count.clamp(min=1)
    ratio = per_sample(loss_exit) / per_sample(loss_full).clamp(min=torch.finfo(torch.float32).tiny)
    label = (agree > rule.agree_threshold) & (ratio < rule.ratio_threshold)
    return ExitLabels(label=label.long(), agree=agree, ratio=ratio, usable=count > 0)


def answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sample, position, target) of every answer token: position t predicts token t + 1, so the positions are
    those whose next label is supervised."""
    answer = torch.zeros_like(labels, dtype=torch.bool)
    answer[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    sample, position = answer.nonzero(as_tuple=True)
    return sample, position, labels[sample, position + 1]


def prompt_ends(sample: torch.Tensor, position: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(B,) per sample, the slot after its prompt: after the token that predicts its first answer token, so the
    gates read what inference reads on that prompt, never the answer. With several turns that is the first turn's
    prompt: the one exit must keep every answer. Without answer tokens: the whole row."""
    batch, length = shape
    ends = torch.full((batch,), length, dtype=torch.long, device=position.device)
    return ends.scatter_reduce(0, sample, position + 1, reduce="amin")


def gate_training_pass(
    decoder,
    lm_head: torch.nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None,
    visual_mask: torch.Tensor,
    labels: torch.Tensor,
    layer: int,
    rule: ExitLabelRule,
    additions=None,
    blocks=None,
    reduction=None,
) -> GateTrainingOutput:
    """Loss of gate `layer` (0 .. L-2) on this batch; the decoder and head stay frozen (run without grad).
    `additions` (DeepStack) and bidirectional `blocks` (Gemma 3's images) as the decoder takes them at inference;
    `reduction`, an ExitConfig of reductions before layer 0 (DivPrune, downsampling): the gates learn on what it
    keeps, as they decide after it at inference."""
    num_layers = decoder.config.num_hidden_layers
    if not 0 <= layer < num_layers - 1:
        raise ValueError(f"gate layer {layer} outside 0..{num_layers - 2}: an exit after the last layer changes nothing")
    with torch.no_grad():
        sample, position, targets = answer_positions(labels)
        hidden, layout = decoder.start_prefill(
            inputs_embeds, attention_mask, position_ids, visual_mask, with_gate_features=True,
            prompt_end=prompt_ends(sample, position, labels.shape), additions=additions, blocks=blocks,
        )
        if reduction is not None:
            hidden, layout, _ = decoder.start_exit(hidden, layout, reduction)
        hidden, layout = decoder.run_layers(hidden, layout, range(layer + 1))
        features = gate_features(hidden, layout.feature_weights)
        rest = range(layer + 1, num_layers)
        full = decoder.finish_prefill(*decoder.run_layers(hidden, layout, rest))
        exit_hidden, exit_layout = layout.drop(hidden, layout.visual)
        exited = decoder.finish_prefill(*decoder.run_layers(exit_hidden, exit_layout, rest))
        # Judge both continuations on the answer tokens only.
        full_logits, exit_logits = lm_head(full[sample, position]), lm_head(exited[sample, position])
        judged = exit_labels(full_logits, exit_logits, targets, sample, len(labels), rule)
        judged.usable &= layout.visual.any(dim=1)
    gate_logits = decoder.visual_gates_router[layer](features)
    if judged.usable.any():
        loss = F.cross_entropy(gate_logits[judged.usable], judged.label[judged.usable])
    else:  # keep the gate in the graph so data-parallel ranks stay in step
        loss = gate_logits.sum() * 0.0
    return GateTrainingOutput(
        loss=loss,
        gate_logits=gate_logits,
        gate_features=features,
        exit_labels=judged,
        layer=layer,
        full_logits=full_logits,
        exit_logits=exit_logits,
        answer_positions=(sample, position),
    )
