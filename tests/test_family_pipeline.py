"""A Qwen2.5-VL-family checkpoint through the commands a LLaVA-1.5 one takes: init_weight.py, the gate-training
script, and the GQA eval script (tiny random weights, offline)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2_5_VLForConditionalGeneration

from llava.model.builder import load_pretrained_model
from llava.model.families.processing import load_processor
from llava.tiny.families import write_tiny_family
from llava.model.visual_exit import exit_decoder_of

from test_eval_scripts import SPLIT, gqa_root, gqa_script, read_run  # noqa: F401 (gqa_root is a fixture)
from test_gate_training import gate_data, run_script, succeeded  # noqa: F401 (gate_data is a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory):
    return write_tiny_family(str(tmp_path_factory.mktemp("qwen2.5-vl")), "qwen2.5-vl")


@pytest.fixture(scope="module")
def qwen_init(qwen_checkpoint, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("qwen-exit-init"))
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "init_weight.py"), "--model-path", qwen_checkpoint, "--output-dir", out,
         "--gate-hidden-size", "16"],
        check=True, capture_output=True, cwd=ROOT,
    )
    return out


def stock_greedy_answers(checkpoint, eval_root, max_new_tokens):
    """Oracle: transformers' own class, no exit, greedy, on the processor's inputs for each GQA question."""
    processor = load_processor(checkpoint)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint).eval()
    from PIL import Image

    answers = {}
    for line in (eval_root / "gqa" / f"{SPLIT}.jsonl").read_text().splitlines():
        question = json.loads(line)
        image = Image.open(eval_root / "gqa" / "data" / "images" / question["image"]).convert("RGB")
        inputs = processor.prompt_inputs([{"from": "human", "value": "<image>\n" + question["text"]}], [image])
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        answers[question["question_id"]] = text.strip()
    return answers


def test_gqa_script_on_a_qwen_checkpoint(qwen_checkpoint, gqa_root):  # noqa: F811
    eval_root, _ = gqa_root
    gqa_script(ROOT, MODEL_PATH=qwen_checkpoint, CKPT="qwen-none", EVAL_ROOT=str(eval_root), EXIT_MODE="none",
               BATCH_SIZE="2")
    merged, summary = read_run(eval_root, "qwen-none")
    expected = stock_greedy_answers(qwen_checkpoint, eval_root, max_new_tokens=128)
    assert {r["question_id"]: r["text"] for r in merged} == expected  # batched, through the script == stock alone
    assert summary["exit"] == "none" and summary["samples"] == 3 and summary["errors"] == 0
    assert summary["settings"]["conv_mode"].startswith("chat_template:")

    result = gqa_script(ROOT, MODEL_PATH=qwen_checkpoint, CKPT="qwen-fixed", EVAL_ROOT=str(eval_root),
                        EXIT_MODE="fixed", EXIT_LAYER="1", BATCH_SIZE="2")
    merged, summary = read_run(eval_root, "qwen-fixed")
    assert all(r["exit_layer"] == 1 for r in merged) and summary["exit"] == "fixed-1"
    assert 0 < summary["flops_reduction"] < 1
    assert "fixed-1" in result.stdout


def test_gate_training_script_on_a_qwen_checkpoint(qwen_init, gate_data, tmp_path):  # noqa: F811
    result = run_script(qwen_init, gate_data, tmp_path / "run", "--max_steps", "2", BATCH_SIZE="3")
    succeeded(result)
    _, before, _, _ = load_pretrained_model(qwen_init, device="cpu")
    _, after, _, _ = load_pretrained_model(str(tmp_path / "run"), device="cpu")  # the gates-only artifact
    assert isinstance(after, Qwen2_5_VLForConditionalGeneration)
    old, new = before.state_dict(), after.state_dict()
    gates = [name for name in new if "visual_gates_router" in name]
    assert gates and all(torch.equal(new[n], old[n]) for n in new if n not in gates)
    assert any(not torch.equal(new[n], old[n]) for n in gates)
    saved = load_file(tmp_path / "run" / "visual_gates.safetensors")
    loaded = exit_decoder_of(after).visual_gates_router.state_dict()
    assert all(torch.equal(saved["model.visual_gates_router." + k], v) for k, v in loaded.items())
