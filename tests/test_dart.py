"""DART (`dart:K:M`, llava/model/visual_exit/stages/dart.py) against independent oracles (docs/DESIGN.md §2), on our
LLaVA class and on transformers' own llava-hf and Qwen2-VL (M-RoPE) classes:
- *definition*: the kept tokens chosen in plain Python from the stock layers' own signals on the full sequence
  (layer K's cached keys after RoPE, its output through the final norm; pivots visited in Python's set order of
  the sample's own indices), and the logits of the stock layers with the other visual keys masked from layer K on;
- M >= a sample's visual-token count keeps them all (mode none); batch (left padded) == each sample alone;
  cached greedy decoding == the masked oracle recomputed on prompt + answer without a cache; the FLOPs of what
  was kept; malformed specs.
"""

import pytest
import torch
from transformers import DynamicCache, LlamaModel

from llava.compat import cache_argument
from llava.model.visual_exit import ExitConfig, ExitRequest

from families import M_ROPE, TEXT, TYPE_KEYS, Sample, batch, exit_model, masked_stock_forward, sample_inputs, stock_model, visual_mask
from test_fastv import assert_batch_equals_alone, run
from test_visual_exit import PROMPTS, batch_inputs, images_for, masked_reference_logits_by_token, text_positions

TOLERANCE = 1e-5


def dart(layer: int, budget: int, before: str = "") -> ExitConfig:
    return ExitRequest("stages", stages=f"{before}dart:{layer}:{budget}").expand()


def stock_signals(decoder, forward, k):
    """Layer k's (1-based) keys after RoPE as the stock layer caches them (B, kv heads, T, D), and its output
    through the decoder's final norm (B, T, H), from the stock computation `forward(cache)` of the full sequence."""
    outputs = []
    handle = decoder.layers[k - 1].register_forward_hook(lambda module, args, output: outputs.append(output))
    cache = DynamicCache()
    try:
        with torch.no_grad():
            forward(cache)
            states = decoder.norm(outputs[0])
    finally:
        handle.remove()
    return cache.layers[k - 1].keys, states


