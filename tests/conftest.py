"""Tiny checkpoints written once per session by our own writer (no model hub)."""

from __future__ import annotations

import pytest
import torch

from llava.model.builder import load_pretrained_model
from llava.tiny.llava import TinyGeometry, write_tiny_checkpoint
from llava.model.visual_exit.gate import build_visual_gates

from batching import set_sign_gate

GEOMETRY = TinyGeometry(layers=4, hidden=64, heads=4, kv_heads=2, image_size=56, patch_size=14, seed=7)


@pytest.fixture(scope="session")
def llava_checkpoint(tmp_path_factory) -> str:
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny-llava")), "llava", GEOMETRY)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory) -> str:
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny-hf")), "hf", GEOMETRY)


@pytest.fixture(scope="session")
def loaded(llava_checkpoint):
    """(tokenizer, model, image_processor, context_len) of the llava-layout checkpoint, fp32 on CPU."""
    return load_pretrained_model(llava_checkpoint, device="cpu")


@pytest.fixture
def images() -> torch.Tensor:
    """Three distinct pixel tensors at the tiny tower's resolution."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(3, 3, GEOMETRY.image_size, GEOMETRY.image_size, generator=generator)


@pytest.fixture
def gated(loaded):
    """The tiny model with gates (width 8) whose weights each test sets by hand; removed afterwards."""
    _, model, _, _ = loaded
    model.config.visual_gate_hidden_size = 8
    model.get_model().visual_gates_router = build_visual_gates(model.config)
    for gate in model.get_model().visual_gates_router:
        torch.nn.init.zeros_(gate.w1.weight)
        torch.nn.init.zeros_(gate.w2.weight)
    yield model
    model.get_model().visual_gates_router = None
    del model.config.visual_gate_hidden_size


@pytest.fixture
def random_gates(gated):
    """Sign gates on random directions: with test_generation's PROMPTS the two image prompts leave at different
    layers (after layer 1, and never)."""
    generator = torch.Generator().manual_seed(0)
    for gate in gated.get_model().visual_gates_router:
        set_sign_gate(gate, torch.randn(2 * gated.config.hidden_size, generator=generator))
    return gated
