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
