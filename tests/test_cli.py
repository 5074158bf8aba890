"""The CLI chat, run as a user would, against the same model driven from Python."""

import ast
import subprocess
import sys

import pytest
import torch
from PIL import Image

from llava.conversation import get_conv_template
from llava.mm_utils import process_images, tokenizer_image_token

from family_checkpoints import family_checkpoint  # noqa: F401 (a fixture)


def run_cli(*args, stdin=""):
    return subprocess.run(
        [sys.executable, "-m", "llava.serve.cli", *args], input=stdin, capture_output=True, text=True, timeout=300
    )


def test_cli_answers_like_generate(llava_checkpoint, loaded, tmp_path):
    image_path = tmp_path / "red.png"
    Image.new("RGB", (80, 50), (200, 10, 10)).save(image_path)
    result = run_cli(
        "--model-path", llava_checkpoint, "--image-file", str(image_path), "--conv-mode", "vicuna_v1",
        "--temperature", "0", "--max-new-tokens", "5", "--device", "cpu",
        stdin="What is it?\n",
    )
    assert result.returncode == 0, result.stderr

    tokenizer, model, processor, _ = loaded
    conv = get_conv_template("vicuna_v1")
    conv.append_message(conv.roles[0], "<image>\nWhat is it?")
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")[None]
    pixels = process_images([Image.open(image_path)], processor, model.config)
    with torch.no_grad():
        output = model.generate(ids, images=pixels, do_sample=False, max_new_tokens=5, pad_token_id=0)
    answer = tokenizer.decode(output[0], skip_special_tokens=True).strip()
    assert answer
    assert result.stdout.split("\n")[0].startswith(f"USER: ASSISTANT: {answer}")
    assert result.stdout.rstrip().endswith("exit...")


def test_cli_missing_image_is_one_line_error(llava_checkpoint, tmp_path):
    result = run_cli("--model-path", llava_checkpoint, "--image-file", str(tmp_path / "nope.jpg"))
    assert result.returncode != 0
    assert result.stderr.strip() == f"llava.serve.cli: error: {tmp_path / 'nope.jpg'}: image file not found"


def test_cli_uses_the_saved_template_and_says_which(llava_checkpoint, tmp_path):
    import json
    import shutil

    image_path = tmp_path / "red.png"
    Image.new("RGB", (80, 50), (200, 10, 10)).save(image_path)
    args = ("--image-file", str(image_path), "--temperature", "0", "--max-new-tokens", "2", "--device", "cpu")
    saved = run_cli("--model-path", llava_checkpoint, *args, stdin="Hi?\n")
    assert saved.returncode == 0, saved.stderr
    assert "conversation template vicuna_v1 (saved in the checkpoint's config)" in saved.stderr
    assert saved.stdout.startswith("USER: ASSISTANT:")  # vicuna_v1's roles
    foreign = tmp_path / "my-llava"
    shutil.copytree(llava_checkpoint, foreign)
    config = json.loads((foreign / "config.json").read_text())
    del config["conv_mode"]
    (foreign / "config.json").write_text(json.dumps(config))
    named = run_cli("--model-path", str(foreign), *args, stdin="Hi?\n")
    assert "conversation template llava_v0 (the checkpoint saves none: LLaVA's rule for the folder name 'my-llava')" in named.stderr
    assert named.stdout.startswith("Human: Assistant:")  # llava_v0's roles


def test_cli_on_every_family_checkpoint_answers_as_the_stock_class(family_checkpoint, tmp_path):  # noqa: F811
    """Two turns with a family checkpoint: each answer is the stock class's greedy answer to the conversation so far,
    rendered by the checkpoint's own chat template."""
    from llava.model.families import FAMILY_MODULES
    from llava.model.families.processing import load_processor

    from family_checkpoints import WIDE, image

    family, folder = family_checkpoint
    from llava.model.checkpoint import Checkpoint

    if not Checkpoint.resolve(folder).is_family:
        pytest.skip(f"the loader reads {family} into our LLaVA class, prompted by LLaVA's templates (tested above)")
    picture = image(WIDE, seed=4)
    picture.save(tmp_path / "picture.png")
    result = run_cli("--model-path", folder, "--image-file", str(tmp_path / "picture.png"), "--temperature", "0",
                     "--max-new-tokens", "4", "--device", "cpu", "--exit-mode", "none", "--debug",
                     stdin="What is it?\nAnd?\n")
    assert result.returncode == 0, result.stderr[-3000:]
    processor = load_processor(folder)
    stock = FAMILY_MODULES[family].ADAPTER.model_class.from_pretrained(folder).eval()
    conversation, expected = [], []
    for question in ("<image>\nWhat is it?", "And?"):
        conversation.append({"from": "human", "value": question})
        inputs = processor.prompt_inputs(conversation, [Image.open(tmp_path / "picture.png").convert("RGB")])
        with torch.no_grad():
            ids = stock.generate(**inputs, do_sample=False, max_new_tokens=4, pad_token_id=processor.tokenizer.pad_token_id)
        answer = processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        conversation.append({"from": "gpt", "value": answer})
        expected.append(answer)
    # The answers as decoded whole (--debug): the streamed display of a random model's byte tokens may differ.
    turns = [ast.literal_eval(line) for line in result.stderr.splitlines() if line.startswith("{'prompt'")]
    assert [turn["outputs"] for turn in turns] == expected
