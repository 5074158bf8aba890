"""The visual exit on transformers' own VLM classes, against the stock model (tiny random weights, fp32).

Oracle (docs/DESIGN.md §2, per family): the stock class with the same weights, its own positions (3-D M-RoPE for
Qwen2-VL / Qwen2.5-VL), and the visual keys masked for every query in the layers after the exit, swapped in per
layer by a hook (tests/families.py). FastV's ranking comes from the stock eager attention map.
"""

import pytest
import torch

from llava.compat import cache_argument
from llava.model.visual_exit import ExitRequest, VisualExitCache, enable_visual_exit, visual_exit_class

from batching import set_sign_gate
from families import (
    ANYRES,
    FAMILIES,
    HYBRID,
    M_ROPE,
    TEXT,
    TYPE_KEYS,
    Sample,
    batch,
    exit_model,
    masked_stock_forward,
    sample_inputs,
    stock_model,
    visual_mask,
)
from test_visual_exit import fire_always

LAYERS = TEXT["num_hidden_layers"]
TOLERANCE = 1e-5
# Two images of different sizes, hence different visual-token counts, per family.
SIZES = {
    "llava-hf": [None, None],
    "llava-next": [(28, 56), (56, 28)],
    "llava-onevision": [(28, 56), (56, 56)],
    "qwen2-vl": [(2, 4), (4, 4)],
    "qwen2.5-vl": [(2, 4), (4, 4)],
    "qwen3-vl": [(2, 4), (4, 4)],
    "qwen3-vl-moe": [(2, 4), (4, 4)],
    "qwen3.5": [(2, 4), (4, 4)],
    "llava-onevision-1.5": [(2, 4), (4, 4)],
    "internvl": [1, 3],
    "gemma3": [None, None],  # a fixed count per image
}


def samples_for(family):
    small, large = SIZES[family]
    second = [large, small] if family not in ANYRES else [large]  # anyres families: one image per sample
    return [Sample(3, [small], 4), Sample(2, second, 6), Sample(7, [], 3)]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    stock = stock_model(request.param)
    model = exit_model(stock)
    for gate in model.model.language_model.visual_gates_router:  # zero gates: P(exit) = 0.5, never above 0.5
        torch.nn.init.zeros_(gate.w1.weight)
        torch.nn.init.zeros_(gate.w2.weight)
    return request.param, stock, model


def forward(model, inputs, config, **kwargs):
    with torch.no_grad():
        return model(**inputs, exit_config=config, **kwargs)


def text_slots(inputs):
    return inputs["attention_mask"].bool() & ~visual_mask(inputs)


def skip_where_masking_is_not_removal(name):
    if name in HYBRID:
        pytest.skip("linear-attention layers: masking a token is not removing it (test_hybrid_linear.py's oracle)")


def gone_after(inputs, exit_layers):
    """Per token, the first layer that no longer sees it, for sample b's visual tokens leaving after exit_layers[b]."""
    return torch.where(visual_mask(inputs), torch.as_tensor(exit_layers)[:, None], LAYERS)


@pytest.mark.parametrize("padding_side", ["left", "right", None])
def test_none_equals_stock(family, padding_side):
    name, stock, model = family
    samples = samples_for(name) if padding_side else samples_for(name)[:1]
    inputs = batch(name, stock, samples, padding_side or "left")
    with torch.no_grad():
        reference = stock(**inputs)
    ours = forward(model, inputs, ExitRequest().expand())
    valid = inputs["attention_mask"].bool()
    assert (ours.logits - reference.logits)[valid].abs().max() <= TOLERANCE
    assert ours.exit_stats.exit_layer.tolist() == [LAYERS if s.images else 0 for s in samples]


def test_none_greedy_tokens_equal_stock(family):
    name, stock, model = family
    inputs = batch(name, stock, samples_for(name))
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=TEXT["pad_token_id"])
    with torch.no_grad():
        reference = stock.generate(**inputs, **settings)
        ours = model.generate(**inputs, exit_config=ExitRequest().expand(), **settings)
    assert torch.equal(ours, reference)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("layer", [0, 1, 2])  # Qwen3-VL: before, between and after its DeepStack layers
