"""The prefill benchmark runs end to end on the tiny preset; its FLOPs columns follow the formula (no timing
assertions: speed goals are read from the printed table)."""

import json

import pytest
import torch
from transformers import LlamaConfig

from llava.bench.prefill import PRESETS, VISUAL_TOKENS, main
from llava.model.visual_exit import DecoderGeometry


def test_prefill_benchmark_tiny(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["--preset", "tiny", "--text-tokens", "20", "--k", "1", "3", "--repeats", "1", "--warmup", "0", "--json", str(out)])
    table = capsys.readouterr().out
    assert "efficiency" in table and "mode none / stock time" in table
    rows = {(row["mode"], row["k"]): row for row in json.loads(out.read_text())["rows"]}
    expected = {("stock", None), ("none", None), ("dynamic-never-exits", None), ("dynamic", 2), ("fixed", 1), ("fixed", 3),
                ("fastv", 2)}
    assert set(rows) == expected
    geometry = DecoderGeometry.from_config(LlamaConfig(**PRESETS["tiny"]))
    n, text = torch.tensor(VISUAL_TOKENS + 20), torch.tensor(20)
    full, short = geometry.layer_flops(n).item(), geometry.layer_flops(text).item()
    assert abs(rows[("fixed", 1)]["tflops"] * 1e12 - (full + 3 * short)) < 1
    assert abs(rows[("fixed", 1)]["flops_speedup"] - 4 * full / (full + 3 * short)) < 1e-9
    pruned = geometry.layer_flops(n - VISUAL_TOKENS // 2).item()  # FastV's default R = 0.5 after K = 2
    assert abs(rows[("fastv", 2)]["tflops"] * 1e12 - (2 * full + 2 * pruned)) < 1
    for key in (("fixed", 1), ("fixed", 3), ("dynamic", 2), ("fastv", 2)):
        row = rows[key]
        assert abs(row["efficiency"] - row["composed_ideal_ms"] / row["median_ms"]) < 1e-9


@pytest.mark.parametrize("bench, argv, message", [
    ("prefill", ["--layers", "0"], "argument --layers: must be at least 1, got 0"),
    ("prefill", ["--k", "9"], "--k 9: exit layers lie in 0..4"),
    ("prefill", ["--batch", "0"], "argument --batch: must be at least 1"),
    ("prefill", ["--fastv-r", "1.5"], "--fastv-r in [0, 1]"),
    ("generate", ["--new-tokens", "0"], "argument --new-tokens: must be at least 1"),
    ("generate", ["--repeats", "0"], "argument --repeats: must be at least 1"),
    ("gate_step", ["--layers", "1"], "--layers 1: a gate trains for an exit before the last layer"),
    ("gate_step", ["--answer-tokens", "80"], "--answer-tokens 80: the answer is part of the 60 text tokens"),
    ("generate", ["--json", "/proc/nowhere/bench.json"], "--json /proc/nowhere/bench.json: cannot write it"),
])
def test_bad_arguments_stop_before_any_work(bench, argv, message, capsys):
    import importlib

    module = importlib.import_module(f"llava.bench.{bench}")
    with pytest.raises(SystemExit) as stopped:
        module.main(["--preset", "tiny", *argv])
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_json_into_a_new_folder(tmp_path, capsys):
    out = tmp_path / "new" / "folder" / "bench.json"
    main(["--preset", "tiny", "--text-tokens", "20", "--k", "1", "--repeats", "1", "--warmup", "0", "--json", str(out)])
    assert json.loads(out.read_text())["rows"]
