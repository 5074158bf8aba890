"""FastV (and dynamic+fastv) against an independent oracle: transformers' own eager attention map of the last
token at layer K ranks the visual tokens; the pruned ones are then masked for every query in later layers of the
stock layers on the full sequence (docs/DESIGN.md §2)."""

import pytest
import torch

from llava.model.visual_exit import ExitRequest

from batching import attention_implementation, set_sample_dependent_gates

from test_visual_exit import (
    PROMPTS,
    batch_inputs,
    fire_always,
    images_for,
    masked_reference_logits_by_token,
    text_positions,
)


def fastv_gone_from(model, mm, k, ratio, gone_from=None):
    """Per token, the first layer that no longer sees it under FastV(k, ratio), ranked in plain Python from the
    full attention map; `gone_from` (default: nothing gone) holds exits decided before the ranking."""
    layers = model.config.num_hidden_layers
    if gone_from is None:
        gone_from = torch.full(mm.visual_mask.shape, layers)
    _, probabilities = masked_reference_logits_by_token(model, mm, gone_from, attention_layer=k - 1)
    gone_from = gone_from.clone()
    for b in range(len(gone_from)):
        last = int(mm.attention_mask[b].nonzero().max())
        scores = probabilities[b, :, last].mean(dim=0).tolist()
        visual = [t for t in mm.visual_mask[b].nonzero().flatten().tolist() if gone_from[b, t] >= k]
        ranked = sorted(visual, key=lambda t: -scores[t])
        for t in ranked[round((1 - ratio) * len(visual)) :]:
            gone_from[b, t] = k
    return gone_from


def run(model, ids, mask, pixels, config, use_cache=True):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, images=pixels, exit_config=config, use_cache=use_cache)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["keys-from-cache", "keys-projected"])
def test_fastv_equals_oracle(loaded, images, attn, padding_side, use_cache):
    tokenizer, model, _, _ = loaded
    ids, mask = batch_inputs(tokenizer, PROMPTS, padding_side)
    pixels = images_for(images, PROMPTS)
    with attention_implementation(model, attn), torch.no_grad():
        mm = model.prepare_inputs_labels_for_multimodal(ids, mask, None, pixels)
        text = text_positions(mm)
        for k, ratio in [(1, 0.5), (2, 0.25), (3, 0.75)]:
            out = run(model, ids, mask, pixels, ExitRequest("fastv", fastv_k=k, fastv_r=ratio).expand(), use_cache)
            gone_from = fastv_gone_from(model, mm, k, ratio)
            oracle, _ = masked_reference_logits_by_token(model, mm, gone_from)
            assert (out.logits[text] - oracle[text]).abs().max() <= 1e-5, (k, ratio)
            assert out.exit_stats.pruned_visual_tokens.tolist() == (gone_from == k).sum(dim=1).tolist()
            assert out.exit_stats.prune_layer == k


def test_fastv_ratio_zero_is_none_and_ratio_one_is_fixed(loaded, images):
    tokenizer, model, _, _ = loaded
    ids, mask = batch_inputs(tokenizer, PROMPTS, "right")
    pixels = images_for(images, PROMPTS)
    none = run(model, ids, mask, pixels, ExitRequest("none").expand())
    with torch.no_grad():
        text = text_positions(model.prepare_inputs_labels_for_multimodal(ids, mask, None, pixels))
    for k in range(1, model.config.num_hidden_layers + 1):
        keep_all = run(model, ids, mask, pixels, ExitRequest("fastv", fastv_k=k, fastv_r=0.0).expand())
        assert (keep_all.logits[text] - none.logits[text]).abs().max() <= 1e-5
        assert keep_all.exit_stats.exit_layer.tolist() == none.exit_stats.exit_layer.tolist()
        assert torch.equal(keep_all.exit_stats.prefill_flops, none.exit_stats.prefill_flops)

        drop_all = run(model, ids, mask, pixels, ExitRequest("fastv", fastv_k=k, fastv_r=1.0).expand())
        fixed = run(model, ids, mask, pixels, ExitRequest("fixed", k).expand())
        assert (drop_all.logits[text] - fixed.logits[text]).abs().max() <= 1e-5
        assert drop_all.exit_stats.exit_layer.tolist() == fixed.exit_stats.exit_layer.tolist()
        assert drop_all.exit_stats.pruned_visual_tokens.tolist() == [0] * len(PROMPTS)
        assert torch.equal(drop_all.exit_stats.prefill_flops, fixed.exit_stats.prefill_flops)


def assert_batch_equals_alone(model, tokenizer, images, config):
    """A left-padded batch of PROMPTS under `config` equals each prompt run alone: logits at every position of the
    sample, pruned ones included (zeros in both when the same tokens were pruned), and the pruned counts."""
    ids, mask = batch_inputs(tokenizer, PROMPTS, "left")
    pixels = images_for(images, PROMPTS)
    batched = run(model, ids, mask, pixels, config)
    with torch.no_grad():
        valid = model.prepare_inputs_labels_for_multimodal(ids, mask, None, pixels).attention_mask.bool()
    offset = 0
    for b, (prompt, count) in enumerate(PROMPTS):
        alone_ids, alone_mask = batch_inputs(tokenizer, [(prompt, count)])
        alone = run(model, alone_ids, alone_mask, pixels[offset : offset + count] if count else None, config)
        offset += count
        assert (batched.logits[b, valid[b]] - alone.logits[0]).abs().max() <= 1e-5
        assert batched.exit_stats.pruned_visual_tokens[b] == alone.exit_stats.pruned_visual_tokens[0]


def test_fastv_batch_equals_alone(loaded, images):
    tokenizer, model, _, _ = loaded
    assert_batch_equals_alone(model, tokenizer, images, ExitRequest("fastv", fastv_k=2, fastv_r=0.5).expand())


