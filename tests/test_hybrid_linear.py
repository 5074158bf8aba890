"""The exit on a hybrid decoder (Qwen3.5: Gated DeltaNet linear layers between full-attention ones).

Masking a token is not removing it in a linear layer (its recurrence decays over the masked slot and its
convolution carries the tokens before it), so the oracle here is removal itself: the stock model, each sample alone,
with a hook that takes each token out of the sequence before the first layer that no longer sees it — hidden
states, rotary embeddings, positions and the full layers' mask shortened alike — so that every stock layer after it
runs on the shortened sequence. FastV's ranking comes from the stock eager attention map of a full layer.
"""

import pytest
import torch

from llava.model.visual_exit import ExitRequest

from families import (
    FAMILIES, HYBRID, TEXT, Sample, batch, exit_model, greedy_with_and_without_cache, sample_inputs, stock_model,
    visual_mask,
)

LAYERS = TEXT["num_hidden_layers"]
TOLERANCE = 1e-5
# The longest sample has the most visual tokens: after they leave, it is padded in front of its own first token,
# whose states a linear layer must not read (it gets the compacted layout's padding mask).
SAMPLES = [Sample(3, [(2, 4)], 4), Sample(2, [(4, 4), (2, 4)], 6), Sample(14, [], 3)]


@pytest.fixture(scope="module", params=[name for name in HYBRID if name in FAMILIES])
def family(request):
    stock = stock_model(request.param)
    return request.param, stock, exit_model(stock, gate_hidden_size=None)


def removal_oracle(stock, alone: dict, gone_from: torch.Tensor) -> torch.Tensor:
    """Logits (T_kept, V) of the tokens every layer keeps, for one unpadded sample: token t leaves the sequence
    before layer gone_from[t] (LAYERS: never)."""
    layers = stock.model.language_model.layers
    order = torch.arange(len(gone_from))
    present = {"slots": order}  # original index of each slot now in the sequence

    def shorten(layer_index):
        def hook(module, args, kwargs):
            keep = order[gone_from > layer_index]
            rows = torch.searchsorted(present["slots"], keep)  # keep ⊆ present, both sorted
            present["slots"] = keep
            hidden = args[0][:, rows]
            cos, sin = kwargs["position_embeddings"]
            kwargs["position_embeddings"] = (cos[..., keep, :], sin[..., keep, :])
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"][..., keep]
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 4:
                kwargs["attention_mask"] = mask[:, :, keep][..., keep]
            return (hidden, *args[1:]), kwargs

        return hook

    handles = [layer.register_forward_pre_hook(shorten(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            return stock(**alone, use_cache=False).logits[0]
    finally:
        for handle in handles:
            handle.remove()


def check_against_removal(stock, inputs, ours, gone_from_of):
    """Per sample: our batched logits at the tokens that stay to the end == the removal oracle alone."""
    valid = inputs["attention_mask"].bool()
    for b in range(len(SAMPLES)):
        alone = sample_inputs("qwen3.5", stock, inputs, SAMPLES, b)
        gone_from = gone_from_of(b, alone)
        expected = removal_oracle(stock, alone, gone_from)
        kept = gone_from == LAYERS
        assert (ours.logits[b, valid[b]][kept] - expected).abs().max() <= TOLERANCE, b


@pytest.mark.parametrize("layer", [0, 1, 2, 3])  # exits after linear and after full layers
def test_fixed_exit_equals_the_stock_layers_on_the_shortened_sequence(family, layer):
    name, stock, model = family
    inputs = batch(name, stock, SAMPLES)
    with torch.no_grad():
        ours = model(**inputs, exit_config=ExitRequest("fixed", layer).expand())
    check_against_removal(
        stock, inputs, ours,
        lambda b, alone: torch.where(visual_mask(alone)[0], layer, LAYERS),
    )


def test_masking_is_not_removal_here(family):
    """Why the oracle differs from every other family's: the stock model with the visual keys merely masked from
    layer 1 gives other text logits than their removal."""
    name, stock, model = family
    inputs = batch(name, stock, SAMPLES[:1])
    with torch.no_grad():
        removed = model(**inputs, exit_config=ExitRequest("fixed", 1).expand()).logits[0]
        masked_inputs = dict(inputs, attention_mask=inputs["attention_mask"] * ~visual_mask(inputs))
        masked = stock(**masked_inputs).logits[0]
    after_image = torch.arange(removed.shape[0]) > int(visual_mask(inputs)[0].nonzero().max())
    assert (removed - masked)[after_image].abs().max() > 1e-3


def test_fastv_at_a_full_layer_equals_the_stock_ranking_and_removal(family):
    """FastV with K = 2 ranks by layer 1's attention (a full layer here) and prunes half the visual tokens."""
    name, stock, model = family
    inputs = batch(name, stock, SAMPLES)
    with torch.no_grad():
        ours = model(**inputs, exit_config=ExitRequest("fastv", fastv_k=2, fastv_r=0.5).expand())

    full_layers = [i for i, kind in enumerate(stock.config.text_config.layer_types) if kind == "full_attention"]

    def ranked(b, alone):
        with torch.no_grad():  # the stock model returns the maps of its full layers only
            attention = stock(**alone, output_attentions=True).attentions[full_layers.index(1)][0]  # (heads, T, T)
        scores = attention[:, -1].mean(dim=0).tolist()
        visual = visual_mask(alone)[0].nonzero().flatten().tolist()
        by_score = sorted(visual, key=lambda t: -scores[t])
        gone_from = torch.full((len(scores),), LAYERS)
        gone_from[by_score[round(0.5 * len(by_score)) :]] = 2
        return gone_from

    check_against_removal(stock, inputs, ours, ranked)
    assert ours.exit_stats.pruned_visual_tokens.tolist() == [1, 3, 0]  # half of 2 and of 4 + 2


def test_methods_that_rank_by_attention_refuse_a_linear_layer(family):
    name, stock, model = family
    inputs = batch(name, stock, SAMPLES[:1])
    with pytest.raises(ValueError, match="decoder layer 0 .0-based. has no softmax attention"), torch.no_grad():
        model(**inputs, exit_config=ExitRequest("fastv", fastv_k=1, fastv_r=0.5).expand())  # ranks by layer 0: linear


def test_cached_decode_keeps_the_linear_layers_states(family):
    """Greedy decoding with the cache (recurrent and conv states for the linear layers, keys for the full ones)
    gives the tokens of recomputing prompt + answer without a cache, the exit held at the prompt's layer."""
    name, stock, model = family
    cached, recomputed = greedy_with_and_without_cache(model, batch(name, stock, SAMPLES), ExitRequest("fixed", 1).expand(), steps=5)
    assert torch.equal(cached, recomputed)
