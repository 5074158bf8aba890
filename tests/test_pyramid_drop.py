"""PyramidDrop (`pdrop:L1-L2-...:λ`) against its definition: at each boundary L_s, transformers' own eager attention
map of the next layer (index L_s), on the sequence with the earlier stages' drops masked, ranks the remaining visual
tokens by the last token's head-averaged row; ⌊n·λ^s⌋ of the n original ones stay. The outcome equals the masked-keys
oracle (docs/DESIGN.md §2), on our LLaVA class and on transformers' own families."""

import math

import pytest
import torch

from llava.model.visual_exit import ExitRequest

from batching import attention_implementation
from families import FAMILIES, Sample, batch, exit_model, masked_stock_forward, sample_inputs, stock_model, visual_mask
from test_fastv import assert_batch_equals_alone, run
from test_visual_exit import PROMPTS, batch_inputs, images_for, masked_reference_logits_by_token, text_positions


def pdrop(layers, ratio):
    return ExitRequest("stages", stages=f"pdrop:{'-'.join(map(str, layers))}:{ratio}:keep").expand()


def pdrop_gone_from(attention_at, visual, last, layers, ratio, num_layers):
    """Per token, the first layer that no longer sees it; `attention_at(layer_index, gone_from)` gives the stock
    eager (B, heads, T, T) map of that layer with the tokens of `gone_from` masked."""
    gone_from = torch.full(visual.shape, num_layers)
    original = visual.sum(dim=1).tolist()
    for stage, layer in enumerate(layers, start=1):
        if layer == num_layers:
            break
        probabilities = attention_at(layer, gone_from)
        for b in range(len(gone_from)):
            scores = probabilities[b, :, last[b]].mean(dim=0).tolist()
            remaining = [t for t in visual[b].nonzero().flatten().tolist() if gone_from[b, t] == num_layers]
            ranked = sorted(remaining, key=lambda t: -scores[t])
            for t in ranked[math.floor(original[b] * ratio**stage) :]:
                gone_from[b, t] = layer
    return gone_from


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layers, ratio", [((1, 2, 3), 0.5), ((2,), 0.3), ((1, 3), 0.7)])
def test_pdrop_equals_stock_attention_oracle(loaded, images, attn, layers, ratio):
    tokenizer, model, _, _ = loaded
    ids, mask = batch_inputs(tokenizer, PROMPTS, "left")
    pixels = images_for(images, PROMPTS)
    with attention_implementation(model, attn), torch.no_grad():
        mm = model.prepare_inputs_labels_for_multimodal(ids, mask, None, pixels)
        out = run(model, ids, mask, pixels, pdrop(layers, ratio))
    last = mm.attention_mask.long().cumsum(dim=1).argmax(dim=1).tolist()
    with torch.no_grad():
        gone_from = pdrop_gone_from(
            lambda layer, gone: masked_reference_logits_by_token(model, mm, gone, attention_layer=layer)[1],
            mm.visual_mask, last, layers, ratio, model.config.num_hidden_layers,
        )
        oracle, _ = masked_reference_logits_by_token(model, mm, gone_from)
    text = text_positions(mm)
    assert (out.logits[text] - oracle[text]).abs().max() <= 1e-5
    layers_total = model.config.num_hidden_layers
    expected_tokens = [mm.attention_mask.sum(dim=1) - ((gone_from <= i) & mm.visual_mask).sum(dim=1) for i in range(layers_total)]
    assert torch.equal(out.exit_stats.layer_tokens, torch.stack(expected_tokens, dim=1))


def test_pdrop_degenerate_ratios(loaded, images):
    """λ = 1 keeps everything (mode none); λ = 0 empties the image at the first boundary (fixed at L1)."""
    tokenizer, model, _, _ = loaded
    ids, mask = batch_inputs(tokenizer, PROMPTS, "left")
    pixels = images_for(images, PROMPTS)
    with torch.no_grad():
        text = text_positions(model.prepare_inputs_labels_for_multimodal(ids, mask, None, pixels))
    for ratio, reference in ((1, ExitRequest("none").expand()), (0, ExitRequest("fixed", 2).expand())):
        ours, expected = (run(model, ids, mask, pixels, c) for c in (pdrop((2, 3), ratio), reference))
        assert (ours.logits[text] - expected.logits[text]).abs().max() <= 1e-5
        assert ours.exit_stats.exit_layer.tolist() == expected.exit_stats.exit_layer.tolist()


def test_pdrop_batch_equals_alone(loaded, images):
    tokenizer, model, _, _ = loaded
    assert_batch_equals_alone(model, tokenizer, images, pdrop((1, 2), 0.5))


