"""Decoding as LLaVA users run it: beam search and sampling in every exit mode.

Oracles: in mode none, transformers' own LlamaForCausalLM with the same weights, decoding from the same input
embeddings (beam search token for token, sampling under the same seed). With an exit, a beam's score equals the
log-probability of its tokens recomputed from scratch (no cache) under the same exit, so reordering the exit cache
between beams kept every beam's keys; and a sample decoded in a batch equals the same sample decoded alone.
"""

import pytest
import torch
from transformers import LlamaForCausalLM

from llava.mm_utils import tokenizer_image_token
from llava.model.visual_exit import ExitRequest

from batching import padded_batch, set_sample_dependent_gates

PROMPTS = ["USER: <image>\nWhat colour is it? ASSISTANT:", "USER: tell me about <image> please, in detail ASSISTANT:"]
NEW_TOKENS = 5
EXITS = [ExitRequest("fixed", 1).expand(), ExitRequest("fixed", 0).expand(), ExitRequest("fastv", fastv_k=1, fastv_r=0.5).expand()]


@pytest.fixture(scope="module")
def stock(loaded):
    """transformers' plain Llama causal LM holding the tiny LLaVA's language-model weights."""
    _, model, _, _ = loaded
    stock = LlamaForCausalLM(model.config).eval()
    missing, _ = stock.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    return stock


def decode(model, ids, mask, images, **settings):
    return model.generate(
        ids, attention_mask=mask, images=images, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0,
        return_dict_in_generate=True, output_scores=True, **settings,
    )


def stock_decode(stock, model, ids, mask, images, **settings):
    mm = model.prepare_inputs_labels_for_multimodal(ids, mask, None, images, padding_side="left")
    return stock.generate(
        inputs_embeds=mm.inputs_embeds, attention_mask=mm.attention_mask, max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS, pad_token_id=0, return_dict_in_generate=True, output_scores=True, **settings,
    )


def sequence_log_prob(model, prompt_ids, tokens, image, exit_config) -> float:
    """Sum of log P(token) over `tokens` after the prompt, from one forward pass without a cache."""
    full = torch.tensor([prompt_ids + tokens])
    logits = model(input_ids=full, images=image, exit_config=exit_config, use_cache=False).logits[0].double()
    steps = logits[-len(tokens) - 1 : -1]  # the image expands the prompt: count from the end
    return float(torch.log_softmax(steps, dim=-1).gather(1, torch.tensor(tokens)[:, None]).sum())


def test_beam_search_in_mode_none_equals_transformers_beam_search(loaded, stock, images):
    tokenizer, model, _, _ = loaded
    ids, mask = padded_batch(tokenizer, PROMPTS, "right")
    beams = dict(num_beams=3, num_return_sequences=2, do_sample=False)
    with torch.no_grad():
        ours = decode(model, ids, mask, images[:2], exit_config=ExitRequest("none").expand(), **beams)
        reference = stock_decode(stock, model, ids, mask, images[:2], **beams)
    assert ours.sequences.tolist() == reference.sequences.tolist()
    assert torch.allclose(ours.sequences_scores, reference.sequences_scores, atol=1e-5)
    assert ours.exit_stats.exit_layer.tolist() == [model.config.num_hidden_layers] * 4  # one row per sequence
    # Guards against a degenerate search: the two returned beams of a prompt differ.
    assert ours.sequences[0].tolist() != ours.sequences[1].tolist()


@pytest.mark.parametrize("exit_config", EXITS[:2], ids=lambda c: c.label)  # FastV ranks by the last prompt token
def test_beam_scores_equal_recomputed_log_probs_under_the_exit(loaded, images, exit_config):
    tokenizer, model, _, _ = loaded
    with torch.no_grad():
        for prompt, image in zip(PROMPTS, images[:2]):
            prompt_ids = tokenizer_image_token(prompt, tokenizer)
            out = decode(model, torch.tensor([prompt_ids]), None, image[None], exit_config=exit_config,
                         num_beams=3, num_return_sequences=3, length_penalty=0.0, do_sample=False)
            for tokens, score in zip(out.sequences.tolist(), out.sequences_scores.tolist()):
                assert score == pytest.approx(sequence_log_prob(model, prompt_ids, tokens, image[None], exit_config), abs=1e-4)
            assert out.exit_stats.exit_layer.tolist() == [exit_config.request.layer] * 3