def test_fixed_equals_masked_stock(family, attn, layer):
    name, stock, model = family
    skip_where_masking_is_not_removal(name)
    inputs = batch(name, stock, samples_for(name))
    oracle = masked_stock_forward(stock, inputs, gone_after(inputs, [layer] * 3))
    model.set_attn_implementation(attn)
    try:
        ours = forward(model, inputs, ExitRequest("fixed", layer).expand())
    finally:
        model.set_attn_implementation("eager")
    text = text_slots(inputs)
    assert (ours.logits - oracle.logits)[text].abs().max() <= TOLERANCE
    with_images = torch.tensor([bool(s.images) for s in samples_for(name)])
    assert ours.exit_stats.exit_layer.tolist() == torch.where(with_images, layer, 0).tolist()
    assert ours.exit_stats.num_visual_tokens.tolist() == visual_mask(inputs).sum(dim=1).tolist()


@pytest.mark.parametrize("fire_layer", [0, 2])
def test_gate_firing_at_k_equals_fixed_k_plus_one(family, fire_layer):
    name, stock, model = family
    gates = model.model.language_model.visual_gates_router
    inputs = batch(name, stock, samples_for(name))
    fire_always(gates[fire_layer], TEXT["hidden_size"])
    try:
        dynamic = forward(model, inputs, ExitRequest("dynamic").expand())
    finally:
        torch.nn.init.zeros_(gates[fire_layer].w1.weight)
        torch.nn.init.zeros_(gates[fire_layer].w2.weight)
    fixed = forward(model, inputs, ExitRequest("fixed", fire_layer + 1).expand())
    text = text_slots(inputs)
    assert (dynamic.logits - fixed.logits)[text].abs().max() <= TOLERANCE
    with_images = torch.tensor([bool(s.images) for s in samples_for(name)])
    assert dynamic.exit_stats.exit_layer.tolist() == torch.where(with_images, fire_layer + 1, 0).tolist()


def stock_fastv_gone_from(stock, inputs, k, ratio):
    """FastV(k, ratio) ranked in plain Python from the stock eager attention map of layer k (1-based)."""
    gone_from = torch.full(inputs["input_ids"].shape, LAYERS)
    attentions = masked_stock_forward(stock, inputs, gone_from, output_attentions=True).attentions[k - 1]
    visual = visual_mask(inputs)
    for b in range(len(gone_from)):
        last = int(inputs["attention_mask"][b].nonzero().max())
        scores = attentions[b, :, last].mean(dim=0).tolist()
        ranked = sorted(visual[b].nonzero().flatten().tolist(), key=lambda t: -scores[t])
        for t in ranked[round((1 - ratio) * len(ranked)) :]:
            gone_from[b, t] = k
    return gone_from


def test_fastv_equals_stock_attention_ranking(family):
    name, stock, model = family
    skip_where_masking_is_not_removal(name)
    inputs = batch(name, stock, samples_for(name))
    gone_from = stock_fastv_gone_from(stock, inputs, k=2, ratio=0.5)
    oracle = masked_stock_forward(stock, inputs, gone_from)
    model.set_attn_implementation("sdpa")
    try:
        ours = forward(model, inputs, ExitRequest("fastv", fastv_k=2, fastv_r=0.5).expand())
    finally:
        model.set_attn_implementation("eager")
    text = text_slots(inputs)
    assert (ours.logits - oracle.logits)[text].abs().max() <= TOLERANCE
    pruned, visual = (gone_from == 2).sum(dim=1), visual_mask(inputs).sum(dim=1)
    every = (pruned == visual) & (visual > 0)  # pruning every visual token of a sample is its exit after layer k
    assert ours.exit_stats.pruned_visual_tokens.tolist() == torch.where(every, 0, pruned).tolist()
    assert ours.exit_stats.exit_layer.tolist() == torch.where(every, 2, torch.where(visual > 0, LAYERS, 0)).tolist()


