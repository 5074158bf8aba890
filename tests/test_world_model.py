"""The tiny world's model trainer: every part of the model learns (the vision tower too, unlike LLaVA's frozen CLIP),
the result loads as a LLaVA checkpoint, and --init-from continues from it."""

import torch

from llava.model.builder import load_pretrained_model
from llava.model.tiny import build_tiny_llava
from llava.train.data import load_records
from llava.world.generate import generate
from llava.world.train_model import WORLD_GEOMETRY, main, world_texts


def parts(model) -> dict[str, torch.Tensor]:
    tower = model.get_vision_tower().vision_tower
    return {
        "embeddings": model.get_input_embeddings().weight,
        "decoder": model.model.layers[0].mlp.up_proj.weight,
        "projector": model.model.mm_projector[0].weight,
        "tower": tower.encoder.layers[0].self_attn.q_proj.weight,
    }


def test_all_parts_train_and_training_continues(tmp_path):
    generate(str(tmp_path / "world"), train=8, test=1, seed=3)
    data = str(tmp_path / "world" / "train.json")
    common = ["--data-path", data, "--steps", "2", "--batch-size", "4", "--workers", "0"]
    main([*common, "--out", str(tmp_path / "first")])
    initial, _, _, _ = build_tiny_llava(WORLD_GEOMETRY, tuple(world_texts(load_records(data))))
    _, first, _, _ = load_pretrained_model(str(tmp_path / "first"), device="cpu")
    for name, weight in parts(first).items():
        assert weight.shape == parts(initial)[name].shape
        assert not torch.equal(weight, parts(initial)[name]), f"{name} did not train"

    main([*common, "--out", str(tmp_path / "second"), "--init-from", str(tmp_path / "first")])
    _, second, _, _ = load_pretrained_model(str(tmp_path / "second"), device="cpu")
    for name, weight in parts(second).items():
        assert not torch.equal(weight, parts(first)[name]), f"{name} did not continue training"
