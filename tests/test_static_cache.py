"""`generate(cache_implementation="static")` and compiled decoding under the exit == the dynamic cache, on our LLaVA
class in every exit mode and method stage and on every family: ids equal, logits within 1e-5 (fp32, eager
attention), exit statistics equal; a batch == each sample alone; sampling and beams alike. Compiled runs use
`fullgraph=True` (any graph break fails) with dynamo's eager backend, which traces exactly what inductor would
compile without needing a compiler in CI."""

import pytest
import torch
from transformers import CompileConfig

from llava.mm_utils import tokenizer_image_token
from llava.model.visual_exit import ExitRequest, StaticExitCache, VisualExitCache
from llava.compat import output_cache

from batching import attention_implementation, padded_batch
from families import FAMILIES, HYBRID, M_ROPE, TEXT, Sample, batch, exit_model, stock_model
from test_families import SIZES, sample_dependent_gates
from test_generation import PROMPTS

TOLERANCE = 1e-5
NEW_TOKENS = 5
QUESTIONS = ["What colour is it?", "compare them", "no image here"]
# Every stage on the tiny LLaVA (4 layers, 16 visual tokens an image), alone or composed with the gates.
SPECS = [
    "none", "fixed:0", "fixed:2", "gates:0.5", "prune:fastv:2:0.5", "prune:random:1:0.5", "pdrop:1-2:0.5",
    "pdrop:1-2:0.5:keep", "dart:1:8", "visionzip:2:1", "divprune:0.5", "cdpruner:4", "downsample:2",
    "sparsevlm:1-2:8-4", "sparsevlm-drop:1-2:8-4", "shortv:1-2", "prune:fastv:1:0.5,gates:0.5",
]
COMPILED_SPECS = ["none", "fixed:2", "gates:0.5", "prune:fastv:2:0.5", "pdrop:1-2:0.5", "sparsevlm:1-2:8-4", "shortv:1-2"]


def exit_config(spec: str):
    return ExitRequest("none").expand() if spec == "none" else ExitRequest("stages", stages=spec).expand()


def compiled(fullgraph: bool = True) -> CompileConfig:
    """generate's compile config, on the CPU too (transformers compiles on accelerators only unless told)."""
    config = CompileConfig(fullgraph=fullgraph, backend="eager", mode=None)
    config._compile_all_devices = True
    return config


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test's compiled calls start from nothing: recompilations across tests do not count toward dynamo's limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def llava_generate(model, ids, mask, images, spec, instructions, **kwargs):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, images=images, instructions=instructions, exit_config=exit_config(spec),
            max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0, return_dict_in_generate=True,
            output_logits=True, **kwargs,
        )


def assert_same_generation(dynamic, static):
    assert torch.equal(dynamic.sequences, static.sequences)
    assert len(dynamic.logits) == len(static.logits)
    for step, (a, b) in enumerate(zip(dynamic.logits, static.logits)):
        assert (a - b).abs().max() <= TOLERANCE, f"step {step}"
    assert dynamic.exit_stats.exit_layer.tolist() == static.exit_stats.exit_layer.tolist()
    assert dynamic.exit_stats.layer_tokens.tolist() == static.exit_stats.layer_tokens.tolist()


@pytest.mark.parametrize("spec", SPECS)
def test_static_cache_generates_what_the_dynamic_one_does(loaded, images, random_gates, spec):
    tokenizer = loaded[0]
    ids, mask = padded_batch(tokenizer, [prompt for prompt, _ in PROMPTS])
    with attention_implementation(random_gates, "eager"):
        dynamic = llava_generate(random_gates, ids, mask, images, spec, QUESTIONS)
        static = llava_generate(random_gates, ids, mask, images, spec, QUESTIONS, cache_implementation="static")
    assert isinstance(output_cache(static), StaticExitCache) and type(output_cache(dynamic)) is VisualExitCache
    assert_same_generation(dynamic, static)


def test_the_gates_send_samples_out_at_different_layers(loaded, images, random_gates):
    """What makes the gate cases above worth running: the three prompts do not all leave at one layer."""
    ids, mask = padded_batch(loaded[0], [prompt for prompt, _ in PROMPTS])
    exits = llava_generate(random_gates, ids, mask, images, "gates:0.5", QUESTIONS).exit_stats.exit_layer.tolist()
    assert len(set(exits[:2])) == 2, exits


@pytest.mark.parametrize("spec", COMPILED_SPECS)
def test_compiled_static_decoding_generates_what_the_dynamic_cache_does(loaded, images, random_gates, spec):
    ids, mask = padded_batch(loaded[0], [prompt for prompt, _ in PROMPTS])
    with attention_implementation(random_gates, "eager"):
        dynamic = llava_generate(random_gates, ids, mask, images, spec, QUESTIONS)
        static = llava_generate(random_gates, ids, mask, images, spec, QUESTIONS, cache_implementation="static",
                                compile_config=compiled())
    assert_same_generation(dynamic, static)


