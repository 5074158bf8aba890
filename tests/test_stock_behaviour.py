"""The exit classes keep what the stock classes do, on every family, against the stock class with the same weights
(fp32, 1e-5): packed inputs (several sequences in one row, positions restarting, no mask), `return_dict=False`,
`from_pretrained(..., output_loading_info=True)`, `inputs_embeds`, gates missing from a checkpoint; and refuse in
one line what they cannot do (4-D masks, a `cache_implementation` other than static or dynamic)."""

import math

import pytest
import torch
from transformers import GenerationConfig

from llava.model.visual_exit import ExitRequest, visual_exit_class

from families import ANYRES, FAMILIES, HYBRID, M_ROPE, TEXT, TYPE_KEYS, Sample, batch, exit_model, stock_model
from test_families import SIZES, sample_dependent_gates, zero_gates

TOLERANCE = 1e-5


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    stock = stock_model(request.param)
    model = exit_model(stock)
    zero_gates(model)
    return request.param, stock, model


def packing_samples(name):
    """Three sequences: two images, none, one image (anyres families: one image at most)."""
    small, large = SIZES[name]
    two = [small] if name in ANYRES else [small, large]
    return [Sample(3, two, 4), Sample(5, [], 3), Sample(2, [large], 6)]


def rope_rows(stock, inputs):
    """The (3, 1, T) M-RoPE positions the stock model builds for one unpadded sequence."""
    captured = {}

    def capture(module, args, kwargs):
        captured["positions"] = kwargs["position_ids"]

    hook = stock.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            stock(**inputs, use_cache=False)
    finally:
        hook.remove()
    positions = captured["positions"]
    if positions is None:  # no image: the text model numbers the tokens itself
        positions = torch.arange(inputs["input_ids"].shape[1])[None]
    return positions[-3:] if positions.dim() == 3 else positions[None].expand(3, -1, -1)


def packed(name, stock, samples):
    """(one row holding every sample, each sample alone): the row's positions restart for each sequence (M-RoPE:
    a text row in front of each sequence's own three rows, as the stock text model reads packed input)."""
    alone = [batch(name, stock, [sample]) for sample in samples]
    row = {"input_ids": torch.cat([a["input_ids"] for a in alone], dim=1)}
    text = torch.cat([torch.arange(a["input_ids"].shape[1]) for a in alone])[None]
    if name in M_ROPE:
        row["position_ids"] = torch.cat([text[None], torch.cat([rope_rows(stock, a) for a in alone], dim=-1)])
    else:
        row["position_ids"] = text
    for key in TYPE_KEYS:
        if key in alone[0]:
            row[key] = torch.cat([a[key] for a in alone], dim=1)
    for key in alone[0]:
        if key not in ("input_ids", "attention_mask", *TYPE_KEYS):
            pixels = [a[key] for a in alone if key in a]
            if name in ANYRES and key == "pixel_values":  # tile stacks padded to the most tiles, as collated
                widest = max(p.shape[1] for p in pixels)
                pixels = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, widest - p.shape[1])) for p in pixels]
            row[key] = torch.cat(pixels)
    for a in alone:
        a.pop("attention_mask")
    return row, alone


# Where the stock class lets packed sequences change each other's logits (0.07-0.5 here): Gemma 3 given
# token_type_ids on transformers 5.25 (not 5.17), Qwen3.5 on both (its linear layers' recurrence and convolution run
# on across the restarts unless given cu_seq_lens).
STOCK_PACKING_LEAKS = ("gemma3", "qwen3.5")


def test_packed_inputs_equal_stock_and_each_sequence_alone(family):
    name, stock, model = family
    row, alone = packed(name, stock, packing_samples(name))
    with torch.no_grad():
        reference = stock(**row, use_cache=False).logits
        ours = model(**row, use_cache=False, exit_config=ExitRequest("none").expand()).logits
    alone_logits = torch.cat([stock(**a, use_cache=False).logits for a in alone], dim=1)
    assert (ours - alone_logits).abs().max() <= TOLERANCE
    # the stock class sees each sequence alone too, but where it is known not to
    assert (reference - alone_logits).abs().max() <= TOLERANCE or name in STOCK_PACKING_LEAKS
    sample_dependent_gates(model)
    try:
        fastv_k = 2 if name in HYBRID else 1  # ranked by a full-attention layer
        for config in (ExitRequest("fixed", 1).expand(), ExitRequest("dynamic").expand(), ExitRequest("fastv", fastv_k=fastv_k, fastv_r=0.5).expand()):
            with torch.no_grad():
                out = model(**row, use_cache=False, exit_config=config)
                each = [model(**a, use_cache=False, exit_config=config) for a in alone]
            assert (out.logits - torch.cat([e.logits for e in each], dim=1)).abs().max() <= TOLERANCE, config.label
            # one row of statistics per packed sequence: each decided on its own
            assert out.exit_stats.exit_layer.tolist() == [e.exit_stats.exit_layer.item() for e in each], config.label
    finally:
        zero_gates(model)


def test_return_dict_false_gives_the_stock_tuple(family):
    name, stock, model = family
    inputs = batch(name, stock, packing_samples(name)[:2])
    with torch.no_grad():
        reference = stock(**inputs, return_dict=False)
        ours = model(**inputs, return_dict=False, exit_config=ExitRequest("none").expand())
    assert isinstance(ours, tuple) and len(ours) == len(reference)
    valid = inputs["attention_mask"].bool()
    assert (ours[0] - reference[0])[valid].abs().max() <= TOLERANCE


