"""The generate benchmark runs end to end on the tiny preset under every cache, compiled ones included (dynamo's
eager backend: the same full-graph tracing without a compiler); no timing assertions, speed is read from the table.
Its KV-cache bytes follow the cache's shape, computed here apart; the composed ideal is the layer-weighted mix of
stock's timings; mode `none` makes the stock model's tokens under each cache."""

import contextlib
import dataclasses
import io
import json

import pytest
import torch

from llava.bench.generate import (
    CACHES, FIGURES, TIMES, Mode, Row, bench_modes, build_models, build_prompt, cache_options, composed_ideal, generate,
    main,
)
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
            "--compile-backend", "eager",
        ])
    rows = json.loads(out.read_text())["rows"]
    by_cache = {cache: {} for cache in CACHES}
    for row in rows:
        by_cache[row["cache"]][row["mode"], row["k"], row["batch"], row["new_tokens"]] = row
    return by_cache, printed.getvalue()


def kv_bytes(batch: int, lengths: list[int]) -> int:
    """Keys and values of `lengths[i]` tokens in layer i."""
    head_dim = TINY["hidden_size"] // TINY["num_attention_heads"]
    return sum(lengths) * 2 * TINY["num_key_value_heads"] * head_dim * FLOAT32_BYTES * batch


def test_rows_have_every_cache_mode_batch_count_and_field(bench):
    by_cache, table = bench
    modes = [("stock", None), ("none", None), ("fixed", 1), ("fixed", 2), ("dynamic", 2), ("fastv", 2)]
    fields = {f.name for f in dataclasses.fields(Row)}
    for rows in by_cache.values():
        assert set(rows) == {(mode, k, b, n) for mode, k in modes for b in BATCHES for n in NEW_TOKENS}
        for (mode, _, batch, n), row in rows.items():
            assert set(row) == fields and set(row["vs_stock"]) == set(FIGURES) and set(row["vs_ideal"]) == set(TIMES)
            assert row["ttft_ms"] > 0 and row["total_ms"] > 0 and row["kv_cache_bytes"] > 0
            assert row["peak_memory_bytes"] is None and row["generate_memory_bytes"] is None  # CPU
            if n == 1:
                assert row["decode_tokens_per_s"] is None and row["total_ms"] == row["ttft_ms"]
            stock = rows["stock", None, batch, n]  # the stock row of the same cache
            assert row["vs_stock"]["ttft_ms"] == pytest.approx(row["ttft_ms"] / stock["ttft_ms"])
            assert row["vs_stock"]["kv_cache_bytes"] == pytest.approx(row["kv_cache_bytes"] / stock["kv_cache_bytes"])
            assert row["vs_ideal"]["ttft_ms"] == pytest.approx(row["ideal"]["ttft_ms"] / row["ttft_ms"])
            if mode in ("stock", "none"):  # no exit: the ideal is stock itself
                assert row["ideal"]["total_ms"] == pytest.approx(stock["total_ms"])
    assert "TTFT ms" in table and "decode tok/s" in table and "of ideal" in table and "compiled" in table


def test_composed_ideal_weights_stock_timings_by_layers():
    """Exit after K of L layers: K/L of the whole prompt's time and (L-K)/L of the text-only one; FastV: the
    pruned prompt's after its layer K; no exit: the whole prompt's."""
    full, text_only, pruned = 8.0, 2.0, 5.0
    assert composed_ideal(Mode("fixed", 1, None), 4, full, text_only, pruned) == pytest.approx((8 + 3 * 2) / 4)
    assert composed_ideal(Mode("fastv", 2, None), 4, full, text_only, pruned) == pytest.approx((2 * 8 + 2 * 5) / 4)
    assert composed_ideal(Mode("none", None, None), 4, full, text_only, pruned) == full


def test_exit_layers_as_configured(bench):
    rows = bench[0]["dynamic"]
    for batch in BATCHES:
        assert rows["stock", None, batch, 1]["exit_layer"] is None
        assert rows["none", None, batch, 1]["exit_layer"] == LAYERS
        assert rows["fixed", 1, batch, 1]["exit_layer"] == 1
        assert rows["dynamic", 2, batch, 1]["exit_layer"] == LAYERS // 2  # the rigged gate fires after L/2 layers
        assert rows["fastv", 2, batch, 1]["exit_layer"] == LAYERS  # pruning only: some visual tokens stay


@pytest.mark.parametrize("cache", CACHES)
def test_kv_cache_bytes_after_prefill(bench, cache):
    """The same under every cache: what it holds after the prefill (a static layer's written slots)."""
    rows = bench[0][cache]
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


@pytest.mark.parametrize("cache", CACHES)
def test_none_generates_the_stock_tokens(cache):
    """The correctness oracle: our exit class in mode none decodes greedily what transformers' class does, under
    each cache (compiled: both compiled)."""
    device = torch.device("cpu")
    stock, ours = build_models("tiny", None, torch.float32, device, "sdpa")
    modes = {mode.name: mode for mode in bench_modes(stock.config.text_config)}
    inputs = build_prompt(2, TEXT_TOKENS, torch.float32, device)
    options = cache_options(cache, device, "eager")
    reference = generate(stock, inputs, modes["stock"], 8, options).sequences
    assert torch.equal(generate(ours, inputs, modes["none"], 8, options).sequences, reference)
    assert not torch.equal(reference[0, -8:], reference[1, -8:])  # the samples differ, so rows are not mixed up
