"""Exit stages composed by a spec: every scorer's boundary cases, two prune stages against the masked-keys oracle,
batch == alone, cached decode == recompute, FLOPs as the per-layer sum of what entered each layer."""

import pytest
import torch

from llava.mm_utils import tokenizer_image_token
from llava.model.visual_exit import ExitConfig, ExitRequest

from test_fastv import fastv_gone_from, run
from test_visual_exit import PROMPTS, batch_inputs, images_for, masked_reference_logits_by_token, text_positions

SCORERS = ["fastv", "random"]


def stages(spec: str) -> ExitConfig:
    return ExitRequest("stages", stages=spec).expand()


def random_gone_from(mm, k, ratio, gone_from):
    """The random scorer from its definition: one seeded uniform draw per RoPE position; keep the top share of
    the visual tokens still there after layer k."""
    table = torch.rand(int(mm.position_ids.max()) + 1, generator=torch.Generator().manual_seed(0))
    gone_from = gone_from.clone()
    for b in range(len(gone_from)):
        visual = [t for t in mm.visual_mask[b].nonzero().flatten().tolist() if gone_from[b, t] >= k]
        ranked = sorted(visual, key=lambda t: -float(table[mm.position_ids[b, t]]))
        for t in ranked[round((1 - ratio) * len(visual)) :]:
            gone_from[b, t] = k
    return gone_from


@pytest.mark.parametrize("k", [1, 2, 3])
def test_random_scorer_at_ratio_zero_is_none_and_at_one_the_fixed_exit(loaded, images, k):
    """(FastV's scorer has the same checks in test_fastv.)"""
    tokenizer, model, _, _ = loaded
    ids, mask = batch_inputs(tokenizer, PROMPTS, "left")
    pixels = images_for(images, PROMPTS)
    with torch.no_grad():
        text = text_positions(model.prepare_inputs_labels_for_multimodal(ids, mask, None, pixels))
    for ratio, reference in ((0, ExitRequest("none").expand()), (1, ExitRequest("fixed", k).expand())):
        pruned, expected = (run(model, ids, mask, pixels, c) for c in (stages(f"prune:random:{k}:{ratio}"), reference))
        assert (pruned.logits[text] - expected.logits[text]).abs().max() <= 1e-5
        assert pruned.exit_stats.exit_layer.tolist() == expected.exit_stats.exit_layer.tolist()
        assert torch.equal(pruned.exit_stats.prefill_flops, expected.exit_stats.prefill_flops)


@pytest.mark.parametrize("scorer", SCORERS)
def test_two_prune_stages_equal_the_oracle_with_both_drops(loaded, images, scorer):
    """Pruning after layer 1 and again after layer 3 (half of what is left) == the stock layers with the keys of
    the first stage's drops masked from layer 1 on and those of the second from layer 3 on."""
    tokenizer, model, _, _ = loaded
    ids, mask = batch_inputs(tokenizer, PROMPTS, "right")
    pixels = images_for(images, PROMPTS)
    out = run(model, ids, mask, pixels, stages(f"prune:{scorer}:1:0.5,prune:{scorer}:3:0.5"))
    with torch.no_grad():
        mm = model.prepare_inputs_labels_for_multimodal(ids, mask, None, pixels)
        gone_from = torch.full(mm.visual_mask.shape, model.config.num_hidden_layers)
        for k in (1, 3):
            if scorer == "fastv":
                gone_from = fastv_gone_from(model, mm, k, 0.5, gone_from)
            else:
                gone_from = random_gone_from(mm, k, 0.5, gone_from)
        oracle, _ = masked_reference_logits_by_token(model, mm, gone_from)
    text = text_positions(mm)
    assert (out.logits[text] - oracle[text]).abs().max() <= 1e-5
    first, second = (gone_from == 1).sum(dim=1), (gone_from == 3).sum(dim=1)
    assert (second > 0).any() and out.exit_stats.pruned_visual_tokens.tolist() == (first + second).tolist()
    tokens = mm.attention_mask.sum(dim=1)
    expected = torch.stack([tokens, tokens - first, tokens - first, tokens - first - second], dim=1)
    assert out.exit_stats.layer_tokens.tolist() == expected.tolist()
    geometry = out.exit_stats.geometry
    assert torch.equal(out.exit_stats.prefill_flops, geometry.layer_flops(expected).sum(dim=1))


@pytest.mark.parametrize("spec", ["prune:random:1:0.5", "prune:random:1:0.5,prune:fastv:2:0.5,fixed:3"])
def test_stages_batch_equals_alone(loaded, images, spec):
    tokenizer, model, _, _ = loaded
    ids, mask = batch_inputs(tokenizer, PROMPTS, "left")
    pixels = images_for(images, PROMPTS)
    config = stages(spec)
    settings = dict(do_sample=False, max_new_tokens=4, min_new_tokens=4, pad_token_id=0, exit_config=config)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, images=pixels, return_dict_in_generate=True, **settings)
        offset = 0
        for b, (prompt, count) in enumerate(PROMPTS):
            row = tokenizer_image_token(prompt, tokenizer)
            sample = pixels[offset : offset + count] if count else None
            offset += count
            alone = model.generate(torch.tensor([row]), images=sample, return_dict_in_generate=True, **settings)
            assert batched.sequences[b].tolist() == alone.sequences[0].tolist()
            assert batched.exit_stats.prefill_flops[b] == alone.exit_stats.prefill_flops[0]


def test_cached_decode_equals_recompute_with_two_random_prune_stages(loaded, images):
    """The random scorer ranks by position alone, so recomputing prompt + answer from scratch under the same stages
    prunes the same visual tokens: each greedy token of the cached decode is the recompute's argmax."""
    tokenizer, model, _, _ = loaded
    config = stages("prune:random:1:0.5,prune:random:3:0.5")
    for prompt, count in PROMPTS[:3]:
        ids = tokenizer_image_token(prompt, tokenizer)
        sample = images_for(images, [(prompt, count)])
        with torch.no_grad():
            cached = model.generate(torch.tensor([ids]), images=sample, do_sample=False, max_new_tokens=5,
                                    min_new_tokens=5, pad_token_id=0, exit_config=config)[0].tolist()
            generated = []
            for _ in range(5):
                logits = model(input_ids=torch.tensor([ids + generated]), images=sample, exit_config=config,
                               use_cache=False).logits
                generated.append(int(logits[0, -1].argmax()))
        assert cached == generated


def test_stage_specs_say_what_is_wrong():
    for spec, message in [
        ("prune:nope:2:0.5", "unknown scorer 'nope'; known: fastv, pdrop, random"),
        ("gates", "expected gates:τ"),
        ("prune:fastv:2:1.5", "1.5 lies outside [0, 1]"),
        ("skip:2", "unknown exit stage 'skip'"),
    ]:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            stages(spec)
    with pytest.raises(ValueError, match="needs a stage list"):
        ExitRequest("stages").expand()
    assert stages("prune:random:2:0.5, gates:0.9").label == "prune-random-2-0.5+gates-0.9"
    assert ExitRequest("dynamic+fastv", threshold=0.9, fastv_k=2, fastv_r=0.5).expand().stages == stages(
        "gates:0.9,prune:fastv:2:0.5"
    ).stages
