"""DivPrune against its official definition (BASELINES.md §10.1), re-computed here in plain torch one sample at a
time as its code runs it, on the stock model's own input embeddings; the outcome against the stock language model
run on the sequence kept, positions numbered again (LLaVA's position_ids are None after the official gather)."""

import pytest
import torch

from llava.model.visual_exit import ExitRequest
from llava.model.visual_exit.budget import Budget
from llava.model.visual_exit.stages import parse_stages
from llava.model.visual_exit.stages.divprune import DivPrune, diverse_subset

from families import (
    FAMILIES, M_ROPE, Sample, batch, exit_model, greedy_with_and_without_cache, sample_inputs, stock_model, visual_mask,
)

TOLERANCE = 1e-5


def official_selection(vectors: torch.Tensor, share: float) -> list[int]:
    """The picked row indices of `vectors` (N, H), in picking order: first the row whose nearest neighbour (by
    1 - cosine) is farthest, then each time the row farthest from every row picked so far; no row is excluded."""
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    distance = 1.0 - unit @ unit.t()
    picked = []
    for step in range(int(round(share * len(vectors)))):
        if step == 0:
            scores = distance.sort(dim=0).values[1]
        else:
            scores = distance[picked].min(dim=0).values
        picked.append(int(scores.argmax()))
    return picked


@pytest.mark.parametrize("share", [0.0, 0.1, 1 / 3, 0.5, 1.0])
def test_batched_selection_equals_the_official_one_per_sample(share):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(3, 40, 16, generator=generator)
    visual = torch.zeros(3, 40, dtype=torch.bool)
    visual[0, 5:30], visual[1, 2:38:2], visual[2, 10:11] = True, True, True  # 25, 18 and 1 visual tokens
    features[1, 8] = features[1, 4]  # an exact duplicate: one of the two is never needed
    kept = diverse_subset(features, visual, share)
    for b in range(3):
        slots = visual[b].nonzero().flatten()
        picked = official_selection(features[b, slots], share) if len(slots) > 1 else list(range(round(share * len(slots))))
        # Deviation: a row the official loop picks twice (its own distance, 1 - cos(x, x), rounds above an exact
        # duplicate's) is a token it keeps twice in the sequence; here a token is kept once.
        assert kept[b].nonzero().flatten().tolist() == sorted(set(slots[picked].tolist()))
    assert int(kept[1].sum()) == round(share * 18) - (share == 1.0)  # at 1.0 the official picks one row twice


def test_the_spec_and_the_budgets():
    assert parse_stages("divprune:0.098") == (DivPrune(0.098),)
    assert parse_stages("divprune:0.5:keep") == (DivPrune(0.5, renumbers=False),)
    for rule in ("paper", "equal"):  # before the LLM, a layer average is the count kept
        for tokens in (192, 128, 64):
            share = float(DivPrune.at_budget(Budget(tokens, rule, layers=32, visual=576)).split(":")[1])
            assert round(share * 576) == tokens  # 1/3, 2/9, 1/9 of 576
    assert DivPrune.at_budget(Budget(64, "equal", layers=32, visual=576)) == "divprune:0.1111111111"
    with pytest.raises(ValueError, match="1.5 lies outside"):
        parse_stages("divprune:1.5")


def captured_embeddings(stock, inputs: dict) -> torch.Tensor:
    """The stock model's input embeddings (B, T, H): what its language model is handed."""
    seen = {}

    def capture(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])

    hook = stock.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            stock(**inputs)
    finally:
        hook.remove()
    return seen["embeds"]


@pytest.mark.parametrize("name", [n for n in ("llava-hf", "internvl") if n in FAMILIES])
def test_family_equals_the_stock_model_on_the_kept_sequence(name):
    stock = stock_model(name)
    model = exit_model(stock, gate_hidden_size=None)
    samples = [Sample(3, [1 if name == "internvl" else None], 4), Sample(2, [2 if name == "internvl" else None] * 2, 6),
               Sample(7, [], 3)]
    inputs = batch(name, stock, samples)
    share = 0.5
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ours = model(**inputs, exit_config=ExitRequest("stages", stages=f"divprune:{share}").expand())
    valid = inputs["attention_mask"].bool()
    for b in range(len(samples)):
        alone = sample_inputs(name, stock, inputs, samples, b)
        embeds = captured_embeddings(stock, alone)[0]
        visual = visual_mask(alone)[0]
        slots = visual.nonzero().flatten()
        picked = set(slots[official_selection(embeds[slots], share)].tolist()) if len(slots) else set()
        keep = torch.tensor([not visual[t] or t in picked for t in range(len(visual))])
        kept = embeds[keep][None]
        with torch.no_grad():
            positions = torch.arange(kept.shape[1])[None]  # numbered again, as the official LLaVA code leaves them
            hidden = stock.model.language_model(inputs_embeds=kept, position_ids=positions).last_hidden_state
            logits = stock.lm_head(hidden)[0]
        text = ~visual[keep]
        assert (ours.logits[b, valid[b]][keep][text] - logits[text]).abs().max() <= TOLERANCE, b
        if len(slots) and not picked:  # round(0.5 · 1) = 0: nothing kept is an exit before layer 0
            assert int(ours.exit_stats.exit_layer[b]) == 0
        else:
            assert int(ours.exit_stats.pruned_visual_tokens[b]) == len(slots) - len(picked)


