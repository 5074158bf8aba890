"""Gate training: the label rule, the shared-pass step against inference exits, training and resuming, the
gates-only artifact, init_weight.py and the DeepSpeed script on CPU."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from llava.constants import IGNORE_INDEX
from llava.model.builder import load_pretrained_model
from llava.model.visual_exit import ExitConfig
from llava.model.visual_exit.training import ExitLabelRule, exit_labels
from llava.train.train import train

from batching import padded_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_exit_labels_on_crafted_cases():
    """Independent arithmetic: agreement = share of equal argmaxes; ratio = sum CE(exit) / sum CE(full)."""
    full = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    exit_ = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.5, 1.0, 0.0]])
    targets = torch.tensor([0, 1, 0, 1, 0])
    sample = torch.tensor([0, 0, 1, 1, 2])
    judged = exit_labels(full, exit_, targets, sample, 4, ExitLabelRule(0.99, 1.03))

    def ce(logits, target):
        return math.log(sum(math.exp(v) for v in logits)) - logits[target]

    expected = []
    for s in range(3):
        rows = [i for i in range(5) if sample[i] == s]
        agree = sum(full[i].argmax() == exit_[i].argmax() for i in rows) / len(rows)
        ratio = sum(ce(exit_[i].tolist(), targets[i]) for i in rows) / sum(ce(full[i].tolist(), targets[i]) for i in rows)
        expected.append((agree, ratio, int(agree > 0.99 and ratio < 1.03)))
    for s, (agree, ratio, label) in enumerate(expected):
        assert judged.agree[s].item() == pytest.approx(float(agree))
        assert judged.ratio[s].item() == pytest.approx(ratio, rel=1e-5)
        assert judged.label[s].item() == label
    # Sample 0 identical (safe), 1 argmax flips (unsafe), 2 same argmax but loss up ~25% (unsafe), 3 no tokens.
    assert judged.label.tolist() == [1, 0, 0, 0] and judged.usable.tolist() == [True, True, True, False]


def test_training_exit_continuation_matches_inference_exit(loaded, images):
    tokenizer, model, _, _ = loaded
    model.config.visual_gate_hidden_size = 8
    from llava.model.visual_exit.gate import build_visual_gates

    model.get_model().visual_gates_router = build_visual_gates(model.config)
    try:
        prompts = ["USER: <image>\nWhat is it? ASSISTANT: A red square.</s>", "USER: Hi ASSISTANT: Hello there.</s>",
                   "USER: <image> and <image>? ASSISTANT: Two things.</s>"]
        ids, mask = padded_batch(tokenizer, prompts, "right")
        labels = ids.clone()
        labels[:, :-6] = IGNORE_INDEX  # the last tokens play the answer
        labels[mask == 0] = IGNORE_INDEX
        for layer in (0, 2):
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=mask, labels=labels, images=images[:3], gate_training_layer=layer)
                exited = model(input_ids=ids, attention_mask=mask, images=images[:3], exit_config=ExitConfig("fixed", layer + 1))
                full = model(input_ids=ids, attention_mask=mask, images=images[:3])
            mm = model.prepare_inputs_labels_for_multimodal(ids, mask, labels, images[:3])
            sample, position = out.answer_positions
            assert torch.equal(mm.labels[sample, position + 1], mm.labels[sample, position + 1].clamp(min=0))
            assert (out.exit_logits - exited.logits[sample, position]).abs().max() <= 1e-5
            assert (out.full_logits - full.logits[sample, position]).abs().max() <= 1e-5
            assert out.exit_labels.usable.tolist() == [True, False, True]  # the text-only sample has no visual tokens
    finally:
        model.get_model().visual_gates_router = None
        del model.config.visual_gate_hidden_size


@pytest.fixture(scope="module")
def gate_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gate-data")
    records = []
    for i, (name, rgb) in enumerate([("red", (220, 20, 20)), ("green", (20, 200, 20)), ("blue", (20, 20, 220))] * 3):
        Image.new("RGB", (40 + i, 30), rgb).save(folder / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": f"It is {name}."}]})
    (folder / "data.json").write_text(json.dumps(records))
    return folder


@pytest.fixture(scope="module")
def init_checkpoint(llava_checkpoint, tmp_path_factory):
    from init_weight import main as init_weight

    out = str(tmp_path_factory.mktemp("exit-init"))
    init_weight(["--model-path", llava_checkpoint, "--output-dir", out, "--gate-hidden-size", "16", "--seed", "1"])
    return out


def train_args(checkpoint, data, output_dir, *extra):
    return [
        "--model_name_or_path", checkpoint, "--data_path", str(data / "data.json"), "--image_folder", str(data),
        "--output_dir", str(output_dir), "--per_device_train_batch_size", "3", "--learning_rate", "1e-2",
        "--logging_steps", "1", "--use_cpu", "True", "--seed", "3", "--save_steps", "1", *extra,
    ]


def test_init_weight_adds_reference_initialised_gates(init_checkpoint, llava_checkpoint):
    _, base, _, _ = load_pretrained_model(llava_checkpoint, device="cpu")
    _, model, _, _ = load_pretrained_model(init_checkpoint, device="cpu")
    gates = model.get_model().visual_gates_router
    assert len(gates) == model.config.num_hidden_layers and model.config.visual_gate_hidden_size == 16
    for gate in gates:
        for linear in (gate.w1, gate.w2):
            fan_out, fan_in = linear.weight.shape
            assert linear.weight.abs().max() <= math.sqrt(6 / (fan_in + fan_out))  # Xavier-uniform bound
            assert linear.weight.std() > 0.3 * math.sqrt(2 / (fan_in + fan_out))
    base_state = base.state_dict()
    assert all(torch.equal(t, base_state[n]) for n, t in model.state_dict().items() if "visual_gates" not in n)


def test_training_changes_only_the_gates_and_resumes(init_checkpoint, gate_data, tmp_path):
    trainer = train(train_args(init_checkpoint, gate_data, tmp_path / "run", "--max_steps", "2"))
    assert trainer.state.global_step == 2
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all("gate_accuracy" in entry and "exit_ratio" in entry for entry in history)

    _, before, _, _ = load_pretrained_model(init_checkpoint, device="cpu")
    _, after, _, _ = load_pretrained_model(str(tmp_path / "run"), device="cpu")  # the gates-only artifact
    old, new = before.state_dict(), after.state_dict()
    gate_names = [n for n in new if n.startswith("model.visual_gates_router.")]
    assert all(torch.equal(new[n], old[n]) for n in new if n not in gate_names)
    assert any(not torch.equal(new[n], old[n]) for n in gate_names)

    # Resuming from step 1 reproduces step 2 exactly.
    resumed = train(train_args(init_checkpoint, gate_data, tmp_path / "resumed", "--max_steps", "2",
                               "--resume_from_checkpoint", str(tmp_path / "run" / "checkpoint-1")))
    assert resumed.state.global_step == 2
    final, again = load_file(tmp_path / "run" / "visual_gates.safetensors"), load_file(tmp_path / "resumed" / "visual_gates.safetensors")
    assert all(torch.allclose(final[n], again[n], atol=1e-6) for n in final)


def test_full_checkpoint_loads_with_trained_gates(init_checkpoint, gate_data, tmp_path):
    train(train_args(init_checkpoint, gate_data, tmp_path / "run", "--max_steps", "1", "--save_full_model", "True"))
    _, full, _, _ = load_pretrained_model(str(tmp_path / "run" / "full_model"), device="cpu")
    gates = load_file(tmp_path / "run" / "visual_gates.safetensors")
    state = full.state_dict()
    assert all(torch.equal(state[n], t) for n, t in gates.items())


def test_malformed_data_stops_before_model_work(init_checkpoint, gate_data, tmp_path):
    from llava.train.data import DataError

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "data.json").write_text('[{"id": "1",}]')
    with pytest.raises(DataError, match=r"data.json:1: invalid JSON"):
        train(train_args(init_checkpoint, bad, tmp_path / "run", "--max_steps", "1"))


def test_finetune_script_runs_with_deepspeed_on_cpu(init_checkpoint, gate_data, tmp_path):
    env = dict(os.environ, MODEL_PATH=init_checkpoint, DATA_PATH=str(gate_data / "data.json"),
               IMAGE_FOLDER=str(gate_data), OUTPUT_DIR=str(tmp_path / "ds"), BATCH_SIZE="3", WORKERS="0",
               PYTHON=sys.executable, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               PYTHONPATH=ROOT)
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts/v1_5/finetune_visual_gate.sh"), "--max_steps", "2", "--learning_rate", "1e-2"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gate_accuracy" in result.stdout + result.stderr
    trained = load_file(tmp_path / "ds" / "visual_gates.safetensors")
    _, init, _, _ = load_pretrained_model(init_checkpoint, device="cpu")
    initial = init.state_dict()
    assert any(not torch.equal(tensor, initial[name]) for name, tensor in trained.items())
