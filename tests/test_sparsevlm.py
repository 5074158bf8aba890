"""SparseVLM (`sparsevlm:LAYERS:COUNTS`, recycling; `sparsevlm-drop:LAYERS:COUNTS`, without) against its
definition, recomputed here in plain torch and Python loops on the stock layers (docs/DESIGN.md §2): raters from
the input embeddings; at each pruning layer ℓ the raters' rows of transformers' own eager attention map of layer ℓ,
on the sequence with the earlier decisions in force, rank the visual tokens; the recycled ones are clustered by
DPC-kNN written out pair by pair. The oracle runs the stock layers on the full sequence with the keys of the tokens
that left masked after their layer and, after layer ℓ, each cluster center's state replaced by its members' mean
(a forward hook). On our LLaVA class and on transformers' llava-hf and Qwen2-VL (M-RoPE) classes."""

import math
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from llava.mm_utils import tokenizer_image_token
from llava.model.visual_exit import ExitRequest
from llava.model.visual_exit.stages.sparsevlm import text_raters
from llava.model.visual_exit.tokens import TokenLayout

from batching import attention_implementation
from families import FAMILIES, M_ROPE, Sample, batch, exit_model, masked_stock_forward, sample_inputs, stock_model, visual_mask
from test_fastv import run
from test_visual_exit import PROMPTS, batch_inputs, images_for, masked_reference_logits_by_token, text_positions

# The last sample has no text after its image: no raters, so it keeps every visual token.
LLAVA_PROMPTS = PROMPTS + [("USER: a picture <image>", 1)]
TOLERANCE = 1e-5


def sparsevlm(layers, counts, mode):
    name = "sparsevlm" if mode == "recycle" else "sparsevlm-drop"
    return ExitRequest("stages", stages=f"{name}:{'-'.join(map(str, layers))}:{'-'.join(map(str, counts))}:keep").expand()


def reference_raters(embeddings, valid, visual):
    """Per sample, the text slots after its last visual token whose softmax-over-text relation to the visual
    embeddings, averaged over the visual tokens, is above the mean (all of them when none is)."""
    raters = []
    for b in range(len(valid)):
        image = visual[b].nonzero().flatten().tolist()
        text = [t for t in valid[b].nonzero().flatten().tolist() if image and t > max(image)]
        if not text:
            raters.append([])
            continue
        score = (embeddings[b, image].float() @ embeddings[b, text].float().T).softmax(dim=1).mean(dim=0).tolist()
        above = [t for t, s in zip(text, score) if s > sum(score) / len(score)]
        raters.append(above or text)
    return raters


def reference_clusters(states):
    """DPC-kNN pair by pair on the (n, C) states: {center: members}, indices into states (equal densities: the
    earlier token is the denser)."""
    n, channels = states.shape
    k = n // 10 + 1
    d = [[float((states[i] - states[j]).norm()) / math.sqrt(channels) for j in range(n)] for i in range(n)]
    density = [math.exp(-sum(v * v for v in sorted(row)[:k]) / k) for row in d]
    farthest = max(max(row) for row in d)
    denser = [[density[j] > density[i] or density[j] == density[i] and j < i for j in range(n)] for i in range(n)]
    parent = [min([d[i][j] for j in range(n) if denser[i][j]], default=farthest) for i in range(n)]
    centers = sorted(range(n), key=lambda i: (-parent[i] * density[i], i))[:k]
    clusters = {center: [] for center in centers}
    for i in range(n):
        clusters[i if i in clusters else min(centers, key=lambda c: d[i][c])].append(i)
    return clusters