def dart_gone_from(keys, states, visual, valid, k, budget, layers):
    """Per token, the first layer that no longer sees it under `dart:k:budget`, from DART's definition, one sample
    at a time on its real tokens."""
    gone_from = torch.full(visual.shape, layers)
    for b in range(len(visual)):
        real = valid[b].nonzero().flatten().tolist()
        own = {slot: index for index, slot in enumerate(real)}  # the sample's own (unpadded) token indices
        image = [t for t in real if visual[b, t]]
        if len(image) <= budget:
            continue
        text = [t for t in real if t > image[-1] and not visual[b, t]]
        norms = keys[b].transpose(0, 1).reshape(keys.shape[2], -1).norm(p=1, dim=-1).tolist()
        image_pivots = sorted(image, key=lambda t: -norms[t])[:4]
        text_pivots = sorted(text, key=lambda t: -norms[t])[:4]
        kept, candidates = set(image_pivots), [t for t in image if t not in image_pivots]
        for pivot in set([own[t] for t in image_pivots + text_pivots]):  # noqa: C403 (DART's own construction)
            slot = real[pivot]
            similarity = torch.cosine_similarity(states[b, slot][None], states[b, candidates], dim=-1).tolist()
            taken = [t for _, t in sorted(zip(similarity, candidates))[: budget // 8]]
            kept.update(taken)
            candidates = [t for t in candidates if t not in taken]
        for t in image:
            if t not in kept:
                gone_from[b, t] = k
    return gone_from


def scale_final_norm(decoder):
    """A random final-norm scale: at init it is 1, where cosine similarity cannot tell normed states from raw ones."""
    with torch.no_grad():
        scale = torch.rand(decoder.norm.weight.shape, generator=torch.Generator().manual_seed(0))
        decoder.norm.weight.copy_(scale + 0.5)


# --- our LLaVA class ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llava(loaded):
    """The shared tiny LLaVA with a random final-norm scale, restored afterwards."""
    norm = loaded[1].get_model().norm
    saved = norm.weight.detach().clone()
    scale_final_norm(loaded[1].get_model())
    yield loaded
    with torch.no_grad():
        norm.weight.copy_(saved)


def llava_gone_from(model, mm, k, budget):
    base = model.get_model()
    keys, states = stock_signals(base, lambda cache: LlamaModel.forward(
        base, inputs_embeds=mm.inputs_embeds, attention_mask=mm.attention_mask, position_ids=mm.position_ids,
        use_cache=True, **cache_argument(cache),
    ), k)
    valid, layers = mm.attention_mask.bool(), model.config.num_hidden_layers
    return dart_gone_from(keys, states, mm.visual_mask, valid, k, budget, layers)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["keys-from-cache", "keys-projected"])
def test_dart_equals_its_definition_and_the_masked_oracle(llava, images, padding_side, use_cache):
    """PROMPTS hold 16, 0, 32 (two images, text between) and 16 visual tokens, the last with one text token after."""
    tokenizer, model, _, _ = llava
    ids, mask = batch_inputs(tokenizer, PROMPTS, padding_side)
    pixels = images_for(images, PROMPTS)
    with torch.no_grad():
        mm = model.prepare_inputs_labels_for_multimodal(ids, mask, None, pixels)
    text = text_positions(mm)
    for k, budget in [(2, 8), (1, 16), (3, 3)]:
        out = run(model, ids, mask, pixels, dart(k, budget), use_cache)
        gone_from = llava_gone_from(model, mm, k, budget)
        with torch.no_grad():
            oracle, _ = masked_reference_logits_by_token(model, mm, gone_from)
        assert (out.logits[text] - oracle[text]).abs().max() <= TOLERANCE, (k, budget)
        assert out.exit_stats.pruned_visual_tokens.tolist() == (gone_from == k).sum(dim=1).tolist()
        assert out.exit_stats.exit_layer.tolist() == [4, 0, 4, 4]  # the pivots stay: no sample exits


def test_dart_budget_covering_every_visual_token_is_none(llava, images):
    tokenizer, model, _, _ = llava
    ids, mask = batch_inputs(tokenizer, PROMPTS, "left")
    pixels = images_for(images, PROMPTS)
    none = run(model, ids, mask, pixels, ExitRequest("none").expand())
    with torch.no_grad():
        text = text_positions(model.prepare_inputs_labels_for_multimodal(ids, mask, None, pixels))
    for budget in (32, 1000):
        out = run(model, ids, mask, pixels, dart(2, budget))
        assert (out.logits[text] - none.logits[text]).abs().max() <= TOLERANCE
        assert out.exit_stats.pruned_visual_tokens.tolist() == [0, 0, 0, 0]
        assert torch.equal(out.exit_stats.prefill_flops, none.exit_stats.prefill_flops)
    # One below the 32 of the third sample: 4 pivots + 8 x 3 of its 32 stay, the others' 16 all stay.
    assert run(model, ids, mask, pixels, dart(2, 31)).exit_stats.pruned_visual_tokens.tolist() == [0, 0, 4, 0]


def test_dart_counts_and_flops_follow_the_kept_tokens(llava, images):
    """Kept: min(n, 4 + ⌊M/8⌋ · (4 image + t text pivots)); t = min(4, text tokens after the last visual one)."""
    tokenizer, model, _, _ = llava
    ids, mask = batch_inputs(tokenizer, PROMPTS, "right")
    pixels = images_for(images, PROMPTS)
    k, budget, layers = 2, 8, model.config.num_hidden_layers
    stats = run(model, ids, mask, pixels, dart(k, budget)).exit_stats
    with torch.no_grad():
        mm = model.prepare_inputs_labels_for_multimodal(ids, mask, None, pixels)
    expected = []
    for b in range(len(PROMPTS)):
        visual = mm.visual_mask[b].nonzero().flatten()
        n = len(visual)
        after = int(mm.attention_mask[b, int(visual.max()) + 1 :].sum()) if n else 0
        kept = n if n <= budget else min(n, 4 + budget // 8 * (4 + min(4, after)))
        expected.append(n - kept)
    assert expected == [4, 0, 20, 7]  # 16 - (4 + 8), none, 32 - (4 + 8), 16 - (4 + 5): one text pivot
    assert stats.pruned_visual_tokens.tolist() == expected
    n, pruned = stats.num_tokens, stats.pruned_visual_tokens
    assert stats.layer_tokens.tolist() == [[int(t)] * k + [int(t - p)] * (layers - k) for t, p in zip(n, pruned)]
    geometry = stats.geometry
    expected_flops = k * geometry.layer_flops(n) + (layers - k) * geometry.layer_flops(n - pruned)
    assert torch.equal(stats.prefill_flops, expected_flops)


def test_dart_batch_equals_alone(llava, images):
    tokenizer, model, _, _ = llava
    assert_batch_equals_alone(model, tokenizer, images, dart(2, 8))


def test_dart_cached_decode_equals_recompute(llava, images):
    """The greedy tokens of cached decoding after DART equal the argmax of the masked oracle, the prompt's choice
    kept, run on prompt + generated tokens without any cache."""
    tokenizer, model, _, _ = llava
    k, budget, steps = 2, 8, 5
    prompt = PROMPTS[2:3]
    ids, mask = batch_inputs(tokenizer, prompt)
    pixels = images_for(images, prompt)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, images=pixels, exit_config=dart(k, budget), do_sample=False,
            max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0,
        )
        full_ids = torch.cat([ids, out[:, :-1]], dim=1)
        mm = model.prepare_inputs_labels_for_multimodal(full_ids, torch.ones_like(full_ids), None, pixels)
        prompt_mm = model.prepare_inputs_labels_for_multimodal(ids, mask, None, pixels)
        gone_from = torch.full(mm.visual_mask.shape, model.config.num_hidden_layers)
        gone_from[:, : prompt_mm.visual_mask.shape[1]] = llava_gone_from(model, prompt_mm, k, budget)
        assert (gone_from == k).any()
        oracle, _ = masked_reference_logits_by_token(model, mm, gone_from)
    start = prompt_mm.visual_mask.shape[1] - 1
    assert oracle[0, start:].argmax(dim=-1).tolist() == out[0].tolist()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("dart:2", "expected dart:K:M"),
        ("dart:2:8:1", "expected dart:K:M"),
        ("dart:0:8", "outside"),
        ("dart:2:-1", "outside"),
        ("dart:two:8", "not an integer"),
        ("dart:2:8.5", "not an integer"),
    ],
)
def test_malformed_dart_spec_is_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        ExitRequest("stages", stages=spec).expand()


