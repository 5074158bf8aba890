"""Sliding-window attention (Mistral's decoder layers, unmodified) under the exit: windows are measured in original
token positions. Oracles: mode none == transformers' own MistralModel; an exit == the stock layers on the full
sequence with the window and the visual keys masked after the exit layer; cached decode == recompute."""

from types import SimpleNamespace

import pytest
import torch
from transformers import MistralConfig, MistralModel

from llava.compat import output_cache
from llava.model.visual_exit import ExitRequest, VisualExitDecoderMixin

from batching import attention_implementation
from test_stages import random_gone_from

WINDOW = 5


class ExitMistral(VisualExitDecoderMixin, MistralModel):
    """The exit decoder loop over Mistral's own layers: nothing else of Mistral changes."""


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=WINDOW, max_position_embeddings=128,
    )
    return ExitMistral(config).eval()


def batch(padding_side: str):
    """Two samples of 14 and 10 tokens, visual tokens at slots 2..7 and 1..4 of each, padded on one side."""
    generator = torch.Generator().manual_seed(1)
    lengths, spans = (14, 10), ((2, 8), (1, 5))
    embeds = torch.randn(2, 14, 32, generator=generator)
    mask = torch.zeros(2, 14, dtype=torch.long)
    visual = torch.zeros(2, 14, dtype=torch.bool)
    for b, (length, (start, end)) in enumerate(zip(lengths, spans)):
        offset = 14 - length if padding_side == "left" else 0
        mask[b, offset : offset + length] = 1
        visual[b, offset + start : offset + end] = True
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return embeds, mask, visual, positions


def windowed_oracle(model, embeds, mask, positions, gone_from):
    """Stock layers on the full sequence: query p sees key q iff q <= p, p - q < WINDOW (positions), q is real and
    q has not left (layer < gone_from[b, q])."""
    hidden, length = embeds, embeds.shape[1]
    cos_sin = model.rotary_emb(hidden, positions)
    causal = positions[:, :, None] >= positions[:, None, :]
    near = positions[:, :, None] - positions[:, None, :] < WINDOW
    itself = torch.eye(length, dtype=torch.bool)
    for index, layer in enumerate(model.layers):
        allowed = (causal & near & mask[:, None, :].bool() & (index < gone_from)[:, None, :]) | itself
        additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
        hidden = layer(hidden, attention_mask=additive, position_embeddings=cos_sin, position_ids=positions)
    return model.norm(hidden)


def test_none_equals_the_stock_mistral_model(model):
    embeds, mask, visual, positions = batch("right")  # right padding: slots == positions for the real tokens
    with torch.no_grad():
        ours = model(inputs_embeds=embeds, attention_mask=mask, visual_mask=visual, exit_config=ExitRequest("none").expand())
        stock = MistralModel.forward(model, inputs_embeds=embeds, attention_mask=mask)
    real = mask.bool()
    assert (ours.last_hidden_state[real] - stock.last_hidden_state[real]).abs().max() <= 1e-5


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("spec", ["fixed:1", "fixed:3", "prune:random:1:0.5,fixed:3"])
def test_exit_equals_the_windowed_oracle(model, attn, padding_side, spec):
    embeds, mask, visual, positions = batch(padding_side)
    config = ExitRequest("stages", stages=spec).expand()
    with attention_implementation(model, attn), torch.no_grad():
        out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, visual_mask=visual,
                    exit_config=config)
        gone_from = torch.full(mask.shape, model.config.num_hidden_layers)
        if spec.startswith("prune"):
            gone_from = random_gone_from(SimpleNamespace(visual_mask=visual, position_ids=positions), 1, 0.5, gone_from)
        exit_after = int(spec.rsplit(":", 1)[1])  # every spec ends in fixed:K
        gone_from = torch.where(visual, gone_from.clamp(max=exit_after), gone_from)
        oracle = windowed_oracle(model, embeds, mask, positions, gone_from)
    text = mask.bool() & ~visual
    assert (out.last_hidden_state[text] - oracle[text]).abs().max() <= 1e-5


def test_cached_decode_equals_recompute_past_the_window(model):
    """Three new tokens after a prefill whose visual tokens left after layer 2: each step with the cache equals a
    full recompute of prompt + new tokens under the same exit (the window slides over the original positions)."""
    embeds, mask, visual, positions = batch("left")
    new = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(2))
    config = ExitRequest("fixed", 2).expand()
    with torch.no_grad():
        out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, visual_mask=visual,
                    exit_config=config, use_cache=True)
        cache, step_mask = output_cache(out), mask
        for step in range(3):
            step_mask = torch.cat([step_mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            cached = model(inputs_embeds=new[:, step : step + 1], attention_mask=step_mask, cache=cache, use_cache=True)
            full_embeds = torch.cat([embeds, new[:, : step + 1]], dim=1)
            full_visual = torch.cat([visual, torch.zeros(2, step + 1, dtype=torch.bool)], dim=1)
            full_positions = (step_mask.cumsum(dim=1) - 1).clamp(min=0)
            recomputed = model(inputs_embeds=full_embeds, attention_mask=step_mask, position_ids=full_positions,
                               visual_mask=full_visual, exit_config=config)
            assert (cached.last_hidden_state[:, -1] - recomputed.last_hidden_state[:, -1]).abs().max() <= 1e-5
    assert int(positions.max()) + 3 > WINDOW  # the window really cut keys off
