"""Our own calls through transformers' cache API, on whichever release is installed (5.17 ... newest): the cache
reaches every layer under the installed release's name, and no deprecation warning is printed for them."""

import logging
import warnings

import torch
from transformers.utils import logging as hf_logging

from llava.compat import CACHE_NAME, output_cache, take_cache
from llava.mm_utils import tokenizer_image_token
from llava.model.visual_exit import ExitRequest, VisualExitCache

PROMPT = "USER: <image>\nWhat colour is it? ASSISTANT:"


def test_take_cache_accepts_either_name():
    cache = object()
    for name in ("cache", "past_key_values"):
        kwargs = {name: cache, "other": 1}
        assert take_cache(kwargs) is cache and kwargs == {"other": 1}
    assert take_cache({"past_key_values": None}, cache) is cache


def test_forward_and_generate_cache_every_layer_without_deprecation_warnings(loaded, images, caplog):
    tokenizer, model, _, _ = loaded
    ids = torch.tensor([tokenizer_image_token(PROMPT, tokenizer)])
    hf_logging.warning_once.cache_clear()  # a warning shown earlier in the session would otherwise stay silent
    hf_logging.enable_propagation()
    caplog.set_level(logging.WARNING)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            out = model(input_ids=ids, images=images[:1], use_cache=True, exit_config=ExitRequest("fixed", 2).expand())
            given = VisualExitCache(config=model.config)
            model(input_ids=ids, images=images[:1], exit_config=ExitRequest("fixed", 2).expand(), **{CACHE_NAME: given})
            model.generate(ids, images=images[:1], max_new_tokens=3, num_beams=2, pad_token_id=0)
    finally:
        hf_logging.disable_propagation()
    assert "deprecated" not in caplog.text
    for cache in (output_cache(out), given):
        # Layers 0..1 keep the visual tokens, 2..3 only the text: each layer really cached its own keys.
        lengths = [layer.get_seq_length() for layer in cache.layers]
        assert len(lengths) == model.config.num_hidden_layers and lengths[0] == lengths[1] > lengths[2] == lengths[3] > 0