def test_dart_layer_beyond_the_model_is_refused(llava, images):
    tokenizer, model, _, _ = llava
    ids, mask = batch_inputs(tokenizer, PROMPTS[:1])
    with pytest.raises(ValueError, match="dart layer 5 exceeds the model's 4 layers"):
        run(model, ids, mask, images[:1], dart(5, 8))


# --- transformers' own classes -------------------------------------------------------------------------------------

LAYERS = TEXT["num_hidden_layers"]
# Long enough prompts that own indices pass 32 (where Python's 8-pivot set stops iterating in sorted order), and
# per family: a sample whose candidates run out (Qwen: 10 visual tokens under dart:2:8 keep all), one with fewer
# than 4 text tokens after its images, two images (Qwen: text between them), and one without any image.
SAMPLES = {
    "llava-hf": [Sample(12, [None] * 3, 2), Sample(14, [None] * 5, 6), Sample(30, [], 3)],
    "qwen2-vl": [Sample(12, [(4, 10)], 5), Sample(10, [(4, 4), (8, 8)], 6), Sample(14, [(8, 8)], 1), Sample(20, [], 3)],
}
SAMPLES["qwen3-vl"] = SAMPLES["qwen2-vl"]  # its DeepStack adds onto the visual tokens after layers 1 and 2
SAMPLES["gemma3"] = SAMPLES["llava-hf"]  # its image blocks attend both ways, its windows cut the long prompts


@pytest.fixture(scope="module", params=list(SAMPLES))
def family(request):
    stock = stock_model(request.param)
    scale_final_norm(stock.model.language_model)
    return request.param, stock, exit_model(stock, gate_hidden_size=None)


