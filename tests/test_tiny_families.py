"""The tiny writer for transformers' VLM families (`python -m llava.tiny --family F`), the loader's family
path and init_weight.py on family checkpoints."""

import json
import os

import pytest
import torch
from safetensors import safe_open

from llava.model.builder import load_family_model, load_pretrained_model
from llava.model.checkpoint import Checkpoint, gate_width_in_checkpoint
from llava.model.families import FAMILY_MODULES
from llava.model.families.processing import FamilyProcessor
from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
from llava.tiny.__main__ import main as write_tiny
from llava.model.visual_exit import visual_exit_class

from family_checkpoints import FAMILIES, family_checkpoint  # noqa: F401 (a fixture)


def saved_tensors(folder: str, marker: str = "") -> dict[str, torch.Tensor]:
    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys() if marker in key}


def gates_of(model) -> torch.nn.ModuleList:
    if isinstance(model, LlavaLlamaForCausalLM):
        return model.get_model().visual_gates_router
    return model.visual_exit_family.decoder(model).visual_gates_router


def test_checkpoint_names_the_tokenizers_ids(family_checkpoint):
    family, folder = family_checkpoint
    _, model, processor, _ = load_family_model(folder)
    processing, tokenizer = FAMILY_MODULES[family].PROCESSING, processor.tokenizer
    assert type(model).__name__ == FAMILY_MODULES[family].ADAPTER.model_class.__name__
    assert model.config.get_text_config().vocab_size == len(tokenizer)
    for role, token in processing.config_tokens.items():
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert token_id != tokenizer.unk_token_id
        assert getattr(model.config, f"{role}_token_id") == token_id
    for name, token in processing.named_tokens.items():
        assert getattr(tokenizer, name) == token
        assert getattr(tokenizer, f"{name}_id") == tokenizer.convert_tokens_to_ids(token)
    with open(os.path.join(folder, "processor_config.json")) as handle:
        assert json.load(handle)["processor_class"] == processing.processor_class
    with open(os.path.join(folder, "chat_template.jinja")) as handle:
        assert handle.read() == processing.chat_template == processor.chat_template
    turn_end = tokenizer.convert_tokens_to_ids(processing.turn_end)
    assert turn_end in model.generation_config.eos_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_seed_decides_the_weights(family, tmp_path):
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        write_tiny(["--family", family, "--out", str(tmp_path / name), "--seed", seed, "--layers", "2"])
    a, b, c = (saved_tensors(str(tmp_path / name)) for name in "abc")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not all(torch.equal(a[key], c[key]) for key in a)


def test_loads_through_load_pretrained_model(family_checkpoint):
    """Families our LLaVA class does not load come as transformers' class with the exit, with their processor;
    llava-hf layouts (hf_layout's) keep the LLaVA path."""
    family, folder = family_checkpoint
    checkpoint = Checkpoint.resolve(folder)
    routed = checkpoint.layout_class if checkpoint.is_family else None
    tokenizer, model, processor, context_len = load_pretrained_model(folder, device="cpu")
    if routed is None:
        assert family in ("llava-hf", "llava-next")
        assert isinstance(model, LlavaLlamaForCausalLM)
        return
    assert routed is FAMILY_MODULES[family].ADAPTER.model_class
    assert isinstance(model, visual_exit_class(routed))
    assert isinstance(processor, FamilyProcessor) and tokenizer is processor.tokenizer
    assert context_len == 2048
    assert model.dtype == torch.float32 and not model.training


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_gates_survive_loading(family, tmp_path):
    write_tiny(["--family", family, "--out", str(tmp_path), "--gate-hidden-size", "8"])
    saved = saved_tensors(str(tmp_path), "visual_gates_router.")
    assert len(saved) == 2 * 4 and gate_width_in_checkpoint(str(tmp_path)) == 8
    for _, model, _, _ in (load_pretrained_model(str(tmp_path), device="cpu"), load_family_model(str(tmp_path))):
        loaded = gates_of(model).state_dict()
        assert len(loaded) == len(saved)
        for name, tensor in loaded.items():
            (key,) = [key for key in saved if key.endswith("visual_gates_router." + name)]
            assert torch.equal(tensor, saved[key]), name


def test_gate_width_needs_a_family(tmp_path):
    with pytest.raises(SystemExit):
        write_tiny(["--out", str(tmp_path), "--gate-hidden-size", "8"])


def test_init_weight_adds_fresh_gates(family_checkpoint, tmp_path, capsys):
    from init_weight import main as init_weight

    family, folder = family_checkpoint
    out = str(tmp_path / "init")
    init_weight(["--model-path", folder, "--output-dir", out, "--gate-hidden-size", "8", "--seed", "1"])
    assert gate_width_in_checkpoint(out) == 8
    _, model, _, _ = load_pretrained_model(out, device="cpu")
    _, original, _, _ = load_pretrained_model(folder, device="cpu")
    gates = gates_of(model)
    assert len(gates) == 4 and all(gate.w1.weight.shape == (8, 2 * 64) for gate in gates)
    assert all(gate.w1.weight.abs().sum() > 0 for gate in gates)
    without_gates = {k: v for k, v in model.state_dict().items() if "visual_gates_router" not in k}
    assert without_gates.keys() == original.state_dict().keys()
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in without_gates.items())
    if not isinstance(model, LlavaLlamaForCausalLM):  # the processor files came along
        assert isinstance(load_pretrained_model(out, device="cpu")[2], FamilyProcessor)

    with pytest.raises(SystemExit, match="already holds gates of width 8 in its weights; --reinit"):
        init_weight(["--model-path", out, "--output-dir", str(tmp_path / "refused")])
    again = str(tmp_path / "again")
    init_weight(["--model-path", out, "--output-dir", again, "--gate-hidden-size", "8", "--seed", "2", "--reinit"])
    _, reinitialised, _, _ = load_pretrained_model(again, device="cpu")
    assert not torch.equal(gates_of(reinitialised)[0].w1.weight, gates[0].w1.weight)