@pytest.mark.parametrize("spec", ["fixed:2", "gates:0.5", "pdrop:1-2:0.5", "sparsevlm:1-2:8-4"])
def test_static_batch_equals_each_sample_alone(loaded, images, random_gates, spec):
    tokenizer = loaded[0]
    ids, mask = padded_batch(tokenizer, [prompt for prompt, _ in PROMPTS])
    batched = llava_generate(random_gates, ids, mask, images, spec, QUESTIONS, cache_implementation="static")
    start = 0
    for b, (prompt, count) in enumerate(PROMPTS):
        row = torch.tensor([tokenizer_image_token(prompt, tokenizer)])
        alone = llava_generate(random_gates, row, None, images[start : start + count] if count else None, spec,
                               QUESTIONS[b : b + 1], cache_implementation="static")
        start += count
        assert batched.sequences[b].tolist() == alone.sequences[0].tolist()


@pytest.mark.parametrize("spec", ["fixed:2", "gates:0.5", "pdrop:1-2:0.5"])
@pytest.mark.parametrize("decoding", ["sample", "beams"])
def test_static_sampling_and_beams_follow_the_dynamic_cache(loaded, images, random_gates, spec, decoding):
    ids, mask = padded_batch(loaded[0], [prompt for prompt, _ in PROMPTS])
    options = {"do_sample": True, "top_k": 5} if decoding == "sample" else {"num_beams": 3, "do_sample": False}
    outputs = []
    for static in (False, True):
        torch.manual_seed(11)
        cache = {"cache_implementation": "static"} if static else {}
        outputs.append(llava_generate(random_gates, ids, mask, images, spec, QUESTIONS, **options, **cache))
    dynamic, static = outputs
    assert torch.equal(dynamic.sequences, static.sequences)
    assert dynamic.exit_stats.exit_layer.tolist() == static.exit_stats.exit_layer.tolist()


def test_a_static_cache_cannot_be_cropped_or_overfilled(loaded, images):
    tokenizer, model, _, _ = loaded
    ids, mask = padded_batch(tokenizer, [prompt for prompt, _ in PROMPTS])
    static = llava_generate(model, ids, mask, images, "fixed:2", QUESTIONS, cache_implementation="static")
    with pytest.raises(NotImplementedError, match="use the dynamic cache"):
        output_cache(static).crop(3)
    cache = StaticExitCache(model.config, max_cache_len=4)
    with pytest.raises(ValueError, match="does not fit a static cache of 4"), torch.no_grad():
        model(input_ids=ids, attention_mask=mask, images=images, cache=cache, use_cache=True)


@pytest.fixture(scope="module", params=[name for name in FAMILIES if name not in HYBRID])
def family(request):
    stock = stock_model(request.param)
    model = exit_model(stock)
    sample_dependent_gates(model)
    return request.param, stock, model


@pytest.mark.parametrize("spec", ["none", "fixed:1", "gates:0.5", "pdrop:1-2:0.5"])
def test_static_and_compiled_decoding_on_every_family(family, spec):
    """Each family's stock forward around our decoder, static and compiled in full graph, as transformers compiles
    the stock class: the same ids and logits as the dynamic cache."""
    name, stock, model = family
    small, _ = SIZES[name]
    inputs = batch(name, stock, [Sample(3, [small], 4), Sample(5, [], 3), Sample(2, [small], 6)])
    spec = spec + (":keep" if name in M_ROPE and spec.startswith("pdrop") else "")
    options = dict(exit_config=exit_config(spec), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                   pad_token_id=TEXT["pad_token_id"], return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        dynamic = model.generate(**inputs, **options)
        static = model.generate(**inputs, **options, cache_implementation="static")
        compiled_static = model.generate(**inputs, **options, cache_implementation="static", compile_config=compiled())
    assert_same_generation(dynamic, static)
    assert_same_generation(dynamic, compiled_static)


def test_a_hybrid_decoder_refuses_the_static_cache_in_one_line():
    name = HYBRID[0]
    stock = stock_model(name)
    model = exit_model(stock)
    small, _ = SIZES[name]
    inputs = batch(name, stock, [Sample(3, [small], 4)])
    with pytest.raises(ValueError, match="linear-attention layers decode with the dynamic cache only"), torch.no_grad():
        model.generate(**inputs, cache_implementation="static", max_new_tokens=2, pad_token_id=TEXT["pad_token_id"])