def family_batch(name, stock, samples):
    """A left-padded batch; 1-D families get each token's count of real tokens before it as its position, as
    generate numbers them (DART's key norms, after RoPE, depend on the absolute position; M-RoPE counts itself)."""
    inputs = batch(name, stock, samples)
    if name not in M_ROPE:
        inputs["position_ids"] = (inputs["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)
    return inputs


def family_gone_from(stock, inputs, k, budget):
    keys, states = stock_signals(
        stock.model.language_model, lambda cache: stock(**inputs, use_cache=True, **cache_argument(cache)), k
    )
    return dart_gone_from(keys, states, visual_mask(inputs), inputs["attention_mask"].bool(), k, budget, LAYERS)


def forward(model, inputs, config, **kwargs):
    with torch.no_grad():
        return model(**inputs, exit_config=config, **kwargs)


@pytest.mark.parametrize("use_cache", [True, False], ids=["keys-from-cache", "keys-projected"])
def test_family_dart_equals_its_definition_and_the_masked_stock(family, use_cache):
    name, stock, model = family
    inputs = family_batch(name, stock, SAMPLES[name])
    gone_from = family_gone_from(stock, inputs, 2, 8)
    oracle = masked_stock_forward(stock, inputs, gone_from)
    model.set_attn_implementation("sdpa")
    try:
        ours = forward(model, inputs, dart(2, 8), use_cache=use_cache)
    finally:
        model.set_attn_implementation("eager")
    text = inputs["attention_mask"].bool() & ~visual_mask(inputs)
    assert (ours.logits - oracle.logits)[text].abs().max() <= TOLERANCE
    pruned = (gone_from == 2).sum(dim=1).tolist()
    assert ours.exit_stats.pruned_visual_tokens.tolist() == pruned
    # llava-hf: 12 - (4 + 6), 20 - 12, none; Qwen: 10 all kept (candidates ran out), 20 - 12, 16 - (4 + 4 + 2), none;
    # Gemma 3 (the same image tokens): its first sample's pivots take one more candidate each than they find.
    expected = {"llava-hf": [2, 8, 0], "gemma3": [1, 8, 0], "qwen2-vl": [0, 8, 6, 0], "qwen3-vl": [0, 8, 6, 0]}
    assert pruned == expected[name]


@pytest.mark.parametrize("before", ["", "prune:random:1:0.25,"], ids=["dart", "after-random-pruning"])
def test_family_dart_batch_equals_alone(family, before):
    name, stock, model = family
    samples = SAMPLES[name]
    inputs = family_batch(name, stock, samples)
    batched = forward(model, inputs, dart(2, 8, before))
    valid = inputs["attention_mask"].bool()
    for b in range(len(samples)):
        alone = forward(model, sample_inputs(name, stock, inputs, samples, b), dart(2, 8, before))
        assert (batched.logits[b, valid[b]] - alone.logits[0]).abs().max() <= TOLERANCE
        assert batched.exit_stats.pruned_visual_tokens[b] == alone.exit_stats.pruned_visual_tokens[0]


def test_family_dart_cached_greedy_decoding_equals_recompute(family):
    """Batched cached generation; per sample alone, the masked stock model (the prompt's choice kept) on prompt +
    generated tokens without a cache gives the same greedy tokens."""
    name, stock, model = family
    samples, steps = SAMPLES[name], 4
    inputs = batch(name, stock, samples)  # generate numbers the positions from the mask
    with torch.no_grad():
        out = model.generate(
            **inputs, exit_config=dart(2, 8), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
            pad_token_id=TEXT["pad_token_id"],
        )
    for b in range(len(samples)):
        alone = sample_inputs(name, stock, inputs, samples, b)
        prompt_gone_from = family_gone_from(stock, alone, 2, 8)
        generated = out[b, -steps:]
        full = dict(alone, input_ids=torch.cat([alone["input_ids"], generated[None, :-1]], dim=1))
        full["attention_mask"] = torch.ones_like(full["input_ids"])
        for key in TYPE_KEYS:
            if key in full:
                full[key] = torch.nn.functional.pad(alone[key], (0, steps - 1))
        gone_from = torch.nn.functional.pad(prompt_gone_from, (0, steps - 1), value=LAYERS)
        logits = masked_stock_forward(stock, full, gone_from).logits
        start = alone["input_ids"].shape[1] - 1
        assert logits[0, start:].argmax(dim=-1).tolist() == generated.tolist()