def sample_dependent_gates(model, inputs=None):
    """Sign gates on random directions, so each sample's features decide; with `inputs`, the first seed under
    which the two samples with images exit at different layers (what the batch tests need)."""
    for seed in range(3, 40):
        generator = torch.Generator().manual_seed(seed)
        for gate in model.model.language_model.visual_gates_router:
            set_sign_gate(gate, torch.randn(2 * TEXT["hidden_size"], generator=generator) * 3)
        if inputs is None:
            return
        exits = forward(model, inputs, ExitRequest("dynamic").expand()).exit_stats.exit_layer.tolist()
        if len(set(exits[:2])) == 2:
            return
    raise AssertionError("no seed gives the two samples different exit layers")


def zero_gates(model):
    for gate in model.model.language_model.visual_gates_router:
        torch.nn.init.zeros_(gate.w1.weight)
        torch.nn.init.zeros_(gate.w2.weight)


def test_padded_batch_of_different_image_sizes_equals_each_alone(family):
    name, stock, model = family
    samples = samples_for(name)
    inputs = batch(name, stock, samples)
    sample_dependent_gates(model, inputs)
    try:
        batched = forward(model, inputs, ExitRequest("dynamic").expand())
        alone = [forward(model, sample_inputs(name, stock, inputs, samples, b), ExitRequest("dynamic").expand()) for b in range(3)]
    finally:
        zero_gates(model)
    valid = inputs["attention_mask"].bool()
    for b, single in enumerate(alone):
        assert (batched.logits[b, valid[b]] - single.logits[0]).abs().max() <= TOLERANCE
        assert batched.exit_stats.exit_layer[b] == single.exit_stats.exit_layer[0]
    exits = batched.exit_stats.exit_layer.tolist()
    assert exits[2] == 0 and len(set(exits[:2])) == 2, f"the test needs two different exit layers, got {exits}"


def greedy_recompute(model, inputs, exit_layer, steps):
    """Oracle: no cache, the whole sequence again for every new token, the exit fixed at the prefill's layer."""
    inputs = dict(inputs)
    generated = []
    for _ in range(steps):
        logits = forward(model, inputs, ExitRequest("fixed", exit_layer).expand(), use_cache=False).logits
        token = int(logits[0, -1].argmax())
        generated.append(token)
        append = lambda t, value: torch.cat([t, torch.full((1, 1), value, dtype=t.dtype)], dim=1)  # noqa: E731
        inputs["input_ids"] = append(inputs["input_ids"], token)
        inputs["attention_mask"] = append(inputs["attention_mask"], 1)
        for key in TYPE_KEYS:
            if key in inputs:
                inputs[key] = append(inputs[key], 0)
    return generated


def test_cached_greedy_decoding_equals_recompute(family):
    name, stock, model = family
    samples = samples_for(name)
    inputs = batch(name, stock, samples)
    steps = 4
    sample_dependent_gates(model, inputs)
    try:
        with torch.no_grad():
            out = model.generate(
                **inputs, exit_config=ExitRequest("dynamic").expand(), max_new_tokens=steps, min_new_tokens=steps,
                do_sample=False, pad_token_id=TEXT["pad_token_id"], return_dict_in_generate=True,
            )
        exits = out.exit_stats.exit_layer.tolist()
        for b in range(len(samples)):
            alone = sample_inputs(name, stock, inputs, samples, b)
            assert out.sequences[b, -steps:].tolist() == greedy_recompute(model, alone, exits[b], steps)
    finally:
        zero_gates(model)
    assert exits[2] == 0 and len(set(exits[:2])) == 2, f"the test needs two different exit layers, got {exits}"


def test_gate_training_step_changes_only_gates(family):
    name, stock, model = family
    inputs = batch(name, stock, samples_for(name))
    labels = torch.where(text_slots(inputs), inputs["input_ids"], -100)
    labels[:, : labels.shape[1] - 4] = -100  # the last four tokens are "the answer"
    train = exit_model(stock)
    before = {k: v.clone() for k, v in train.state_dict().items()}
    optimizer = torch.optim.SGD([p for n, p in train.named_parameters() if "visual_gates_router" in n], lr=1.0)
    for step in range(2):
        out = train(**inputs, labels=labels, gate_training_layer=1)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert out.exit_labels.usable.tolist() == [True, True, False]
    changed = {k for k, v in train.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".visual_gates_router.1." in k for k in changed), changed
    with torch.no_grad():  # the labels come from the two continuations of the stock model's own computation
        full = stock(**inputs).logits
    sample, position = out.answer_positions
    assert (out.full_logits - full[sample, position]).abs().max() <= TOLERANCE