@contextmanager
def recycling_hooks(layers, rewrites, captured):
    """Forward hooks on the stock decoder layers: layer 0's input goes to captured["input"], layer ℓ's output to
    captured[ℓ]; then each (b, center, members) of rewrites[ℓ] gives the center the members' mean state."""

    def capture_input(module, args, kwargs):
        captured["input"] = args[0] if args else kwargs["hidden_states"]

    def after(index):
        def hook(module, args, output):
            captured[index] = output
            if index not in rewrites:
                return output
            rewritten = output.clone()
            for b, center, members in rewrites[index]:
                rewritten[b, center] = output[b, members].mean(dim=0)
            return rewritten

        return hook

    handles = [layers[0].register_forward_pre_hook(capture_input, with_kwargs=True)]
    handles += [layer.register_forward_hook(after(index)) for index, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def reference_decisions(run_stock, layers, valid, visual, prune_layers, counts, recycle):
    """SparseVLM from its definition: (gone_from, rewrites, raters). gone_from[b, t]: the first layer that no longer
    sees token t; rewrites[ℓ]: (b, center, members) after layer ℓ. `run_stock(gone_from, attention_layer)` runs the
    stock layers (under `recycling_hooks`) and returns that layer's eager (B, heads, T, T) attention."""
    num_layers = len(layers)
    gone_from = torch.full(visual.shape, num_layers)
    rewrites, captured, raters = {}, {}, None
    with recycling_hooks(layers, rewrites, captured):
        for layer, count in zip(prune_layers, counts):
            if layer == num_layers - 1:
                break
            probabilities = run_stock(gone_from, layer)
            raters = raters or reference_raters(captured["input"], valid, visual)
            for b in range(len(valid)):
                present = [t for t in visual[b].nonzero().flatten().tolist() if gone_from[b, t] > layer]
                if not raters[b] or not present:
                    continue
                score = probabilities[b][:, raters[b]].mean(dim=0).mean(dim=0).tolist()
                dropped = sorted(present, key=lambda t: (-score[t], t))[min(count, len(present) - 1) :]
                stay = set()
                if recycle:
                    recycled = sorted(dropped[: int(0.3 * len(dropped)) + 1])
                    for center, members in reference_clusters(captured[layer][b, recycled]).items():
                        rewrites.setdefault(layer, []).append((b, recycled[center], [recycled[m] for m in members]))
                        stay.add(recycled[center])
                for t in set(dropped) - stay:
                    gone_from[b, t] = layer + 1
    return gone_from, rewrites, raters


def oracle(run_stock, layers, gone_from, rewrites):
    """The stock logits with those decisions: keys masked after their layer, centers rewritten."""
    with recycling_hooks(layers, rewrites, {}):
        return run_stock(gone_from, None)


@pytest.fixture
def kept_slots(monkeypatch):
    """Per drop the exit carries out, per sample: the input slots that stay (read off the layout it makes)."""
    kept = []
    drop = TokenLayout.drop

    def recording(self, hidden, mask, order=None, **kwargs):
        hidden, layout = drop(self, hidden, mask, order, **kwargs)
        kept.append([layout.origin[b][layout.valid_keys.valid[b]].tolist() for b in range(len(mask))])
        return hidden, layout

    monkeypatch.setattr(TokenLayout, "drop", recording)
    return kept


def expected_kept(valid, gone_from, prune_layers, num_layers):
    return [
        [[t for t in valid[b].nonzero().flatten().tolist() if gone_from[b, t] > layer + 1] for b in range(len(valid))]
        for layer in prune_layers
        if layer < num_layers - 1
    ]


def llava_stock(model, mm):
    """`run_stock` for our LLaVA class: its stock layers on the full sequence (test_visual_exit's oracle)."""

    def run_stock(gone_from, attention_layer):
        logits, probabilities = masked_reference_logits_by_token(model, mm, gone_from, attention_layer)
        return logits if attention_layer is None else probabilities

    return run_stock


def check_outcome(out, valid, text, gone_from, expected_logits):
    """Text logits, the tokens that left, what entered each layer and its FLOPs."""
    geometry = out.exit_stats.geometry
    assert (out.logits[text] - expected_logits[text]).abs().max() <= TOLERANCE
    left = gone_from < geometry.layers
    assert out.exit_stats.pruned_visual_tokens.tolist() == left.sum(dim=1).tolist()
    entering = [[int((valid[b] & (gone_from[b] > i)).sum()) for i in range(geometry.layers)] for b in range(len(valid))]
    assert out.exit_stats.layer_tokens.tolist() == entering
    assert torch.equal(out.exit_stats.prefill_flops, geometry.layer_flops(out.exit_stats.layer_tokens).sum(dim=1))


@pytest.mark.parametrize("mode", ["recycle", "drop"])
@pytest.mark.parametrize(
    "attn, padding_side, use_cache", [("sdpa", "left", True), ("eager", "right", False)],
    ids=["sdpa-left-cache", "eager-right-no-cache"],
)
@pytest.mark.parametrize("prune_layers, counts", [((0, 1, 2), (12, 8, 1)), ((1, 3), (2, 1))], ids=["0-1-2", "1-3"])
def test_llava_equals_definition(loaded, images, kept_slots, mode, attn, padding_side, use_cache, prune_layers, counts):
    """`1-3`: two clusters for the two-image sample (30 pruned, 10 recycled); pruning after the last layer (3) is
    nothing."""
    tokenizer, model, _, _ = loaded
    ids, mask = batch_inputs(tokenizer, LLAVA_PROMPTS, padding_side)
    pixels = images_for(images, LLAVA_PROMPTS)
    layers = model.get_model().layers
    with attention_implementation(model, attn), torch.no_grad():
        mm = model.prepare_inputs_labels_for_multimodal(ids, mask, None, pixels)
        valid = mm.attention_mask.bool()
        run_stock = llava_stock(model, mm)
        gone_from, rewrites, raters = reference_decisions(
            run_stock, layers, valid, mm.visual_mask, prune_layers, counts, mode == "recycle"
        )
        out = run(model, ids, mask, pixels, sparsevlm(prune_layers, counts, mode), use_cache)
        expected_logits = oracle(run_stock, layers, gone_from, rewrites)
    layout = SimpleNamespace(valid_keys=SimpleNamespace(valid=valid), visual=mm.visual_mask)
    ours = text_raters(mm.inputs_embeds, layout)
    assert [row.nonzero().flatten().tolist() for row in ours] == raters
    assert [len(r) for r in raters][3:] == [1, 0]  # one text token after the image rates; none, nothing rates
    assert kept_slots == expected_kept(valid, gone_from, prune_layers, len(layers))
    if mode == "recycle" and prune_layers == (1, 3):
        assert len([r for r in rewrites[1] if r[0] == 2]) == 2
    check_outcome(out, valid, text_positions(mm), gone_from, expected_logits)
    assert out.exit_stats.prune_layer == prune_layers[0] + 1  # layer ℓ's output: after its first ℓ + 1 layers


def test_counts_beyond_the_visual_tokens_keep_all_but_one(loaded, images):
    """min(count, n_v − 1): `sparsevlm-drop` loses the lowest-scored token per pruning layer; recycled, that one is
    its own cluster and stays as it was, so the model is mode none."""
    tokenizer, model, _, _ = loaded
    ids, mask = batch_inputs(tokenizer, LLAVA_PROMPTS, "left")
    pixels = images_for(images, LLAVA_PROMPTS)
    none = run(model, ids, mask, pixels, ExitRequest("none").expand())
    recycled = run(model, ids, mask, pixels, sparsevlm((0, 2), (99, 99), "recycle"))
    dropped = run(model, ids, mask, pixels, sparsevlm((0, 2), (99, 99), "drop"))
    with torch.no_grad():
        text = text_positions(model.prepare_inputs_labels_for_multimodal(ids, mask, None, pixels))
    assert (recycled.logits[text] - none.logits[text]).abs().max() <= TOLERANCE
    assert recycled.exit_stats.layer_tokens.tolist() == none.exit_stats.layer_tokens.tolist()
    assert recycled.exit_stats.pruned_visual_tokens.tolist() == [0] * len(LLAVA_PROMPTS)
    assert dropped.exit_stats.pruned_visual_tokens.tolist() == [2, 0, 2, 2, 0]
    assert (dropped.logits[text] - none.logits[text]).abs().max() > 1e-3


def test_count_zero_without_recycling_is_the_exit_after_that_layer(loaded, images):
    tokenizer, model, _, _ = loaded
    ids, mask = batch_inputs(tokenizer, PROMPTS, "left")
    pixels = images_for(images, PROMPTS)
    emptied, fixed = (run(model, ids, mask, pixels, c) for c in (sparsevlm((1,), (0,), "drop"), ExitRequest("fixed", 2).expand()))
    with torch.no_grad():
        text = text_positions(model.prepare_inputs_labels_for_multimodal(ids, mask, None, pixels))
    assert (emptied.logits[text] - fixed.logits[text]).abs().max() <= TOLERANCE
    assert emptied.exit_stats.exit_layer.tolist() == fixed.exit_stats.exit_layer.tolist() == [2, 0, 2, 2]
    assert emptied.exit_stats.pruned_visual_tokens.tolist() == [0] * len(PROMPTS)


def test_llava_batch_equals_alone_and_cached_decoding_equals_the_oracle(loaded, images):
    """Left-padded greedy generation in a batch == each sample alone; its tokens == the argmax of the oracle run
    without a cache on prompt + answer, with the prompt's decisions (generated tokens never leave)."""
    tokenizer, model, _, _ = loaded
    config = sparsevlm((0, 1, 2), (12, 8, 1), "recycle")
    ids, mask = batch_inputs(tokenizer, LLAVA_PROMPTS, "left")
    pixels = images_for(images, LLAVA_PROMPTS)
    steps = 4
    settings = dict(do_sample=False, max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0, exit_config=config)
    layers = model.get_model().layers
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, images=pixels, return_dict_in_generate=True, **settings)
        offset = 0
        for b, (prompt, count) in enumerate(LLAVA_PROMPTS):
            row = tokenizer_image_token(prompt, tokenizer)
            sample = pixels[offset : offset + count] if count else None
            offset += count
            alone = model.generate(torch.tensor([row]), images=sample, return_dict_in_generate=True, **settings)
            assert batched.sequences[b].tolist() == alone.sequences[0].tolist()
            assert batched.exit_stats.prefill_flops[b] == alone.exit_stats.prefill_flops[0]
            if count != 1:
                continue
            row_ids = torch.tensor([row])
            prompt_mm = model.prepare_inputs_labels_for_multimodal(row_ids, torch.ones_like(row_ids), None, sample)
            gone_from, rewrites, _ = reference_decisions(
                llava_stock(model, prompt_mm), layers, prompt_mm.attention_mask.bool(), prompt_mm.visual_mask,
                (0, 1, 2), (12, 8, 1), True,
            )
            full = torch.tensor([row + alone.sequences[0, :-1].tolist()])
            mm = model.prepare_inputs_labels_for_multimodal(full, torch.ones_like(full), None, sample)
            gone_from = torch.cat([gone_from, torch.full((1, steps - 1), len(layers))], dim=1)
            logits = oracle(llava_stock(model, mm), layers, gone_from, rewrites)
            start = prompt_mm.visual_mask.shape[1] - 1
            assert logits[0, start:].argmax(dim=-1).tolist() == alone.sequences[0].tolist()


