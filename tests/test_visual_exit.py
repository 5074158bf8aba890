"""The exit mechanism against independent oracles (docs/DESIGN.md §2).

Oracle: for text tokens, "visual tokens removed after layer K-1" equals running the stock decoder layers on the full
sequence with the visual keys masked for every query in layers >= K. The oracle below builds those masks itself.
"""

import pytest
import torch

from llava.mm_utils import tokenizer_image_token
from llava.model.visual_exit import DecoderGeometry, ExitConfig, ExitRequest, gate_feature_weights, gate_features, prefill_flops

from batching import attention_implementation, padded_batch, set_sample_dependent_gates, set_sign_gate

PROMPTS = [
    ("USER: <image>\nWhat colour is it? ASSISTANT:", 1),
    ("USER: a question without any image at all, a longer one ASSISTANT:", 0),
    ("USER: compare <image> with <image> in detail ASSISTANT:", 2),
    ("<image>Yes", 1),  # nothing between the image and the last token: empty gate span
]


def batch_inputs(tokenizer, prompts, padding_side="left"):
    return padded_batch(tokenizer, [prompt for prompt, _ in prompts], padding_side)


def images_for(images, prompts):
    """As many distinct images as the prompts hold tags (the first ones from the shared fixture)."""
    count = sum(count for _, count in prompts)
    extra = torch.randn(max(count - len(images), 0), *images.shape[1:], generator=torch.Generator().manual_seed(1))
    return torch.cat([images, extra])[:count] if count else None


def masked_reference_logits(model, mm, exit_layers):
    """Stock layers on the full sequence; sample b's visual keys are masked for all queries in layers >= K_b."""
    gone_from = torch.where(mm.visual_mask, exit_layers.to(mm.visual_mask.device)[:, None], model.config.num_hidden_layers)
    return masked_reference_logits_by_token(model, mm, gone_from)[0]


def masked_reference_logits_by_token(model, mm, gone_from, attention_layer=None):
    """Stock layers on the full sequence; key t of sample b is masked for all queries in layers >= gone_from[b, t].
    With `attention_layer`, also that layer's (B, heads, T, T) attention probabilities from transformers' own
    eager attention (the full map)."""
    base = model.get_model()
    hidden = mm.inputs_embeds
    batch, length = hidden.shape[:2]
    cos_sin = base.rotary_emb(hidden, mm.position_ids)
    causal = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()
    itself = torch.eye(length, dtype=torch.bool, device=hidden.device)
    probabilities = None
    for index, layer in enumerate(base.layers):
        gone = index >= gone_from.to(hidden.device)
        allowed = causal & mm.attention_mask[:, None, :].bool() & ~gone[:, None, :] | itself
        additive = hidden.new_zeros(batch, 1, length, length).masked_fill(~allowed[:, None], torch.finfo(hidden.dtype).min)
        if index == attention_layer:
            with attention_implementation(model, "eager"):
                _, probabilities = layer.self_attn(layer.input_layernorm(hidden), cos_sin, additive)
        hidden = layer(hidden, attention_mask=additive, position_embeddings=cos_sin, position_ids=mm.position_ids)
    return model.lm_head(base.norm(hidden)), probabilities


def text_positions(mm):
    return mm.attention_mask.bool() & ~mm.visual_mask