@pytest.mark.parametrize("exit_config", [ExitRequest("none").expand(), *EXITS], ids=lambda c: c.label)
def test_beam_search_batch_equals_each_prompt_alone(loaded, images, exit_config):
    tokenizer, model, _, _ = loaded
    ids, mask = padded_batch(tokenizer, PROMPTS, "left")
    beams = dict(num_beams=3, do_sample=False, exit_config=exit_config)
    with torch.no_grad():
        batched = decode(model, ids, mask, images[:2], **beams)
        for row, (prompt, image) in enumerate(zip(PROMPTS, images[:2])):
            alone = decode(model, torch.tensor([tokenizer_image_token(prompt, tokenizer)]), None, image[None], **beams)
            assert batched.sequences[row].tolist() == alone.sequences[0].tolist()
            assert batched.exit_stats.prefill_flops[row] == alone.exit_stats.prefill_flops[0]


def test_sampling_in_mode_none_equals_transformers_sampling(loaded, stock, images):
    tokenizer, model, _, _ = loaded
    ids, mask = padded_batch(tokenizer, PROMPTS, "left")
    sampling = dict(do_sample=True, temperature=0.7, top_p=0.9, num_return_sequences=2)
    with torch.no_grad():
        torch.manual_seed(11)
        ours = decode(model, ids, mask, images[:2], exit_config=ExitRequest("none").expand(), **sampling)
        torch.manual_seed(11)
        reference = stock_decode(stock, model, ids, mask, images[:2], **sampling)
    assert ours.sequences.tolist() == reference.sequences.tolist()
    assert len(ours.exit_stats.exit_layer) == 4


@pytest.mark.parametrize("exit_config", EXITS, ids=lambda c: c.label)
def test_sampling_with_an_exit_follows_the_exit_logits(loaded, images, exit_config):
    """A temperature near 0 samples the argmax: the exit path's greedy tokens; top_p keeps the sampled path real."""
    tokenizer, model, _, _ = loaded
    ids, mask = padded_batch(tokenizer, PROMPTS, "left")
    with torch.no_grad():
        greedy = decode(model, ids, mask, images[:2], exit_config=exit_config, do_sample=False)
        torch.manual_seed(0)
        cold = decode(model, ids, mask, images[:2], exit_config=exit_config, do_sample=True, temperature=1e-4, top_p=0.9)
        warm = [decode(model, ids, mask, images[:2], exit_config=exit_config, do_sample=True, temperature=5.0).sequences
                for _ in range(2)]
    assert cold.sequences.tolist() == greedy.sequences.tolist()
    assert cold.exit_stats.exit_layer.tolist() == greedy.exit_stats.exit_layer.tolist()
    assert warm[0].tolist() != warm[1].tolist()  # a hot temperature really samples


def test_beam_search_with_gates_exiting_per_sample(gated, loaded, images):
    """Dynamic exit: samples of one batch leave at different layers; each beam's score is its tokens' log-probability
    recomputed without a cache under a fixed exit at the layer its prompt's gates chose, and batch == alone."""
    tokenizer = loaded[0]
    set_sample_dependent_gates(gated, seed=1)  # the two prompts exit after layers 2 and 1
    ids, mask = padded_batch(tokenizer, PROMPTS, "left")
    beams = dict(num_beams=3, num_return_sequences=3, length_penalty=0.0, do_sample=False, exit_config=ExitRequest("dynamic").expand())
    with torch.no_grad():
        batched = decode(gated, ids, mask, images[:2], **beams)
        exit_layers = batched.exit_stats.exit_layer.view(2, 3)
        assert (exit_layers == exit_layers[:, :1]).all() and exit_layers[0, 0] != exit_layers[1, 0]
        for row, (prompt, image) in enumerate(zip(PROMPTS, images[:2])):
            prompt_ids = tokenizer_image_token(prompt, tokenizer)
            alone = decode(gated, torch.tensor([prompt_ids]), None, image[None], **beams)
            assert alone.sequences.tolist() == batched.sequences[3 * row : 3 * row + 3].tolist()
            fixed = ExitRequest("fixed", int(exit_layers[row, 0])).expand()
            for tokens, score in zip(alone.sequences.tolist(), alone.sequences_scores.tolist()):
                assert score == pytest.approx(sequence_log_prob(gated, prompt_ids, tokens, image[None], fixed), abs=1e-4)