# Qwen2-VL grids (h, w) of 8 and 36 visual tokens: 30 pruned at layer 0 recycle 10 tokens into two clusters.
FAMILY_SAMPLES = {
    "llava-hf": [Sample(3, [None], 4), Sample(2, [None, None], 6), Sample(7, [], 3)],
    "qwen2-vl": [Sample(3, [(4, 8)], 4), Sample(2, [(12, 12)], 6), Sample(7, [], 3)],
    "qwen3-vl": [Sample(3, [(4, 8)], 4), Sample(2, [(12, 12)], 6), Sample(7, [], 3)],
    "llava-onevision-1.5": [Sample(3, [(4, 8)], 4), Sample(2, [(12, 12)], 6), Sample(7, [], 3)],
    "gemma3": [Sample(3, [None], 4), Sample(2, [None, None], 6), Sample(7, [], 3)],
}
FAMILY_SAMPLES = {name: samples for name, samples in FAMILY_SAMPLES.items() if name in FAMILIES}


@pytest.mark.parametrize("mode", ["recycle", "drop"])
@pytest.mark.parametrize("name", list(FAMILY_SAMPLES))
def test_family_equals_definition_and_batch_equals_alone(kept_slots, name, mode):
    stock = stock_model(name)
    model = exit_model(stock, gate_hidden_size=None)
    samples = FAMILY_SAMPLES[name]
    inputs = batch(name, stock, samples)
    prune_layers, counts = (0, 1, 2), (6, 3, 1)
    layers = stock.model.language_model.layers
    valid = inputs["attention_mask"].bool()

    def run_stock(gone_from, attention_layer):
        out = masked_stock_forward(stock, inputs, gone_from, output_attentions=attention_layer is not None)
        return out.logits if attention_layer is None else out.attentions[attention_layer]

    gone_from, rewrites, _ = reference_decisions(
        run_stock, layers, valid, visual_mask(inputs), prune_layers, counts, mode == "recycle"
    )
    expected_logits = oracle(run_stock, layers, gone_from, rewrites)
    model.set_attn_implementation("sdpa")
    config = sparsevlm(prune_layers, counts, mode)
    with torch.no_grad():
        out = model(**inputs, exit_config=config)
    assert kept_slots == expected_kept(valid, gone_from, prune_layers, len(layers))
    check_outcome(out, valid, valid & ~visual_mask(inputs), gone_from, expected_logits)
    if mode == "recycle" and name in M_ROPE:
        assert len([r for r in rewrites[0] if r[0] == 1]) == 2
    for b in range(len(samples)):
        with torch.no_grad():
            alone = model(**sample_inputs(name, stock, inputs, samples, b), exit_config=config)
        assert (out.logits[b, valid[b]] - alone.logits[0]).abs().max() <= TOLERANCE
        assert out.exit_stats.layer_tokens[b].tolist() == alone.exit_stats.layer_tokens[0].tolist()


