"""The one place that knows transformers' internals and which release is installed (5.17 up to the newest).

transformers 5.24 renamed `past_key_values` to `cache` in the attention, decoder-layer and model arguments, in
`generate` and in the output classes, keeping the old name as a deprecated alias (with a warning). Our code passes,
accepts and reads the KV cache only through these helpers, under the name the installed release uses, so neither
release warns about our own calls and neither silently loses the cache in `**kwargs`.
"""

from __future__ import annotations

import inspect

from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.utils.output_capturing import maybe_install_capturing_hooks

CACHE_NAME = "cache" if "cache" in inspect.signature(LlamaDecoderLayer.forward).parameters else "past_key_values"
_OTHER_NAME = "past_key_values" if CACHE_NAME == "cache" else "cache"


def cache_argument(cache) -> dict:
    """`{name: cache}` for calling a transformers layer, model or `generate`, or building an output class."""
    return {CACHE_NAME: cache}


def take_cache(kwargs: dict, cache=None):
    """The cache a forward was given, under either name: `cache` if set, else whichever of the two names is in
    `kwargs` (removed from it, so it is not passed on twice)."""
    for name in (CACHE_NAME, _OTHER_NAME):
        found = kwargs.pop(name, None)
        cache = cache if cache is not None else found
    return cache


def output_cache(output):
    """The cache an output object carries (reading the old name on the new release warns)."""
    return getattr(output, CACHE_NAME)


def install_output_capture_hooks(model) -> None:
    """Install the `output_hidden_states` capture hooks of `model` and of every sub-model inside it now.

    transformers installs them lazily, on a model's first call that asks for hidden states, and a model installing
    its hooks installs those of its sub-models again without looking whether they have theirs. LLaVA's decoder
    holds the CLIP tower, which asks for hidden states on every call: once the decoder is asked too, every CLIP layer
    would record twice and `hidden_states[-2]` would pick the wrong layer. Installed top-down once, before any call,
    each module gets one hook."""
    maybe_install_capturing_hooks(model)


def recurrent_cache_layers(config) -> list | None:
    """Cache layers for a decoder with linear-attention layers (Qwen3.5's Gated DeltaNet): transformers' own layer
    for each of those (conv and recurrent states), a plain one for every attention layer (never a sliding one: the
    exit keeps every key a window may still reach); None when it has no linear layers. transformers 5.25 gives each
    layer its own cache arguments, 5.17 one set for all."""
    from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, DynamicLayer, get_layer_types_and_kwargs

    text_config = config.get_text_config(decoder=True)
    if "linear_attention" not in (getattr(text_config, "layer_types", None) or ()):  # asked at every prefill: no more
        return None
    layer_types, arguments = get_layer_types_and_kwargs(text_config)
    per_layer = arguments if isinstance(arguments, list) else [arguments] * len(layer_types)
    linear = DYNAMIC_LAYER_TYPE_MAPPING["linear_attention"]
    return [
        linear(**{k: v for k, v in kwargs.items() if k == "number_of_states"}) if kind == "linear_attention" else DynamicLayer()
        for kind, kwargs in zip(layer_types, per_layer)
    ]