def test_m_rope_families_keep_positions_by_name():
    name = next(n for n in M_ROPE if n in FAMILIES)
    stock = stock_model(name)
    model = exit_model(stock, gate_hidden_size=None)
    inputs = batch(name, stock, [Sample(3, [(4, 4)], 4)])
    with pytest.raises(ValueError, match="add :keep"), torch.no_grad():
        model(**inputs, exit_config=ExitRequest("stages", stages="divprune:0.5").expand())
    with torch.no_grad():
        out = model(**inputs, exit_config=ExitRequest("stages", stages="divprune:0.5:keep").expand())
    assert out.exit_stats.pruned_visual_tokens.tolist() == [2]


# --- the downsampling control: each image's grid average-pooled before layer 0 -------------------------------------

def test_downsample_equals_the_stock_model_on_the_pooled_image():
    """llava-hf's 2 x 2 grids pooled to 1 x 1: the stock language model on each sample with each image replaced by
    the mean of its tokens (torch's adaptive average pooling of the grid), positions 0, 1, ... == ours, batched."""
    stock = stock_model("llava-hf")
    model = exit_model(stock, gate_hidden_size=None)
    samples = [Sample(3, [None], 4), Sample(2, [None], 6), Sample(7, [], 3)]  # two adjacent images make no square
    inputs = batch("llava-hf", stock, samples)
    with torch.no_grad():
        ours = model(**inputs, exit_config=ExitRequest("stages", stages="downsample:1").expand())
    valid = inputs["attention_mask"].bool()
    for b in range(len(samples)):
        alone = sample_inputs("llava-hf", stock, inputs, samples, b)
        embeds = captured_embeddings(stock, alone)[0]
        visual = visual_mask(alone)[0].tolist()
        rows, kept, t = [], [], 0
        while t < len(visual):
            if visual[t]:  # an image: its 4 tokens, pooled to 1 in the first one's place
                grid = embeds[t : t + 4].T.reshape(1, -1, 2, 2)
                rows.append(torch.nn.functional.adaptive_avg_pool2d(grid, 1).flatten())
                kept.append(t)
                t += 4
            else:
                rows.append(embeds[t])
                kept.append(t)
                t += 1
        sequence = torch.stack(rows)[None]
        with torch.no_grad():
            hidden = stock.model.language_model(inputs_embeds=sequence, position_ids=torch.arange(len(rows))[None])
            logits = stock.lm_head(hidden.last_hidden_state)[0]
        text = torch.tensor([not visual[t] for t in kept])
        assert (ours.logits[b, valid[b]][kept][text] - logits[text]).abs().max() <= TOLERANCE, b
    assert ours.exit_stats.pruned_visual_tokens.tolist() == [3, 3, 0]
    assert (ours.exit_stats.layer_tokens[:, 0] == ours.exit_stats.layer_tokens[:, -1]).all()


def test_downsample_budgets_and_what_it_refuses():
    assert [DownsampleSpec(tokens) for tokens in (192, 128, 64)] == ["downsample:14", "downsample:11", "downsample:8"]
    name = "internvl" if "internvl" in FAMILIES else None
    if name:  # tiles of one token each: no square grid per image
        stock = stock_model(name)
        model = exit_model(stock, gate_hidden_size=None)
        inputs = batch(name, stock, [Sample(3, [3], 4)])
        with pytest.raises(ValueError, match="3 visual tokens is no square grid"), torch.no_grad():
            model(**inputs, exit_config=ExitRequest("stages", stages="downsample:1").expand())


def DownsampleSpec(tokens: int) -> str:  # noqa: N802 (reads as the spec it returns)
    from llava.model.visual_exit.stages.downsample import Downsample

    return Downsample.at_budget(Budget(tokens, "paper", layers=32, visual=576))


def test_downsample_generates_alike_with_and_without_a_cache():
    """Without a cache every step recomputes prompt + answer and replays the prompt's pooled states (recorded before
    layer 0): the same greedy ids as cached decoding."""
    stock = stock_model("llava-hf")
    model = exit_model(stock, gate_hidden_size=None)
    inputs = batch("llava-hf", stock, [Sample(3, [None], 4), Sample(7, [], 3)])
    cached, recomputed = greedy_with_and_without_cache(model, inputs, ExitRequest("stages", stages="downsample:1").expand(), steps=4)
    assert torch.equal(cached, recomputed)
