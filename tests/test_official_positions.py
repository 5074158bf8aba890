"""PyramidDrop and SparseVLM as their official code runs them (`renumber`, the default): the oracle is the stock
decoder layers run, one sample at a time, on the sequence each method keeps, its rows numbered 0, 1, ... again
after every drop, SparseVLM's merged tokens behind the kept visual ones (in their centers' rank order); the
decisions are re-computed in plain torch from the official definitions (PyramidDrop: the next layer's projections,
the last token's row; SparseVLM: raters from the input embeddings, the raters' causal rows of the pruning layer,
DPC-kNN pair by pair). Cached greedy decoding equals recomputing, with the prefill's decisions, on the sequences
each layer holds (each new token numbered after its layer's own tokens, as both codes number decode tokens); a
left-padded batch equals each sample alone. On our LLaVA class and transformers' llava-hf class; M-RoPE families
refuse `renumber` by name."""

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from llava.model.visual_exit import ExitRequest, exit_decoder_of
from llava.model.visual_exit.tokens import TokenLayout

from families import Sample, batch, exit_model, stock_model
from test_sparsevlm import reference_clusters, reference_raters
from test_visual_exit import batch_inputs, images_for

TOLERANCE = 1e-5
# One image per sample (the official codes assume one block), a text-only one, padding on the left.
PROMPTS = [
    ("USER: <image>\nWhat colour is the thing in the middle? ASSISTANT:", 1),
    ("USER: a question without any image ASSISTANT:", 0),
    ("USER: tell me <image> ASSISTANT:", 1),
]


class Official:
    """One sample through the stock layers of `decoder`, no padding, each layer on the rows the method keeps,
    numbered 0..n-1. `rows` holds each row's identity: its index in the sample's input (a merged token takes its
    center's). `decide(index, h_in, h_out)` may return (new rows in order, new states) after a layer; with
    `fixed` decisions (from an earlier run, by layer) the same rows are kept, merged states computed afresh."""

    def __init__(self, decoder, lm_head, embeds, visual):
        self.decoder, self.lm_head = decoder, lm_head
        self.h, self.visual = embeds[None], set(visual.nonzero().flatten().tolist())
        self.rows = list(range(len(visual)))
        self.sequences = {}  # layer index -> the rows after it, where they changed
        self.decided = {}  # layer index -> (kept visual rows, merged (center, members)): a rerun's `fixed`

    def positions(self):
        return torch.arange(len(self.rows))[None]

    def run_layer(self, index):
        n = len(self.rows)
        mask = torch.full((n, n), torch.finfo(self.h.dtype).min).triu(1)[None, None]
        embeddings = self.decoder.rotary_emb(self.h, self.positions())
        return self.decoder.layers[index](self.h, attention_mask=mask, position_embeddings=embeddings,
                                          position_ids=self.positions())

    def rebuild(self, index, kept_visual, merged, h_out):
        """prefix + kept visual rows (in their order) + merged tokens + the rest, as both codes concatenate."""
        visual_at = [i for i, row in enumerate(self.rows) if row in self.visual]
        first, last = visual_at[0], visual_at[-1]
        kept_at = [i for i in visual_at if self.rows[i] in kept_visual]
        states = [h_out[0, i] for i in range(first)] + [h_out[0, i] for i in kept_at]
        rows = self.rows[:first] + [self.rows[i] for i in kept_at]
        for center, members in merged:
            states.append(h_out[0, [self.rows.index(m) for m in members]].mean(dim=0))
            rows.append(center)
        states += [h_out[0, i] for i in range(last + 1, len(self.rows))]
        rows += self.rows[last + 1 :]
        self.h, self.rows = torch.stack(states)[None], rows
        self.sequences[index] = list(rows)
        self.decided[index] = (set(kept_visual), merged)

    def logits(self):
        return self.lm_head(self.decoder.norm(self.h))[0]


def rotated(attention, hidden, positions, embeddings_of):
    """(queries, keys) of `attention` for its input `hidden`, after RoPE at `positions`, keys repeated per head."""
    n, d = hidden.shape[1], attention.head_dim
    query = attention.q_proj(hidden).view(1, n, -1, d).transpose(1, 2)
    key = attention.k_proj(hidden).view(1, n, -1, d).transpose(1, 2)
    cos, sin = embeddings_of(hidden, positions)
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    return query.float(), repeat_kv(key, attention.num_key_value_groups).float()