def test_specs_say_what_is_wrong(loaded, images):
    for spec, message in [
        ("sparsevlm:2-6-15:300-200-110:drop", "positions 'drop': expected renumber or keep"),
        ("sparsevlm:2-6-15:300-200-110:keep:1", r"expected sparsevlm:LAYERS:COUNTS\[:renumber\|keep\]"),
        ("sparsevlm-drop:2-6-15", r"expected sparsevlm-drop:LAYERS:COUNTS\[:renumber\|keep\]"),
        ("sparsevlm:2-6-15:300-200", "3 layers need 3 keep counts, got 300-200"),
        ("sparsevlm:6-2:300-200", "layers 6-2 must increase"),
        ("sparsevlm-drop:2-2:300-200", "layers 2-2 must increase"),
        ("sparsevlm:2:-1", "keep counts '-1': expected non-negative integers joined by '-'"),
        ("sparsevlm:2-:1", "layers '2-': expected"),
        ("sparsevlm-drop:two:1", "'two' is not an integer"),
    ]:
        with pytest.raises(ValueError, match=message):
            ExitRequest("stages", stages=spec).expand()
    tokenizer, model, _, _ = loaded
    ids, mask = batch_inputs(tokenizer, PROMPTS[:1])
    with pytest.raises(ValueError, match=r"sparsevlm layer 4 is not one of the model's layers 0\.\.3"):
        run(model, ids, mask, images[:1], sparsevlm((1, 4), (8, 4), "drop"))
    assert ExitRequest("stages", stages="sparsevlm:2-6-15:300-200-110").expand().label == "sparsevlm-2-6-15-300-200-110"
