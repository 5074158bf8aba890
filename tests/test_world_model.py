"""The tiny world's model trainer: the tower is pretrained then frozen (as CLIP in LLaVA), or trained with the rest
with `--tower-steps 0`; the result loads as a LLaVA checkpoint and --init-from continues from it; exit dropout
trains exactly as the masked-keys oracle of DESIGN §2 would."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from llava.constants import IGNORE_INDEX
from llava.model.builder import load_pretrained_model
from llava.tiny.llava import build_tiny_llava
from llava.model.visual_exit import ExitRequest
from llava.train.data import load_records
from llava.world.generate import generate
from llava.world.train_model import WORLD_GEOMETRY, main, world_texts

from test_visual_exit import PROMPTS, batch_inputs, images_for, masked_reference_logits


def parts(model) -> dict[str, torch.Tensor]:
    tower = model.get_vision_tower().vision_tower
    return {
        "embeddings": model.get_input_embeddings().weight,
        "decoder": model.model.layers[0].mlp.up_proj.weight,
        "projector": model.model.mm_projector[0].weight,
        "tower": tower.encoder.layers[0].self_attn.q_proj.weight,
    }


def changed(before, after) -> set[str]:
    return {name for name, weight in parts(after).items() if not torch.equal(weight, parts(before)[name])}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate(str(out), train=8, test=1, seed=3)
    return str(out / "train.json")


def train(world, out, *extra):
    main(["--data-path", world, "--steps", "2", "--batch-size", "4", "--workers", "0", "--out", str(out), *extra])
    return load_pretrained_model(str(out), device="cpu")[1]


def test_pretrained_tower_stays_frozen_and_training_continues(world, tmp_path):
    initial, _, _, _ = build_tiny_llava(WORLD_GEOMETRY, tuple(world_texts(load_records(world))))
    first = train(world, tmp_path / "first", "--tower-steps", "2", "--exit-dropout", "0.5")
    assert all(parts(first)[name].shape == weight.shape for name, weight in parts(initial).items())
    assert changed(initial, first) == {"embeddings", "decoder", "projector", "tower"}
    second = train(world, tmp_path / "second", "--init-from", str(tmp_path / "first"), "--exit-dropout", "1")
    assert changed(first, second) == {"embeddings", "decoder", "projector"}, "the pretrained tower must stay frozen"
    record = json.loads((tmp_path / "second" / "world_training.json").read_text())
    assert record["exit_dropout"] == 1 and record["previous"] == json.loads((tmp_path / "first" / "world_training.json").read_text())


def test_without_pretraining_the_tower_trains_with_the_rest(world, tmp_path):
    first = train(world, tmp_path / "first", "--tower-steps", "0")
    second = train(world, tmp_path / "second", "--init-from", str(tmp_path / "first"), "--tower-steps", "0")
    assert changed(first, second) == {"embeddings", "decoder", "projector", "tower"}


@pytest.mark.parametrize("layer", [1, 3])
def test_exit_dropout_loss_and_gradients_equal_the_masked_oracle(loaded, images, layer):
    """A training step with the visual tokens gone after `layer` layers (the dropped-token path) has the loss and
    the gradients of the stock layers with the visual keys masked from layer `layer` on."""
    tokenizer, stock, _, _ = loaded
    model = copy.deepcopy(stock).train().requires_grad_(True)
    prompts = PROMPTS[:3]  # LLaVA never supervises the token right after an image, as PROMPTS[3] would need
    ids, mask = batch_inputs(tokenizer, prompts, padding_side="right")
    labels = torch.full_like(ids, IGNORE_INDEX)
    for b, length in enumerate(mask.sum(dim=1).tolist()):
        labels[b, length - 3 : length] = ids[b, length - 3 : length]
    pixels = images_for(images, prompts)

    exited = model(input_ids=ids, attention_mask=mask, images=pixels, labels=labels, exit_config=ExitRequest("fixed", layer=layer).expand())
    exited.loss.backward()
    exit_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    mm = model.prepare_inputs_labels_for_multimodal(ids, mask, labels, pixels)
    logits = masked_reference_logits(model, mm, torch.full((len(prompts),), layer))
    oracle = F.cross_entropy(logits[:, :-1].flatten(0, 1), mm.labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    oracle.backward()
    oracle_grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    torch.testing.assert_close(exited.loss, oracle, atol=1e-5, rtol=1e-5)
    assert exit_grads.keys() == oracle_grads.keys()
    assert any(name.startswith("model.layers.") for name in exit_grads)
    for name, grad in oracle_grads.items():
        torch.testing.assert_close(exit_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