def official_pdrop(decoder, lm_head, embeds, visual, boundaries, ratio, fixed=None):
    run = Official(decoder, lm_head, embeds, visual)
    original = len(run.visual)
    layers = len(decoder.layers)
    for index in range(layers):
        h_out = run.run_layer(index)
        run.h = h_out
        if index + 1 not in boundaries or index + 1 == layers or not run.visual & set(run.rows):
            continue
        if fixed is not None:
            kept, _ = fixed[index]
        else:  # the last token's row of the next layer, on the renumbered rows (PyramidDrop's pdrop_rank_drop)
            following = decoder.layers[index + 1]
            query, key = rotated(following.self_attn, following.input_layernorm(h_out), run.positions(), decoder.rotary_emb)
            scores = ((query[:, :, -1:] @ key.transpose(-1, -2)) * following.self_attn.scaling).softmax(dim=-1)
            scores = scores.mean(dim=1)[0, 0]
            present = [i for i, row in enumerate(run.rows) if row in run.visual]
            keep = math.floor(original * ratio ** (boundaries.index(index + 1) + 1))
            kept = {run.rows[i] for i in sorted(present, key=lambda i: (-float(scores[i]), i))[:keep]}
        run.rebuild(index, kept, [], h_out)
    return run


def official_sparsevlm(decoder, lm_head, embeds, visual, prune_layers, counts, fixed=None):
    run = Official(decoder, lm_head, embeds, visual)
    slots = visual.nonzero().flatten().tolist()
    raters = reference_raters(embeds[None], torch.ones(1, len(visual), dtype=torch.bool), visual[None])[0]
    for index in range(len(decoder.layers)):
        h_in = run.h
        h_out = run.run_layer(index)
        run.h = h_out
        present = [i for i, row in enumerate(run.rows) if row in run.visual]
        if index not in prune_layers or index == len(decoder.layers) - 1 or not raters or not present or not slots:
            continue
        if fixed is not None:
            kept, merged = fixed[index]
        else:  # the raters' causal rows of this layer's attention, mean over heads, then over raters
            attention = decoder.layers[index].self_attn
            query, key = rotated(attention, decoder.layers[index].input_layernorm(h_in), run.positions(),
                                 decoder.rotary_emb)
            n = len(run.rows)
            logits = (query @ key.transpose(-1, -2)) * attention.scaling
            logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            probabilities = logits.softmax(dim=-1).mean(dim=1)[0]
            rater_rows = [run.rows.index(r) for r in raters]
            score = probabilities[rater_rows].mean(dim=0)
            count = counts[prune_layers.index(index)]
            dropped = sorted(present, key=lambda i: (-float(score[i]), i))[min(count, len(present) - 1) :]
            kept = {run.rows[i] for i in present if i not in dropped}
            recycled = sorted(dropped[: int(0.3 * len(dropped)) + 1])
            clusters = reference_clusters(h_out[0, recycled]) if dropped else {}
            merged = [(run.rows[recycled[c]], [run.rows[recycled[m]] for m in members]) for c, members in clusters.items()]
        run.rebuild(index, kept, merged, h_out)
    return run


@pytest.fixture
def kept_rows(monkeypatch):
    """Per drop our exit carries out, per sample: its remaining rows in layout order, as indices into the sample's
    own input (padding left out)."""
    kept = []
    drop = TokenLayout.drop

    def recording(self, hidden, mask, order=None, **kwargs):
        hidden, layout = drop(self, hidden, mask, order, **kwargs)
        first = self.input_valid.long().argmax(dim=1)
        kept.append([(layout.origin[b][layout.valid_keys.valid[b]] - first[b]).tolist() for b in range(len(mask))])
        return hidden, layout

    monkeypatch.setattr(TokenLayout, "drop", recording)
    return kept


SETTINGS = {
    "pdrop": ("pdrop:1-2-3:0.5", dict(boundaries=[1, 2, 3], ratio=0.5)),
    "pdrop-2": ("pdrop:2:0.3", dict(boundaries=[2], ratio=0.3)),
    "sparsevlm": ("sparsevlm:0-1-2:10-6-3", dict(prune_layers=[0, 1, 2], counts=[10, 6, 3])),
    "sparsevlm-13": ("sparsevlm:1-2:5-2", dict(prune_layers=[1, 2], counts=[5, 2])),
}


def official(method, decoder, lm_head, embeds, visual, fixed=None):
    spec, settings = SETTINGS[method]
    if method.startswith("pdrop"):
        return official_pdrop(decoder, lm_head, embeds, visual, fixed=fixed, **settings)
    return official_sparsevlm(decoder, lm_head, embeds, visual, fixed=fixed, **settings)


def llava_samples(model, tokenizer, images):
    """Per sample alone: (input embeddings (n, H), visual (n,))."""
    pixels = images_for(images, PROMPTS)
    samples, used = [], 0
    for prompt, count in PROMPTS:
        ids, mask = batch_inputs(tokenizer, [(prompt, count)])
        with torch.no_grad():
            mm = model.prepare_inputs_labels_for_multimodal(ids, mask, None, pixels[used : used + count] if count else None)
        samples.append((mm.inputs_embeds[0], mm.visual_mask[0]))
        used += count
    return samples


