"""`generate` outputs that carry the prefill's exit statistics, one row per returned sequence."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

from llava.model.visual_exit.decoder import ExitStats


@dataclass
class ExitGenerateOutput(GenerateDecoderOnlyOutput):
    """Greedy or sampled output with the prefill's exit statistics, one row per returned sequence."""

    exit_stats: ExitStats | None = None


@dataclass
class ExitGenerateBeamOutput(GenerateBeamDecoderOnlyOutput):
    """Beam-search output with the prefill's exit statistics, one row per returned sequence."""

    exit_stats: ExitStats | None = None


def with_exit_stats(output, stats: ExitStats, prompts: int):
    """`generate`'s output (a tensor passes through) with `stats` of its prefill, one row per returned sequence.

    generate() prefills each prompt once per beam (or per returned sample); copies of one prompt decide alike, so
    each returned sequence takes the first prefill row of its prompt."""
    if isinstance(output, torch.Tensor):
        return output
    sequences = len(output.sequences)
    per_prompt_prefill, per_prompt_returned = len(stats.exit_layer) // prompts, sequences // prompts
    rows = torch.arange(sequences) // per_prompt_returned * per_prompt_prefill
    output_class = ExitGenerateBeamOutput if isinstance(output, GenerateBeamDecoderOnlyOutput) else ExitGenerateOutput
    return output_class(**output, exit_stats=stats.select_rows(rows))