def test_fastv_flops_count_pruned_layers(loaded, images):
    tokenizer, model, _, _ = loaded
    ids, mask = batch_inputs(tokenizer, PROMPTS[:1])
    stats = run(model, ids, mask, images[:1], ExitRequest("fastv", fastv_k=1, fastv_r=0.5).expand()).exit_stats
    geometry, n, pruned = stats.geometry, stats.num_tokens, stats.pruned_visual_tokens
    expected = geometry.layer_flops(n) + (geometry.layers - 1) * geometry.layer_flops(n - pruned)
    assert pruned.item() == round(0.5 * stats.num_visual_tokens.item()) > 0
    assert torch.equal(stats.prefill_flops, expected)


def test_fastv_cached_decode_equals_oracle(loaded, images):
    """Decoding after FastV attends, in layers >= K, to the kept visual tokens only: the greedy tokens equal the
    argmax of the masked oracle run on prompt + generated tokens without any cache."""
    tokenizer, model, _, _ = loaded
    k, ratio = 2, 0.5
    ids, mask = batch_inputs(tokenizer, PROMPTS[:1])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, images=images[:1], exit_config=ExitRequest("fastv", fastv_k=k, fastv_r=ratio).expand(),
            do_sample=False, max_new_tokens=5, min_new_tokens=5, pad_token_id=0,
        )
        full_ids = torch.cat([ids, out[:, :-1]], dim=1)
        mm = model.prepare_inputs_labels_for_multimodal(full_ids, torch.ones_like(full_ids), None, images[:1])
        prompt = model.prepare_inputs_labels_for_multimodal(ids, mask, None, images[:1])
        gone_from = torch.full(mm.visual_mask.shape, model.config.num_hidden_layers)
        gone_from[:, : prompt.visual_mask.shape[1]] = fastv_gone_from(model, prompt, k, ratio)
        oracle, _ = masked_reference_logits_by_token(model, mm, gone_from)
    start = prompt.visual_mask.shape[1] - 1
    assert oracle[0, start:].argmax(dim=-1).tolist() == out[0].tolist()


@pytest.mark.parametrize("fire_layer", [0, 2])
def test_dynamic_plus_fastv(gated, loaded, images, fire_layer):
    """Gates firing before K: FastV never runs (dynamic alone). Firing at or after K: FastV prunes after K, then the
    gate takes the rest out after its layer."""
    tokenizer = loaded[0]
    k, ratio = 1, 0.5
    fire_always(gated.get_model().visual_gates_router[fire_layer], gated.config.hidden_size)
    ids, mask = batch_inputs(tokenizer, PROMPTS, "left")
    pixels = images_for(images, PROMPTS)
    out = run(gated, ids, mask, pixels, ExitRequest("dynamic+fastv", fastv_k=k, fastv_r=ratio).expand())
    with torch.no_grad():
        mm = gated.prepare_inputs_labels_for_multimodal(ids, mask, None, pixels)
        exit_after = fire_layer + 1
        gone_from = torch.where(mm.visual_mask, exit_after, gated.config.num_hidden_layers)
        if exit_after > k:
            gone_from = fastv_gone_from(gated, mm, k, ratio, gone_from)
        oracle, _ = masked_reference_logits_by_token(gated, mm, gone_from)
    text = text_positions(mm)
    assert (out.logits[text] - oracle[text]).abs().max() <= 1e-5
    has_image = mm.visual_mask.any(dim=1)
    assert out.exit_stats.exit_layer.tolist() == torch.where(has_image, exit_after, 0).tolist()
    expected_pruned = (gone_from == k).sum(dim=1) if exit_after > k else torch.zeros(len(PROMPTS), dtype=torch.long)
    assert out.exit_stats.pruned_visual_tokens.tolist() == expected_pruned.tolist()


def test_dynamic_plus_fastv_with_sample_dependent_gates(gated, loaded, images):
    """Samples exit at different layers, before and after FastV's K:
    the batch equals the oracle built from each sample's exit layer, and each sample alone."""
    tokenizer = loaded[0]
    set_sample_dependent_gates(gated)
    config = ExitRequest("dynamic+fastv", threshold=0.5, fastv_k=1, fastv_r=0.5).expand()
    ids, mask = batch_inputs(tokenizer, PROMPTS, "right")
    pixels = images_for(images, PROMPTS)
    out = run(gated, ids, mask, pixels, config)
    with torch.no_grad():
        mm = gated.prepare_inputs_labels_for_multimodal(ids, mask, None, pixels)
        exit_layer = out.exit_stats.exit_layer
        gone_from = torch.where(mm.visual_mask, exit_layer[:, None], gated.config.num_hidden_layers)
        oracle, _ = masked_reference_logits_by_token(gated, mm, fastv_gone_from(gated, mm, 1, 0.5, gone_from))
    text = text_positions(mm)
    assert (out.logits[text] - oracle[text]).abs().max() <= 1e-5
    offset = 0
    for b, (prompt, count) in enumerate(PROMPTS):
        alone_ids, alone_mask = batch_inputs(tokenizer, [(prompt, count)])
        alone = run(gated, alone_ids, alone_mask, pixels[offset : offset + count] if count else None, config)
        offset += count
        assert alone.exit_stats.exit_layer.item() == exit_layer[b]
        assert alone.exit_stats.pruned_visual_tokens.item() == out.exit_stats.pruned_visual_tokens[b]


def test_fastv_settings_are_checked():
    with pytest.raises(ValueError, match="fastv-k"):
        ExitRequest("fastv", fastv_r=0.5).expand()
    with pytest.raises(ValueError, match="fastv-r"):
        ExitRequest("dynamic+fastv", fastv_k=2, fastv_r=1.5).expand()