@pytest.mark.parametrize("method", list(SETTINGS))
def test_llava_equals_the_official_sequence(loaded, images, kept_rows, method):
    tokenizer, model, _, _ = loaded
    ids, mask = batch_inputs(tokenizer, PROMPTS, "left")
    pixels = images_for(images, PROMPTS)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, images=pixels, exit_config=ExitRequest("stages", stages=SETTINGS[method][0]).expand())
        mm = model.prepare_inputs_labels_for_multimodal(ids, mask, None, pixels)
        decoder = exit_decoder_of(model)
        for b, (embeds, visual) in enumerate(llava_samples(model, tokenizer, images)):
            reference = official(method, decoder, model.lm_head, embeds, visual)
            valid = mm.attention_mask[b].bool()
            ours = out.logits[b, valid]  # the sample's rows, in its own input order
            text = [row for row in reference.rows if row not in reference.visual]
            expected = reference.logits()[[reference.rows.index(row) for row in text]]
            assert (ours[text] - expected).abs().max() <= TOLERANCE, (method, b)
            # the same rows, in the same order, after each change (merged tokens behind the kept visual ones)
            ours_sequences = [drop[b] for drop in kept_rows]
            changed = [ours_sequences[i] for i in range(len(ours_sequences)) if i == 0 or ours_sequences[i] != ours_sequences[i - 1]]
            official_sequences = list(reference.sequences.values())
            if visual.any():
                assert [s for s in changed if s != list(range(len(visual)))] == \
                    [s for s in official_sequences if s != list(range(len(visual)))], (method, b)


@pytest.mark.parametrize("method", ["pdrop", "sparsevlm"])
def test_cached_decoding_equals_recomputing_the_official_sequences(loaded, images, method):
    """Greedy, batched: each new token's logits equal the stock layers recomputed on prompt + answer so far, with the
    prefill's decisions, each layer's rows numbered 0..n-1 (so a new token sits after its layer's own tokens)."""
    tokenizer, model, _, _ = loaded
    ids, mask = batch_inputs(tokenizer, PROMPTS, "left")
    steps = 4
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, images=images_for(images, PROMPTS), do_sample=False,
                             max_new_tokens=steps, min_new_tokens=steps, output_logits=True, return_dict_in_generate=True,
                             exit_config=ExitRequest("stages", stages=SETTINGS[method][0]).expand(), pad_token_id=0)
        decoder, embed = exit_decoder_of(model), model.get_input_embeddings()
        for b, (embeds, visual) in enumerate(llava_samples(model, tokenizer, images)):
            prefill = official(method, decoder, model.lm_head, embeds, visual)
            for step in range(steps):
                answer = embed(out.sequences[b, :step])
                whole = torch.cat([embeds, answer])
                padded = torch.cat([visual, torch.zeros(step, dtype=torch.bool)])
                rerun = official(method, decoder, model.lm_head, whole, padded, fixed=prefill.decided)
                assert (out.logits[step][b] - rerun.logits()[-1]).abs().max() <= TOLERANCE, (method, b, step)


@pytest.mark.parametrize("method", ["pdrop", "sparsevlm"])
def test_llava_hf_equals_the_official_sequence(method):
    """transformers' own LlavaForConditionalGeneration (1-D positions): the same rule, each sample alone."""
    stock = stock_model("llava-hf")
    model = exit_model(stock)
    samples = [Sample(3, [None], 6), Sample(5, [], 3), Sample(2, [None], 8)]
    inputs = batch("llava-hf", stock, samples, "left")
    captured = {}
    decoder = stock.model.language_model

    def capture(module, args, kwargs):
        captured["input"] = args[0] if args else kwargs["hidden_states"]

    hook = decoder.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        stock(**inputs)
        hook.remove()
        out = model(**inputs, exit_config=ExitRequest("stages", stages=SETTINGS[method][0]).expand())
        visual = inputs["input_ids"] == stock.config.image_token_id
        for b in range(len(samples)):
            valid = inputs["attention_mask"][b].bool()
            reference = official(method, decoder, stock.lm_head, captured["input"][b, valid], visual[b, valid])
            text = [row for row in reference.rows if row not in reference.visual]
            expected = reference.logits()[[reference.rows.index(row) for row in text]]
            assert (out.logits[b, valid][text] - expected).abs().max() <= TOLERANCE, (method, b)


@pytest.mark.parametrize("spec", ["pdrop:1-2:0.5", "sparsevlm:1-2:5-2"])
def test_m_rope_families_refuse_renumbering_by_name(spec):
    stock = stock_model("qwen2-vl")
    model = exit_model(stock)
    inputs = batch("qwen2-vl", stock, [Sample(3, [(2, 4)], 5)])
    with pytest.raises(ValueError, match="add :keep to the stage"), torch.no_grad():
        model(**inputs, exit_config=ExitRequest("stages", stages=spec).expand())
    with torch.no_grad():  # with :keep they run, on the original positions
        model(**inputs, exit_config=ExitRequest("stages", stages=spec + ":keep").expand())
