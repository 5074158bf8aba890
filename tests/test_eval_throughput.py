"""The llava-hf export of a LLaVA checkpoint (`llava.model.export_hf`) and the evaluation-throughput bench
(`llava.bench.eval_throughput`): transformers' own class on the export computes what our class computes, its
processor and chat template give LLaVA's prompt token for token, and gqa.sh at batch 1 and 4 and lmms-eval's own
`llava_hf` model answer the world's questions alike (no timing assertions)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from llava.bench.eval_throughput import WORLD, main
from llava.conversation import conv_templates
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from llava.model.export_hf import export_hf
from llava.world.generate import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD_MODEL = os.path.join(ROOT, "checkpoints", "tiny-world-llava")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small tiny world where its lmms-eval tasks read it: <folder>/playground/data/tiny_world."""
    root = tmp_path_factory.mktemp("throughput")
    generate(str(root / WORLD), train=2, test=12, seed=3)
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_hf(WORLD_MODEL, str(tmp_path_factory.mktemp("world-hf")))


def llava_prompt(question: str) -> str:
    conversation = conv_templates["vicuna_v1"].copy()
    conversation.append_message(conversation.roles[0], "<image>\n" + question)
    conversation.append_message(conversation.roles[1], None)
    return conversation.get_prompt()


def test_the_export_prompts_and_computes_as_our_class(world, exported):
    tokenizer, model, image_processor, _ = load_pretrained_model(WORLD_MODEL, device="cpu")
    processor = AutoProcessor.from_pretrained(exported)
    stock = LlavaForConditionalGeneration.from_pretrained(exported, dtype=torch.float32).eval()
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    with open(world / WORLD / "eval" / "gqa" / "llava_gqa_testdev_balanced.jsonl") as handle:
        questions = [json.loads(line) for line in handle][:6]
    for question in questions:
        image = Image.open(world / WORLD / "eval" / "gqa" / "data" / "images" / question["image"]).convert("RGB")
        ours = tokenizer_image_token(llava_prompt(question["text"]), tokenizer)
        # lmms-eval's chat path hands the processor image and text parts; its simple path a string with <image>.
        parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question["text"]}]}]
        text = processor.apply_chat_template(parts, add_generation_prompt=True)
        as_string = processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": "<image>\n" + question["text"]}], tokenize=False, add_generation_prompt=True)
        assert text == as_string
        inputs = processor(images=[image], text=text, return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        first = ids.index(image_token)
        count = ids.count(image_token)
        assert ids[:first] + [-200] + ids[first + count :] == ours  # one placeholder run where LLaVA has its index
        pixels = process_images([image], image_processor, model.config)
        assert torch.allclose(inputs["pixel_values"], pixels, atol=1e-6)
        with torch.no_grad():
            theirs = stock(**inputs).logits[0, -1]
            mine = model(input_ids=torch.tensor([ours]), images=pixels).logits[0, -1]
        assert (theirs - mine).abs().max() <= 1e-4


def test_a_gated_checkpoint_is_not_exported(tmp_path):
    gated = tmp_path / "gated"
    subprocess.run([sys.executable, os.path.join(ROOT, "init_weight.py"), "--model-path", WORLD_MODEL,
                    "--output-dir", str(gated)], check=True, capture_output=True, cwd=ROOT)
    with pytest.raises(ValueError, match="has exit gates"):
        export_hf(str(gated), str(tmp_path / "out"))


def test_gqa_sh_and_lmms_eval_llava_hf_answer_alike(world, exported, tmp_path, capsys):
    pytest.importorskip("lmms_eval", reason="scripts/test.sh installs lmms-eval (WITH_LMMS_EVAL=1)")
    pytest.importorskip("decord", reason="lmms-eval's llava_hf model imports decord")
    out = tmp_path / "throughput.json"
    main(["--questions", "10", "--batch", "1", "4", "--world", str(world / WORLD), "--hf-path", exported,
          "--work", str(tmp_path / "work"), "--json", str(out)])
    runs = json.loads(out.read_text())["runs"]
    assert [(run["command"], run["batch"]) for run in runs] == [
        ("gqa.sh batch 1", 1), ("gqa.sh batch 4", 4), ("lmms-eval llava_hf", 1)]
    for run in runs:
        assert run["differing"] == [] and run["questions"] == 10
        assert run["questions_per_s"] == pytest.approx(10 / run["seconds"])
    assert runs[0]["vs_llava_hf"] == pytest.approx(runs[0]["marginal_questions_per_s"] / runs[2]["marginal_questions_per_s"],
                                                   nan_ok=True)
    assert "marginal q/s" in capsys.readouterr().out


def test_a_world_elsewhere_is_refused_in_one_line(tmp_path):
    generate(str(tmp_path / "world"), train=1, test=2, seed=1)
    with pytest.raises(SystemExit, match="read it as playground/data/tiny_world"):
        main(["--world", str(tmp_path / "world")])
