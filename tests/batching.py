"""Shared test helpers: a padded batch of LLaVA prompts; a temporary attention implementation; gates set by hand."""

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


def set_sign_gate(gate, direction):
    """Make logit1 - logit0 = direction . features exactly: GELU(a) - GELU(-a) = a."""
    with torch.no_grad():
        gate.w1.weight.zero_()
        gate.w2.weight.zero_()
        gate.w1.weight[0] = direction
        gate.w1.weight[1] = -direction
        gate.w2.weight[1, 0], gate.w2.weight[1, 1] = 1.0, -1.0


def set_sample_dependent_gates(model, seed=3):
    """Sign gates on random directions: each sample's features decide, so samples exit at different layers."""
    generator = torch.Generator().manual_seed(seed)
    for gate in model.get_model().visual_gates_router:
        set_sign_gate(gate, torch.randn(2 * model.config.hidden_size, generator=generator) * 3)
