"""The generate benchmark runs end to end on the tiny preset (no timing assertions: speed is read from the table).
Its KV-cache bytes follow the cache's shape, computed here apart, and mode `none` makes the stock model's tokens."""

import contextlib
import dataclasses
import io
import json

import pytest
import torch

from llava.bench.generate import FIGURES, Row, bench_modes, build_models, build_prompt, generate, main
from llava.bench.prefill import PRESETS, VISUAL_TOKENS

TINY = PRESETS["tiny"]
LAYERS = TINY["num_hidden_layers"]
TEXT_TOKENS = 20
BATCHES = (1, 2)
NEW_TOKENS = (1, 2)
FLOAT32_BYTES = 4


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """(rows by (mode, k, batch, n), printed table) of one run on the CPU."""
    out = tmp_path_factory.mktemp("bench") / "generate.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main([
            "--preset", "tiny", "--device", "cpu", "--text-tokens", str(TEXT_TOKENS), "--repeats", "1",
            "--batch", *map(str, BATCHES), "--new-tokens", *map(str, NEW_TOKENS), "--json", str(out),
        ])
    rows = json.loads(out.read_text())["rows"]
    return {(row["mode"], row["k"], row["batch"], row["new_tokens"]): row for row in rows}, printed.getvalue()


def kv_bytes(batch: int, lengths: list[int]) -> int:
    """Keys and values of `lengths[i]` tokens in layer i."""
    head_dim = TINY["hidden_size"] // TINY["num_attention_heads"]
    return sum(lengths) * 2 * TINY["num_key_value_heads"] * head_dim * FLOAT32_BYTES * batch


def test_rows_have_every_mode_batch_count_and_field(bench):
    rows, table = bench
    modes = [("stock", None), ("none", None), ("fixed", 1), ("fixed", 2), ("dynamic", 2), ("fastv", 2)]
    assert set(rows) == {(mode, k, b, n) for mode, k in modes for b in BATCHES for n in NEW_TOKENS}
    fields = {f.name for f in dataclasses.fields(Row)}
    for (mode, _, batch, n), row in rows.items():
        assert set(row) == fields and set(row["vs_stock"]) == set(FIGURES)
        assert row["ttft_ms"] > 0 and row["total_ms"] > 0 and row["kv_cache_bytes"] > 0
        assert row["peak_memory_bytes"] is None and row["generate_memory_bytes"] is None  # CPU
        if n == 1:
            assert row["decode_tokens_per_s"] is None and row["total_ms"] == row["ttft_ms"]
        stock = rows["stock", None, batch, n]
        assert row["vs_stock"]["ttft_ms"] == pytest.approx(row["ttft_ms"] / stock["ttft_ms"])
        assert row["vs_stock"]["kv_cache_bytes"] == pytest.approx(row["kv_cache_bytes"] / stock["kv_cache_bytes"])
    assert "TTFT ms" in table and "decode tok/s" in table and "KV MiB" in table


def test_exit_layers_as_configured(bench):
    rows, _ = bench
    for batch in BATCHES:
        assert rows["stock", None, batch, 1]["exit_layer"] is None
        assert rows["none", None, batch, 1]["exit_layer"] == LAYERS
        assert rows["fixed", 1, batch, 1]["exit_layer"] == 1
        assert rows["dynamic", 2, batch, 1]["exit_layer"] == LAYERS // 2  # the rigged gate fires after L/2 layers
        assert rows["fastv", 2, batch, 1]["exit_layer"] == LAYERS  # pruning only: some visual tokens stay


def test_kv_cache_bytes_after_prefill(bench):
    rows, _ = bench
    full, text = VISUAL_TOKENS + TEXT_TOKENS, TEXT_TOKENS
    pruned = full - VISUAL_TOKENS // 2  # FastV's R = 0.5
    for batch in BATCHES:
        for n in NEW_TOKENS:
            assert rows["stock", None, batch, n]["kv_cache_bytes"] == kv_bytes(batch, [full] * LAYERS)
            assert rows["none", None, batch, n]["kv_cache_bytes"] == kv_bytes(batch, [full] * LAYERS)
            for k in (1, 2):
                expected = kv_bytes(batch, [full] * k + [text] * (LAYERS - k))
                assert rows["fixed", k, batch, n]["kv_cache_bytes"] == expected
            assert rows["dynamic", 2, batch, n]["kv_cache_bytes"] == rows["fixed", 2, batch, n]["kv_cache_bytes"]
            assert rows["fastv", 2, batch, n]["kv_cache_bytes"] == kv_bytes(batch, [full] * 2 + [pruned] * (LAYERS - 2))


def test_none_generates_the_stock_tokens():
    """The correctness oracle: our exit class in mode none decodes greedily what transformers' class does."""
    device = torch.device("cpu")
    stock, ours = build_models("tiny", None, torch.float32, device, "sdpa")
    modes = {mode.name: mode for mode in bench_modes(stock.config.text_config)}
    inputs = build_prompt(2, TEXT_TOKENS, torch.float32, device)
    reference = generate(stock, inputs, modes["stock"], 8).sequences
    assert torch.equal(generate(ours, inputs, modes["none"], 8).sequences, reference)
    assert not torch.equal(reference[0, -8:], reference[1, -8:])  # the samples differ, so rows are not mixed up