def test_output_loading_info_and_gates_a_checkpoint_lacks(family, tmp_path):
    """Loading info comes back as the stock class gives it; gates the checkpoint lacks (its config names their
    width) get the reference's Xavier-uniform initialisation, not the stock linears' normal one."""
    name, stock, _ = family
    stock.config.get_text_config().visual_gate_hidden_size = 32
    try:
        stock.save_pretrained(tmp_path)
    finally:
        del stock.config.get_text_config().visual_gate_hidden_size
    loaded, info = visual_exit_class(type(stock)).from_pretrained(tmp_path, output_loading_info=True)
    assert set(info) >= {"missing_keys", "unexpected_keys"}
    weight = loaded.model.language_model.visual_gates_router[0].w1.weight
    fan_out, fan_in = weight.shape
    bound = math.sqrt(6 / (fan_in + fan_out))
    assert weight.abs().max() <= bound and weight.std() > 0.8 * bound / math.sqrt(3)


def test_inputs_embeds_find_the_visual_tokens_as_the_stock_forward_does(family):
    name, stock, model = family
    inputs = batch(name, stock, packing_samples(name)[:2])
    if name in M_ROPE:  # the stock model builds M-RoPE rows from ids only: both runs get them given
        inputs["position_ids"] = rope_rows(stock, inputs)
    ids = inputs.pop("input_ids")
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad():
        reference = stock(inputs_embeds=embeds, **inputs).logits
        none = model(inputs_embeds=embeds, exit_config=ExitRequest("none").expand(), **inputs)
        by_ids = model(input_ids=ids, exit_config=ExitRequest("fixed", 1).expand(), **inputs)
        by_embeds = model(inputs_embeds=embeds, exit_config=ExitRequest("fixed", 1).expand(), **inputs)
    valid = inputs["attention_mask"].bool()
    assert (none.logits - reference)[valid].abs().max() <= TOLERANCE
    assert (by_embeds.logits - by_ids.logits)[valid].abs().max() <= TOLERANCE
    assert by_embeds.exit_stats.num_visual_tokens.tolist() == by_ids.exit_stats.num_visual_tokens.tolist()


def test_what_cannot_work_is_refused_in_one_line(family):
    name, stock, model = family
    inputs = batch(name, stock, packing_samples(name)[:1])
    length = inputs["input_ids"].shape[1]
    four_d = torch.ones(1, 1, length, length, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match=r"the exit builds each layer's mask from a 2-D padding mask"), torch.no_grad():
        model(**{**inputs, "attention_mask": four_d}, exit_config=ExitRequest("fixed", 1).expand())
    with pytest.raises(ValueError, match=r"cache_implementation='offloaded': the exit's layers cache different tokens"):
        model.generate(**inputs, cache_implementation="offloaded", max_new_tokens=2, pad_token_id=TEXT["pad_token_id"])
    saved = model.generation_config
    model.generation_config = GenerationConfig(cache_implementation="offloaded", pad_token_id=TEXT["pad_token_id"])
    try:
        with pytest.raises(ValueError, match="cache_implementation='offloaded'.*use 'static'"):
            model.generate(**inputs, max_new_tokens=2)
    finally:
        model.generation_config = saved


@pytest.mark.parametrize("spec", ["none", "dynamic", "fastv", "pdrop", "sparsevlm", "divprune"])
def test_generate_without_a_cache_keeps_the_prompts_decisions(family, spec):
    """use_cache=False recomputes prompt + answer at every step; the exit decided on the prompt holds throughout
    (recorded at the first step, replayed after), so the ids are those of cached decoding."""
    name, stock, model = family
    small, _ = SIZES[name]
    inputs = batch(name, stock, [Sample(3, [small], 4), Sample(5, [], 3), Sample(2, [small], 6)])
    keep = ":keep" if name in M_ROPE else ""
    # Hybrid decoders rank by attention only in their full layers (Qwen3.5 here: 1 and 3).
    fastv_k, pdrop_layers, sparsevlm_layers = (2, "1", "1:3") if name in HYBRID else (1, "1-2", "0-1:3-2")
    config = {"none": ExitRequest("none").expand(), "dynamic": ExitRequest("dynamic").expand(),
              "fastv": ExitRequest("fastv", fastv_k=fastv_k, fastv_r=0.5).expand(),
              "pdrop": ExitRequest("stages", stages=f"pdrop:{pdrop_layers}:0.5" + keep).expand(),
              "sparsevlm": ExitRequest("stages", stages=f"sparsevlm:{sparsevlm_layers}" + keep).expand(),
              "divprune": ExitRequest("stages", stages="divprune:0.5" + keep).expand()}[spec]
    sample_dependent_gates(model)
    try:
        outputs = []
        for use_cache in (True, False):
            with torch.no_grad():
                outputs.append(model.generate(**inputs, exit_config=config, use_cache=use_cache, max_new_tokens=4,
                                              min_new_tokens=4, do_sample=False, pad_token_id=TEXT["pad_token_id"],
                                              return_dict_in_generate=True))
    finally:
        zero_gates(model)
    cached, recomputed = outputs
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert cached.exit_stats.exit_layer.tolist() == recomputed.exit_stats.exit_layer.tolist()