def test_pdrop_cached_decode_equals_recompute_with_the_prompts_drops(loaded, images):
    """Greedy decoding with the cache equals the stock layers run on prompt + generated tokens without a cache,
    the prompt's pruned tokens masked from their boundary on (new tokens decide nothing)."""
    tokenizer, model, _, _ = loaded
    layers, ratio = (1, 2), 0.5
    ids, mask = batch_inputs(tokenizer, PROMPTS[:1])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, images=images[:1], exit_config=pdrop(layers, ratio),
                             do_sample=False, max_new_tokens=5, min_new_tokens=5, pad_token_id=0)
        prompt = model.prepare_inputs_labels_for_multimodal(ids, mask, None, images[:1])
        last = [prompt.visual_mask.shape[1] - 1]
        prompt_gone = pdrop_gone_from(
            lambda layer, gone: masked_reference_logits_by_token(model, prompt, gone, attention_layer=layer)[1],
            prompt.visual_mask, last, layers, ratio, model.config.num_hidden_layers,
        )
        full_ids = torch.cat([ids, out[:, :-1]], dim=1)
        mm = model.prepare_inputs_labels_for_multimodal(full_ids, torch.ones_like(full_ids), None, images[:1])
        gone_from = torch.full(mm.visual_mask.shape, model.config.num_hidden_layers)
        gone_from[:, : prompt.visual_mask.shape[1]] = prompt_gone
        oracle, _ = masked_reference_logits_by_token(model, mm, gone_from)
    assert oracle[0, last[0] :].argmax(dim=-1).tolist() == out[0].tolist()


@pytest.mark.parametrize("name", [f for f in ("llava-hf", "qwen2-vl", "qwen3-vl", "llava-onevision-1.5", "internvl", "gemma3") if f in FAMILIES])
def test_pdrop_on_transformers_families(name):
    stock = stock_model(name)
    model = exit_model(stock, gate_hidden_size=None)
    sizes = {"llava-hf": [None, None], "gemma3": [None, None], "internvl": [4, 6]}.get(name, [(4, 4), (4, 6)])
    samples = [Sample(3, [sizes[0]], 4), Sample(2, [sizes[1]], 6), Sample(7, [], 3)]
    inputs = batch(name, stock, samples)
    layers, ratio = (1, 2), 0.5
    with torch.no_grad():
        ours = model(**inputs, exit_config=pdrop(layers, ratio))
    last = inputs["attention_mask"].cumsum(dim=1).argmax(dim=1).tolist()
    gone_from = pdrop_gone_from(
        lambda layer, gone: masked_stock_forward(stock, inputs, gone, output_attentions=True).attentions[layer],
        visual_mask(inputs), last, layers, ratio, 4,
    )
    oracle = masked_stock_forward(stock, inputs, gone_from)
    text = inputs["attention_mask"].bool() & ~visual_mask(inputs)
    assert (ours.logits - oracle.logits)[text].abs().max() <= 1e-5
    assert ((gone_from < 4) & visual_mask(inputs)).any()  # the test prunes something
    for b in range(len(samples)):
        with torch.no_grad():
            alone = model(**sample_inputs(name, stock, inputs, samples, b), exit_config=pdrop(layers, ratio))
        valid = inputs["attention_mask"][b].bool()
        assert (ours.logits[b, valid] - alone.logits[0]).abs().max() <= 1e-5


@pytest.mark.parametrize("spec, message", [
    ("pdrop:8-16:0.5:1", "positions '1': expected renumber or keep"), ("pdrop:8-16:0.5:keep:1", "expected pdrop"),
    ("pdrop:16-8:0.5", "must increase"), ("pdrop:8-16:1.5", "outside"),
    ("pdrop:x:0.5", "not an integer"),
])
def test_pdrop_spec_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        ExitRequest("stages", stages=spec).expand()


def test_pdrop_layer_beyond_the_model_is_refused(loaded, images):
    tokenizer, model, _, _ = loaded
    ids, mask = batch_inputs(tokenizer, PROMPTS[:1])
    with pytest.raises(ValueError, match="exceeds the model's 4 layers"):
        run(model, ids, mask, images[:1], pdrop((2, 8), 0.5))


def test_prune_layer_is_the_first_boundary(loaded, images):
    tokenizer, model, _, _ = loaded
    ids, mask = batch_inputs(tokenizer, PROMPTS[:1])
    assert run(model, ids, mask, images[:1], pdrop((2, 3), 0.5)).exit_stats.prune_layer == 2
    dart = run(model, ids, mask, images[:1], ExitRequest("stages", stages="dart:1:8").expand()).exit_stats
    assert dart.prune_layer == 1
