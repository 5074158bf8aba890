"""Shared test helpers: a padded batch of LLaVA prompts; a temporary attention implementation."""

from contextlib import contextmanager

import torch

from llava.mm_utils import tokenizer_image_token


def padded_batch(tokenizer, prompts: list[str], padding_side: str = "left"):
    """(ids, mask) for the prompts, `<image>` tags as IMAGE_TOKEN_INDEX, padded on the given side."""
    rows = [tokenizer_image_token(prompt, tokenizer) for prompt in prompts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        ids[b, span], mask[b, span] = torch.tensor(row), 1
    return ids, mask


@contextmanager
def attention_implementation(model, name: str):
    """Run the block with `model` on attention implementation `name`, then restore the one it had."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