def fire_always(gate, hidden_size):
    """A gate whose exit logit exceeds the stay logit for every input: GELU(a) + GELU(-a) > 0 for a != 0."""
    with torch.no_grad():
        gate.w1.weight.zero_()
        gate.w2.weight.zero_()
        direction = torch.ones(2 * hidden_size)
        gate.w1.weight[0], gate.w1.weight[1] = direction, -direction
        gate.w2.weight[1, :2] = 1.0


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_fixed_exit_equals_masked_oracle(loaded, images, attn, padding_side):
    tokenizer, model, _, _ = loaded
    layers = model.config.num_hidden_layers
    ids, mask = batch_inputs(tokenizer, PROMPTS, padding_side)
    pixels = images_for(images, PROMPTS)
    with attention_implementation(model, attn), torch.no_grad():
        mm = model.prepare_inputs_labels_for_multimodal(ids, mask, None, pixels)
        text = text_positions(mm)
        for k in sorted({0, 1, layers // 2, layers - 1, layers}):
            out = model(input_ids=ids, attention_mask=mask, images=pixels, exit_config=ExitRequest("fixed", k).expand())
            oracle = masked_reference_logits(model, mm, torch.full((len(PROMPTS),), k))
            assert out.logits.shape == oracle.shape
            assert (out.logits[text] - oracle[text]).abs().max() <= 1e-5, f"K={k}"
            has_image = torch.tensor([count > 0 for _, count in PROMPTS])
            assert out.exit_stats.exit_layer.tolist() == torch.where(has_image, k, 0).tolist()


def test_none_equals_stock_llama_forward(loaded, images):
    """Mode none runs transformers' own LlamaModel.forward arithmetic exactly."""
    from transformers import LlamaModel

    tokenizer, model, _, _ = loaded
    ids, mask = batch_inputs(tokenizer, PROMPTS, "right")
    with torch.no_grad():
        mm = model.prepare_inputs_labels_for_multimodal(ids, mask, None, images_for(images, PROMPTS))
        ours = model.get_model()(inputs_embeds=mm.inputs_embeds, attention_mask=mm.attention_mask, position_ids=mm.position_ids)
        stock = LlamaModel.forward(
            model.get_model(), inputs_embeds=mm.inputs_embeds, attention_mask=mm.attention_mask, position_ids=mm.position_ids
        )
    real = mm.attention_mask
    assert torch.equal(ours.last_hidden_state[real], stock.last_hidden_state[real])


@pytest.mark.parametrize("fire_layer", [0, 2])
def test_dynamic_with_hand_set_gate_equals_fixed(gated, loaded, images, fire_layer):
    tokenizer = loaded[0]
    fire_always(gated.get_model().visual_gates_router[fire_layer], gated.config.hidden_size)
    ids, mask = batch_inputs(tokenizer, PROMPTS)
    pixels = images_for(images, PROMPTS)
    with torch.no_grad():
        dynamic = gated(input_ids=ids, attention_mask=mask, images=pixels, exit_config=ExitRequest("dynamic").expand())
        fixed = gated(input_ids=ids, attention_mask=mask, images=pixels, exit_config=ExitRequest("fixed", fire_layer + 1).expand())
        mm = gated.prepare_inputs_labels_for_multimodal(ids, mask, None, pixels)
    text = text_positions(mm)
    assert (dynamic.logits[text] - fixed.logits[text]).abs().max() <= 1e-5
    has_image = torch.tensor([count > 0 for _, count in PROMPTS])
    assert dynamic.exit_stats.exit_layer.tolist() == torch.where(has_image, fire_layer + 1, 0).tolist()
    # Gates run in layer order up to the exit, only for samples holding visual tokens.
    assert dynamic.exit_stats.gate_evaluations.tolist() == torch.where(has_image, fire_layer + 1, 0).tolist()


def test_threshold_and_gate_features(gated, loaded, images):
    """Gate 0 gets P(exit) = sigmoid(1) on this sample's features as DESIGN.md defines them (computed here from
    the stock layer-0 output); tau just below exits after layer 0, tau just above never exits (other gates: 0.5)."""
    tokenizer = loaded[0]
    ids, _ = batch_inputs(tokenizer, PROMPTS[:1])
    pixels = images_for(images, PROMPTS[:1])
    with torch.no_grad():
        mm = gated.prepare_inputs_labels_for_multimodal(ids, None, None, pixels)
        states = gated.get_model()(inputs_embeds=mm.inputs_embeds, output_hidden_states=True).hidden_states
    after_layer_0 = states[1][0]
    last = ids.shape[1] - 1 + int(mm.visual_mask.sum()) - 1
    first_text = int(mm.visual_mask[0].nonzero().max()) + 1
    mean = after_layer_0[first_text:last].mean(dim=0)
    features = torch.cat([mean, after_layer_0[last]])
    assert torch.allclose(
        gate_features(states[1], gate_feature_weights(
            mm.attention_mask & ~mm.visual_mask & (torch.arange(last + 1) >= first_text)
            & (torch.arange(last + 1) != last), torch.tensor([last])
        ))[0],
        features,
    )
    set_sign_gate(gated.get_model().visual_gates_router[0], features / features.pow(2).sum())
    p_exit = torch.sigmoid(torch.tensor(1.0)).item()
    with torch.no_grad():
        below = gated(input_ids=ids, images=pixels, exit_config=ExitRequest("dynamic", threshold=p_exit - 0.01).expand())
        above = gated(input_ids=ids, images=pixels, exit_config=ExitRequest("dynamic", threshold=p_exit + 0.01).expand())
    assert below.exit_stats.exit_layer.tolist() == [1]
    assert above.exit_stats.exit_layer.tolist() == [gated.config.num_hidden_layers]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_equals_alone_with_different_exit_layers(gated, loaded, images, padding_side):
    tokenizer = loaded[0]
    set_sample_dependent_gates(gated)
    dynamic = ExitRequest("dynamic").expand()
    ids, mask = batch_inputs(tokenizer, PROMPTS, padding_side)
    pixels = images_for(images, PROMPTS)
    with torch.no_grad():
        batched = gated(input_ids=ids, attention_mask=mask, images=pixels, exit_config=dynamic)
        mm = gated.prepare_inputs_labels_for_multimodal(ids, mask, None, pixels)
        oracle = masked_reference_logits(gated, mm, batched.exit_stats.exit_layer)
    exit_layers = batched.exit_stats.exit_layer.tolist()
    with_images = [layer for layer, (_, count) in zip(exit_layers, PROMPTS) if count]
    assert len(set(with_images)) > 1, f"the gates should split the samples, got {exit_layers}"
    text = text_positions(mm)
    assert (batched.logits[text] - oracle[text]).abs().max() <= 1e-5
    offset = 0
    for b, prompt in enumerate(PROMPTS):
        sample_pixels = pixels[offset : offset + prompt[1]] if prompt[1] else None
        offset += prompt[1]
        row = torch.tensor([tokenizer_image_token(prompt[0], tokenizer)])
        with torch.no_grad():
            alone = gated(input_ids=row, images=sample_pixels, exit_config=dynamic)
        n = alone.logits.shape[1]
        assert alone.exit_stats.exit_layer.item() == exit_layers[b]
        # The forward re-pads every batch on the right (LLaVA's default), whatever padding came in.
        assert (batched.logits[b, :n][text[b, :n]] - alone.logits[0][text[b, :n]]).abs().max() <= 1e-5


def greedy_recompute(model, ids, pixels, exit_config, steps):
    """Oracle: full recompute for every new token, no cache, the exit fixed at the prefill's layer."""
    generated = []
    for _ in range(steps):
        logits = model(input_ids=torch.tensor([ids + generated]), images=pixels, use_cache=False, exit_config=exit_config).logits
        generated.append(int(logits[0, -1].argmax()))
    return generated


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_decode_equals_full_recompute(gated, loaded, images, attn):
    tokenizer = loaded[0]
    set_sample_dependent_gates(gated)
    gated.set_attn_implementation(attn)
    configs = [ExitRequest("fixed", 0).expand(), ExitRequest("fixed", 2).expand(), ExitRequest("dynamic").expand(), ExitRequest("none").expand()]
    offset = 0
    try:
        for prompt, count in PROMPTS:
            pixels = images_for(images, PROMPTS)[offset : offset + count] if count else None
            offset += count
            ids = tokenizer_image_token(prompt, tokenizer)
            for config in configs:
                with torch.no_grad():
                    out = gated.generate(
                        torch.tensor([ids]), images=pixels, exit_config=config, do_sample=False, max_new_tokens=5,
                        min_new_tokens=5, pad_token_id=0, return_dict_in_generate=True,
                    )
                    layer = out.exit_stats.exit_layer.item()
                    fixed = ExitRequest("fixed", layer).expand() if count else ExitRequest("none").expand()
                    assert out.sequences[0].tolist() == greedy_recompute(gated, ids, pixels, fixed, 5), (prompt, config)
    finally:
        gated.set_attn_implementation("sdpa")


def test_batched_generation_equals_alone_with_exits(gated, loaded, images):
    tokenizer = loaded[0]
    set_sample_dependent_gates(gated)
    ids, mask = batch_inputs(tokenizer, PROMPTS, "right")
    pixels = images_for(images, PROMPTS)
    settings = dict(do_sample=False, max_new_tokens=5, min_new_tokens=5, pad_token_id=0, exit_config=ExitRequest("dynamic").expand())
    with torch.no_grad():
        batched = gated.generate(ids, attention_mask=mask, images=pixels, return_dict_in_generate=True, **settings)
        offset = 0
        for b, (prompt, count) in enumerate(PROMPTS):
            alone = gated.generate(
                torch.tensor([tokenizer_image_token(prompt, tokenizer)]),
                images=pixels[offset : offset + count] if count else None,
                return_dict_in_generate=True,
                **settings,
            )
            offset += count
            assert batched.sequences[b].tolist() == alone.sequences[0].tolist()
            assert batched.exit_stats.exit_layer[b] == alone.exit_stats.exit_layer[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_no_nan_in_half_precision_with_empty_gate_span(gated, loaded, images, dtype):
    tokenizer = loaded[0]
    set_sample_dependent_gates(gated)
    prompts = PROMPTS[3:] + PROMPTS[:1]
    ids, mask = batch_inputs(tokenizer, prompts, "left")
    # The round trip through `dtype` rounds weights and buffers (RoPE's too): the shared model gets them back exact.
    exact = {name: tensor.detach().clone() for name, tensor in [*gated.named_parameters(), *gated.named_buffers()]}
    gated.to(dtype)
    try:
        with torch.no_grad():
            mm = gated.prepare_inputs_labels_for_multimodal(
                ids, mask, None, images_for(images, prompts).to(dtype), padding_side="left"
            )
            last = mm.attention_mask.shape[1] - 1
            span = mm.attention_mask & ~mm.visual_mask & (torch.arange(last + 1) > mm.visual_mask[0].nonzero().max())
            span &= torch.arange(last + 1) != last
            assert not span[0].any()  # the first sample really has an empty span
            features = gate_features(mm.inputs_embeds, gate_feature_weights(span, torch.full((2,), last)))
            assert torch.isfinite(features).all() and features.dtype == torch.float32
            for config in (ExitRequest("dynamic").expand(), ExitRequest("fixed", 1).expand()):
                out = gated(input_ids=ids, attention_mask=mask, images=images_for(images, prompts).to(dtype), exit_config=config)
                assert torch.isfinite(out.logits[mm.attention_mask]).all()
    finally:
        gated.to(torch.float32)
        with torch.no_grad():
            for name, tensor in [*gated.named_parameters(), *gated.named_buffers()]:
                tensor.copy_(exact[name])


def test_reference_named_gate_weights_load(loaded, llava_checkpoint, tmp_path):
    """Gate tensors under the reference's names load, also when the config does not name the gate width."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from llava.model.builder import load_pretrained_model

    checkpoint = tmp_path / "with-gates"
    shutil.copytree(llava_checkpoint, checkpoint)
    weights = load_file(checkpoint / "model.safetensors")
    hidden, layers, width = loaded[1].config.hidden_size, loaded[1].config.num_hidden_layers, 16
    generator = torch.Generator().manual_seed(0)
    gates = {}
    for i in range(layers):
        gates[f"model.visual_gates_router.{i}.w1.weight"] = torch.randn(width, 2 * hidden, generator=generator)
        gates[f"model.visual_gates_router.{i}.w2.weight"] = torch.randn(2, width, generator=generator)
    save_file({**weights, **gates}, checkpoint / "model.safetensors", metadata={"format": "pt"})
    assert "visual_gate_hidden_size" not in json.loads((checkpoint / "config.json").read_text())
    _, model, _, _ = load_pretrained_model(str(checkpoint), device="cpu")
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in gates.items())
    model.save_pretrained(tmp_path / "resaved")
    assert set(gates) <= set(load_file(tmp_path / "resaved" / "model.safetensors"))


def test_exit_settings_persist_and_calls_override(loaded, images, tmp_path):
    from llava.model.builder import load_pretrained_model

    tokenizer, model, _, _ = loaded
    ExitRequest("fixed", 1).save_to(model.config)
    try:
        model.save_pretrained(tmp_path)
    finally:
        ExitRequest().save_to(model.config)
    tokenizer.save_pretrained(tmp_path)
    _, reloaded, _, _ = load_pretrained_model(str(tmp_path), device="cpu")
    ids = torch.tensor([tokenizer_image_token(PROMPTS[0][0], tokenizer)])
    with torch.no_grad():
        assert reloaded(input_ids=ids, images=images[:1]).exit_stats.exit_layer.tolist() == [1]
        override = reloaded(input_ids=ids, images=images[:1], exit_config=ExitRequest("none").expand())
    assert override.exit_stats.exit_layer.tolist() == [reloaded.config.num_hidden_layers]


def test_saved_threshold_of_zero_stays_zero(loaded, tmp_path):
    """A falsy saved threshold is a real setting, not a missing one (it once loaded as the 0.5 default)."""
    from llava.model.checkpoint import Checkpoint

    _, model, _, _ = loaded
    ExitRequest("dynamic", threshold=0.0).save_to(model.config)
    try:
        model.config.save_pretrained(tmp_path)
    finally:
        ExitRequest().save_to(model.config)
    config = Checkpoint.resolve(str(tmp_path)).config
    assert ExitConfig.from_model_config(config) == ExitRequest("dynamic", threshold=0.0).expand()


def test_flops_formula():
    """LLaVA-1.5-7B geometry, 636 prompt tokens of which 576 visual: ~8.5 TFLOPs for the full model."""
    geometry = DecoderGeometry(hidden=4096, kv_width=4096, intermediate=11008, layers=32, gate_hidden=2048)
    n, v, d, m = 636, 576, 4096, 11008
    per_layer = 2 * n * (2 * d * d + 2 * d * d) + 4 * n * n * d + 6 * n * d * m
    text_layer = 2 * (n - v) * (4 * d * d) + 4 * (n - v) ** 2 * d + 6 * (n - v) * d * m
    full = prefill_flops(geometry, torch.tensor([[n] * 32]), torch.tensor([0]))
    assert full.item() == 32 * per_layer and 8.4e12 < full.item() < 8.6e12
    gate = 2 * (2 * d * 2048 + 2 * 2048)
    exited = prefill_flops(geometry, torch.tensor([[n] * 8 + [n - v] * 24]), torch.tensor([8]))
    assert exited.item() == 8 * per_layer + 24 * text_layer + 8 * gate


def test_reported_flops_follow_exit_layers(loaded, images):
    tokenizer, model, _, _ = loaded
    ids, mask = batch_inputs(tokenizer, PROMPTS)
    pixels = images_for(images, PROMPTS)
    geometry = DecoderGeometry.from_config(model.config)
    with torch.no_grad():
        none = model(input_ids=ids, attention_mask=mask, images=pixels).exit_stats
        fixed = model(input_ids=ids, attention_mask=mask, images=pixels, exit_config=ExitRequest("fixed", 1).expand()).exit_stats
        mm = model.prepare_inputs_labels_for_multimodal(ids, mask, None, pixels)
    tokens, visual = mm.attention_mask.sum(1), mm.visual_mask.sum(1)
    assert torch.equal(none.num_visual_tokens, visual)
    assert torch.equal(none.prefill_flops, geometry.layers * geometry.layer_flops(tokens))
    expected = 1 * geometry.layer_flops(tokens) + (geometry.layers - 1) * geometry.layer_flops(tokens - visual)
    has_image = visual > 0
    assert torch.equal(fixed.prefill_flops[has_image], expected[has_image])
    assert (fixed.prefill_flops < none.prefill_flops)[has_image].all()
    assert torch.equal(fixed.flops_none, none.prefill_flops) and torch.equal(none.flops_none, none.prefill_flops)
    assert fixed.layer_tokens[:, 0].tolist() == tokens.tolist()
    assert fixed.layer_tokens[:, 1:].tolist() == (tokens - visual)[:, None].expand(-1, geometry.layers - 1).tolist()


def test_no_gate_work_after_the_last_sample_exits(gated, loaded, images):
    """Once every sample's visual tokens are gone, no gate runs."""
    tokenizer = loaded[0]
    fire_always(gated.get_model().visual_gates_router[0], gated.config.hidden_size)
    calls = []
    hooks = [gate.register_forward_hook(lambda module, args, output, i=i: calls.append(i))
             for i, gate in enumerate(gated.get_model().visual_gates_router)]
    ids, mask = batch_inputs(tokenizer, PROMPTS)
    try:
        with torch.no_grad():
            out = gated(input_ids=ids, attention_mask=mask, images=images_for(images, PROMPTS), exit_config=ExitRequest("dynamic").expand())
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [0]  # the decision after layer 0 only
    has_image = torch.tensor([count > 0 for _, count in PROMPTS])
    assert out.exit_stats.gate_evaluations.tolist() == has_image.long().tolist()
