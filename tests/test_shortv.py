"""ShortV (BASELINES.md §10.4) against its official definition: in the replaced layers the attention output and the
MLP output are zeroed at the visual positions (the residual stream passes them through), everything else runs as
the stock model runs it — here by hooks on the stock class's own attention and MLP modules, on every family."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from llava.analysis.shortv import replaced_count, replacement_order
from llava.eval.answering import Answerer, RunSpec
from llava.model.builder import load_model
from llava.model.checkpoint import Checkpoint
from llava.model.visual_exit import DecoderGeometry, ExitRequest, prefill_flops
from llava.model.visual_exit.stages import parse_stages
from llava.model.visual_exit.stages.shortv import ShortV
from llava.world.generate import TEST_QUESTIONS, generate

from families import (
    FAMILIES, Sample, batch, exit_model, greedy_with_and_without_cache, sample_inputs, stock_model, visual_mask,
)
from test_families import samples_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD_MODEL = os.path.join(ROOT, "checkpoints", "tiny-world-llava")

TOLERANCE = 1e-5
LAYERS = (3, 0, 2)  # of the tiny models' 4, in a calibration's order (not sorted)


def zeroed_at(visual: torch.Tensor):
    """A forward hook that zeroes a module's output rows at the visual positions (B, T)."""

    def hook(module, args, output):
        first = output[0] if isinstance(output, tuple) else output
        zeroed = first.masked_fill(visual[..., None], 0.0)
        return (zeroed, *output[1:]) if isinstance(output, tuple) else zeroed

    return hook


