"""Greedy decoding: cached == full recompute, batched == alone, for every attention implementation."""

import pytest
import torch

from llava.compat import cache_argument
from llava.mm_utils import tokenizer_image_token
from llava.model.visual_exit import VisualExitCache

from batching import padded_batch

NEW_TOKENS = 6
PROMPTS = [
    ("USER: <image>\nWhat colour is it? ASSISTANT:", 1),
    ("USER: compare <image> with <image> in detail ASSISTANT:", 2),
    ("USER: a question without any image at all, longer than the others ASSISTANT:", 0),
]


def greedy_without_cache(model, ids, images, steps):
    """Oracle: recompute the whole sequence for every new token, never touching a cache."""
    generated = []
    for _ in range(steps):
        full = torch.tensor([ids + generated])
        logits = model(input_ids=full, images=images, use_cache=False).logits
        generated.append(int(logits[0, -1].argmax()))
    return generated


def generate(model, ids, mask, images):
    return model.generate(
        ids,
        attention_mask=mask,
        images=images,
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        pad_token_id=0,
    )


def split_images(images):
    counts = [count for _, count in PROMPTS]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [images[start : start + count] if count else None for start, count in zip(starts, counts)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_generation_equals_full_recompute(loaded, images, attn):
    tokenizer, model, _, _ = loaded
    model.set_attn_implementation(attn)
    try:
        for (prompt, _), sample_images in zip(PROMPTS, split_images(images)):
            ids = tokenizer_image_token(prompt, tokenizer)
            with torch.no_grad():
                cached = generate(model, torch.tensor([ids]), None, sample_images)[0].tolist()
                assert cached == greedy_without_cache(model, ids, sample_images, NEW_TOKENS)
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_equals_each_sample_alone(loaded, images, attn, padding_side):
    tokenizer, model, _, _ = loaded
    model.set_attn_implementation(attn)
    rows = [tokenizer_image_token(prompt, tokenizer) for prompt, _ in PROMPTS]
    ids, mask = padded_batch(tokenizer, [prompt for prompt, _ in PROMPTS], padding_side)
    try:
        with torch.no_grad():
            batched = generate(model, ids, mask, images)
            batch_logits = model(input_ids=ids, attention_mask=mask, images=images).logits
            for b, (row, sample_images) in enumerate(zip(rows, split_images(images))):
                alone = generate(model, torch.tensor([row]), None, sample_images)
                assert batched[b].tolist() == alone[0].tolist()
                # The step-0 logits agree to fp32 tolerance, not just the argmax.
                alone_logits = model(input_ids=torch.tensor([row]), images=sample_images).logits
                n = alone_logits.shape[1]
                assert (batch_logits[b, :n] - alone_logits[0]).abs().max() <= 1e-5
    finally:
        model.set_attn_implementation("sdpa")


def test_generations_differ_between_samples(loaded, images):
    """Guards the tests above against a degenerate model that emits the same tokens whatever the input."""
    tokenizer, model, _, _ = loaded
    outputs = set()
    for (prompt, _), sample_images in zip(PROMPTS, split_images(images)):
        with torch.no_grad():
            ids = torch.tensor([tokenizer_image_token(prompt, tokenizer)])
            outputs.add(tuple(generate(model, ids, None, sample_images)[0].tolist()))
    assert len(outputs) == len(PROMPTS)


def test_a_callers_empty_cache_is_the_one_filled(loaded, images):
    tokenizer, model, _, _ = loaded
    ids = torch.tensor([tokenizer_image_token(PROMPTS[0][0], tokenizer)])
    cache = VisualExitCache(config=model.config)
    with torch.no_grad():
        out = model.generate(ids, images=images[:1], max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True, **cache_argument(cache))
    # the exit's per-layer key validity is written by its decoder only: the prefill went through this cache
    assert cache.get_seq_length() > ids.shape[1] and len(cache.valid_keys) > 0 and out.exit_stats is not None
