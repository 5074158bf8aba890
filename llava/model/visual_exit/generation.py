"""What the exit classes add to transformers' `generate`: the caches it builds (a dynamic `VisualExitCache`, or a
`StaticExitCache` for `cache_implementation="static"`, which compiled decoding needs) and outputs that carry the
prefill's exit statistics, one row per returned sequence."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

from llava.compat import cache_argument, recurrent_cache_layers, take_cache
from llava.model.visual_exit.cache import StaticExitCache, VisualExitCache
from llava.model.visual_exit.decoder import ExitStats, exit_decoder_of

CACHE_IMPLEMENTATIONS = ("dynamic", "static")


def generation_cache(model, kwargs: dict) -> dict:
    """The cache argument the exit class hands the stock generate, taking generate's own cache arguments out of
    `kwargs`: the cache given, a new `VisualExitCache`, or none for `cache_implementation="static"` (generate then
    builds a `StaticExitCache` through `ExitCacheGeneration`). Other implementations (offloaded, quantized, sliding)
    hold the same tokens in every layer: refused before any work."""
    config = kwargs.get("generation_config") or model.generation_config
    chosen = kwargs.get("cache_implementation") or getattr(config, "cache_implementation", None)
    if chosen not in (None, *CACHE_IMPLEMENTATIONS):
        raise ValueError(
            f"cache_implementation={chosen!r}: the exit's layers cache different tokens, which only its own caches "
            "hold; use 'static' (compiled decoding) or 'dynamic' (for a checkpoint whose generation_config names "
            "another, pass generation_config with cache_implementation=None)"
        )
    if chosen == "static":
        return {}
    kwargs.pop("cache_implementation", None)  # "dynamic": ours
    cache = take_cache(kwargs)
    return cache_argument(VisualExitCache() if cache is None else cache)  # an empty cache is falsy


class ExitCacheGeneration:
    """In front of an exit class's generation mixin: generate's static cache is a `StaticExitCache`, and the 2-D
    padding mask goes to the model as it is (the exit builds each layer's mask itself), not as the 4-D mask generate
    builds for a stock static cache — and, once the prefill is cached, not at all: a static decode step reads
    positions from the cache, so every step has the same inputs' shapes."""

    def _prepare_static_cache(self, cache_implementation: str, batch_size: int, max_cache_len: int, *args, **kwargs):
        decoder = exit_decoder_of(self)
        if recurrent_cache_layers(decoder.config) is not None:
            raise ValueError("cache_implementation='static': this decoder's linear-attention layers decode with the "
                             "dynamic cache only; generate without cache_implementation")
        return StaticExitCache(decoder.config, max_cache_len)

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, *args, **kwargs):
        cache = take_cache(dict(kwargs))
        return None if isinstance(cache, StaticExitCache) and cache.is_prefilled else attention_mask


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