def shortv_stock_forward(stock, inputs: dict, layers):
    """The stock model with ShortV's replaced layers as its code defines them."""
    visual = visual_mask(inputs)
    handles = []
    for index in layers:
        layer = stock.model.language_model.layers[index]
        mixer = getattr(layer, "self_attn", None) or layer.linear_attn
        handles += [mixer.register_forward_hook(zeroed_at(visual)), layer.mlp.register_forward_hook(zeroed_at(visual))]
    try:
        with torch.no_grad():
            return stock(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()


def spec(layers) -> str:
    return "shortv:" + "-".join(map(str, layers))


@pytest.mark.parametrize("family", FAMILIES)
def test_equals_the_stock_model_with_visual_updates_zeroed(family):
    stock = stock_model(family)
    model = exit_model(stock, gate_hidden_size=None)
    inputs = batch(family, stock, samples_for(family))
    with torch.no_grad():
        ours = model(**inputs, exit_config=ExitRequest("stages", stages=spec(LAYERS)).expand())
        none = model(**inputs, exit_config=ExitRequest("none").expand())
    theirs = shortv_stock_forward(stock, inputs, LAYERS)
    valid = inputs["attention_mask"].bool()
    assert (ours.logits[valid] - theirs.logits[valid]).abs().max() <= TOLERANCE
    assert (ours.logits[valid] - none.logits[valid]).abs().max() > 1e-3  # the replaced layers change the answer
    stats = ours.exit_stats
    visual = visual_mask(inputs).sum(dim=1)
    frozen = torch.zeros_like(stats.layer_tokens)
    frozen[:, list(LAYERS)] = visual[:, None]
    assert torch.equal(stats.layer_frozen, frozen)  # nothing leaves: every layer still sees every token
    assert torch.equal(stats.layer_tokens, none.exit_stats.layer_tokens)
    assert stats.exit_layer.tolist() == none.exit_stats.exit_layer.tolist()


def test_cost_counts_keys_and_values_of_the_frozen_tokens():
    """Per replaced layer, f frozen of n tokens: keys and values for all n, the rest for n - f (flops.py)."""
    geometry = DecoderGeometry(hidden=8, kv_width=4, intermediate=16, layers=2)
    tokens, frozen = torch.tensor([[10, 10]]), torch.tensor([[6, 0]])
    d, kv, m = 8, 4, 16
    by_hand = (2 * 10 * 2 * d * kv + 2 * 4 * 2 * d * d + 4 * 4 * 10 * d + 6 * 4 * d * m) + (
        2 * 10 * (2 * d * d + 2 * d * kv) + 4 * 10 * 10 * d + 6 * 10 * d * m
    )
    assert prefill_flops(geometry, tokens, torch.zeros(1), frozen).item() == by_hand
    assert prefill_flops(geometry, tokens, torch.zeros(1), torch.zeros_like(frozen)).item() == (
        prefill_flops(geometry, tokens, torch.zeros(1)).item()
    )


@pytest.mark.parametrize("family", [name for name in ("llava-hf", "qwen2.5-vl") if name in FAMILIES])
def test_generates_alike_with_and_without_a_cache_and_batched_as_alone(family):
    stock = stock_model(family)
    model = exit_model(stock, gate_hidden_size=None)
    samples = samples_for(family)
    config = ExitRequest("stages", stages=spec(LAYERS)).expand()
    inputs = batch(family, stock, samples)
    cached, recomputed = greedy_with_and_without_cache(model, inputs, config, steps=4)
    assert torch.equal(cached, recomputed)
    for b in range(len(samples)):
        alone, _ = greedy_with_and_without_cache(model, sample_inputs(family, stock, inputs, samples, b), config, steps=4)
        assert torch.equal(alone[0, -4:], cached[b, -4:])


def test_the_spec():
    assert parse_stages("shortv:31-29-0") == (ShortV((31, 29, 0)),)
    with pytest.raises(ValueError, match="name a layer twice"):
        parse_stages("shortv:3-3")
    stock = stock_model("llava-hf")
    model = exit_model(stock, gate_hidden_size=None)
    inputs = batch("llava-hf", stock, [Sample(3, [None], 4)])
    with pytest.raises(ValueError, match="shortv layer 4 is not one of the model's layers 0..3"), torch.no_grad():
        model(**inputs, exit_config=ExitRequest("stages", stages="shortv:4").expand())


# --- the calibration: Layer Contribution and the replacement order ------------------------------------------------

def test_replacement_order_is_by_layer_contribution_lowest_first():
    contribution = {0: 0.02, 1: 0.5, 2: 0.001, 3: 0.02, 4: 0.0}
    assert replacement_order(contribution) == [4, 2, 0, 3, 1]  # 0 before 3: equal contributions, the lower layer
    assert replaced_count(32, None) == 19 and replaced_count(40, None) == 24  # its README's 19 of 32, 24 of 40
    with pytest.raises(ValueError, match="between 1 and the model's 4 layers"):
        replaced_count(4, 5)


def test_calibration_command_on_the_world_model(tmp_path):
    """The command's Layer Contribution of each layer against the model run on each question alone with that layer
    replaced by hooks (the official definition, as above), and the saved exit the loader then runs."""
    world = tmp_path / "world"
    generate(str(world), train=2, test=6, seed=4)
    model = tmp_path / "model"
    shutil.copytree(WORLD_MODEL, model)
    images = str(world / "eval" / "gqa" / "data" / "images")
    result = subprocess.run(
        [sys.executable, "-m", "llava.analysis.shortv", "--model-path", str(model), "--question-file",
         str(world / TEST_QUESTIONS), "--image-folder", images, "--output-dir", str(tmp_path / "out"),
         "--device", "cpu", "--batch-size", "4", "--layers", "3", "--save"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "shortv.json").read_text())
    contribution = {int(layer): value for layer, value in report["layer_contribution"].items()}
    assert report["questions"] == 6 and sorted(contribution) == list(range(8))
    assert report["replaced"] == replacement_order(contribution)[:3]
    assert report["stages"] in result.stdout
    assert Checkpoint.resolve(str(model)).exit_defaults == ExitRequest("stages", stages=report["stages"])

    checkpoint = Checkpoint.resolve(WORLD_MODEL)
    spec = RunSpec.build(checkpoint, device="cpu", image_folder=images, batch_size=1, exit_mode="none")
    questions = [json.loads(line) for line in (world / TEST_QUESTIONS).read_text().splitlines()]
    expected = dict.fromkeys(contribution, 0.0)
    with Answerer(load_model(checkpoint, device="cpu"), spec) as answerer, torch.inference_mode():
        decoder = answerer.model.get_model()
        for question in questions:  # alone, no padding: the forward's last position is the prompt's last token
            batch = answerer.batch_inputs([answerer.prepare(question)])
            full = answerer.model(**batch, exit_config=ExitRequest("none").expand()).logits[0, -1]
            mm = answerer.model.prepare_inputs_labels_for_multimodal(batch["input_ids"], None, None, batch["images"],
                                                                   batch["image_sizes"])
            for layer in expected:
                handles = [module.register_forward_hook(zeroed_at(mm.visual_mask))
                           for module in (decoder.layers[layer].self_attn, decoder.layers[layer].mlp)]
                try:
                    replaced = answerer.model(**batch, exit_config=ExitRequest("none").expand()).logits[0, -1]
                finally:
                    for handle in handles:
                        handle.remove()
                expected[layer] += float(torch.nn.KLDivLoss(reduction="batchmean")(
                    full.log_softmax(-1)[None], replaced.softmax(-1)[None])) / len(questions)
    assert all(contribution[layer] == pytest.approx(expected[layer], rel=1e-4, abs=1e-7) for layer in expected)