def test_gates_survive_save_and_load(family, tmp_path):
    name, stock, model = family
    sample_dependent_gates(model)
    try:
        model.save_pretrained(tmp_path)
        saved = {k: v.clone() for k, v in model.model.language_model.visual_gates_router.state_dict().items()}
    finally:
        zero_gates(model)
    stock_class = type(stock)
    loaded = visual_exit_class(stock_class).from_pretrained(tmp_path)
    assert type(loaded).__name__ == stock_class.__name__  # the checkpoint names the stock architecture
    for key, value in loaded.model.language_model.visual_gates_router.state_dict().items():
        assert torch.equal(value, saved[key]), key
    # The stock class loads it too (without the gates); enabling the exit afterwards reads them from the folder.
    plain = stock_class.from_pretrained(tmp_path)
    assert not hasattr(plain.model.language_model, "visual_gates_router")
    enabled = enable_visual_exit(plain)
    for key, value in enabled.model.language_model.visual_gates_router.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_unknown_class_is_refused():
    """(`inputs_embeds` are taken since step 17: test_stock_behaviour checks them against the stock class.)"""
    with pytest.raises(TypeError, match="does not know"):
        enable_visual_exit(torch.nn.Linear(2, 2))


def test_stage_list_with_random_pruning_equals_seeded_oracle_and_each_alone(family):
    """`prune:random:1:0.5` ranks by one seeded draw per text position (the count of real tokens before a token,
    as generate numbers them: 1-D families get those position ids, M-RoPE ones count them from the mask)."""
    name, stock, model = family
    skip_where_masking_is_not_removal(name)
    samples = samples_for(name)
    inputs = batch(name, stock, samples)
    counted = (inputs["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)
    if name not in M_ROPE:
        inputs["position_ids"] = counted
    table = torch.rand(int(counted.max()) + 1, generator=torch.Generator().manual_seed(0))
    gone_from = torch.full(counted.shape, LAYERS)
    visual = visual_mask(inputs)
    for b in range(len(samples)):
        ranked = sorted(visual[b].nonzero().flatten().tolist(), key=lambda t: -float(table[counted[b, t]]))
        for t in ranked[round(0.5 * len(ranked)) :]:
            gone_from[b, t] = 1
    oracle = masked_stock_forward(stock, inputs, gone_from)
    config = ExitRequest("stages", stages="prune:random:1:0.5").expand()
    ours = forward(model, inputs, config)
    text = text_slots(inputs)
    assert (ours.logits - oracle.logits)[text].abs().max() <= TOLERANCE
    for b in range(len(samples)):
        alone = sample_inputs(name, stock, inputs, samples, b)
        if "position_ids" in inputs:
            alone["position_ids"] = counted[b, inputs["attention_mask"][b].bool()][None]
        single = forward(model, alone, config)
        valid = inputs["attention_mask"][b].bool()
        assert (ours.logits[b, valid] - single.logits[0]).abs().max() <= TOLERANCE


def test_visionzip_is_refused_outside_our_llava_class(family):
    name, stock, model = family
    inputs = batch(name, stock, samples_for(name)[:1])
    with pytest.raises(ValueError, match="needs our LLaVA class"):
        model(**inputs, exit_config=ExitRequest("stages", stages="visionzip:2:1").expand())


def test_a_callers_empty_cache_is_the_one_filled(family):
    name, stock, model = family
    inputs = batch(name, stock, samples_for(name))
    cache = VisualExitCache()
    with torch.no_grad():
        out = model.generate(**inputs, exit_config=ExitRequest("fixed", layer=1).expand(), max_new_tokens=2,
                             min_new_tokens=2, do_sample=False, pad_token_id=TEXT["pad_token_id"],
                             return_dict_in_generate=True, **cache_argument(cache))
    assert cache.get_seq_length() == inputs["input_ids"].shape[1] + 1  # the prompt and the first new token
    assert len(cache.valid_keys) == model.config.get_text_config().num_hidden_layers  # one per layer: the exit wrote them
    assert out.exit_stats.exit_layer.tolist() == [1 if visual else 0 for visual in visual_mask(inputs).any(dim=1)]
