"""The README's code runs as written: its Python block for transformers' own VLM classes, on a tiny Qwen2.5-VL
checkpoint and an image in place of the paths it names."""

import os
import re

from PIL import Image

from llava.tiny.families import write_tiny_family

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_block(containing: str) -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    (block,) = [b for b in blocks if containing in b]
    return block


def test_family_snippet_runs_as_written(tmp_path, capsys):
    code = python_block("enable_visual_exit(Qwen2_5_VLForConditionalGeneration")
    checkpoint = write_tiny_family(str(tmp_path / "qwen"), "qwen2.5-vl")
    Image.new("RGB", (60, 40), (200, 30, 30)).save(tmp_path / "cat.jpg")
    code = code.replace('"/models/Qwen2.5-VL-7B-Instruct"', repr(checkpoint)).replace('"cat.jpg"', repr(str(tmp_path / "cat.jpg")))
    code = code.replace("layer=8", "layer=2")  # the tiny model has 4 layers
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1].startswith("tensor([2])")  # the exit layer, then the FLOPs
