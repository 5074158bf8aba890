"""Generation benchmark of the exit on transformers' own LLaVA class:
`python -m llava.bench.generate [--preset llava-1.5-7b --layers 4] [--batch 1 8] [--new-tokens 1 64 256]
[--caches dynamic static compiled]`.

What a user runs instead of our exit is transformers' `LlavaForConditionalGeneration`; this times its whole
`generate` (stock) against the same weights under our exit (`enable_visual_exit`) in modes `none`, `fixed` K = L/4
and L/2, `dynamic` (gates rigged as in prefill.py to fire after L/2 layers) and FastV K = 2, R = 0.5, all in one run
with interleaved repeats, under each of three caches: `dynamic` (generate's default), `static`
(`cache_implementation="static"`: transformers' StaticCache for stock, our StaticExitCache) and `compiled` (static,
and generate compiles the decode step in full graph, stock alike; on a CPU too). The LM has the preset's geometry
and random weights; the CLIP tower sees 336 px images in 14 px patches (576 visual tokens) but is tiny in width and
depth, so the LM's cost dominates as in LLaVA-1.5.

The prompt is prefill.py's: the first min(35, N) of the N text tokens (BOS and the system prompt), the 576 image
placeholders, then the rest of the text. The B samples of a batch draw their text apart, at one length (no padding).
Every generate is greedy and makes exactly n new tokens. Per cache, mode, batch and n it reports: time to first
token (generate with n = 1), decode tokens/s B·(n−1) / (T(n) − T(1)), total latency T(n), peak memory and the
generate's own share of it (CUDA only), and the KV cache's key/value bytes right after the prefill, each also as this
mode's value / stock's under the same cache; and TTFT, decode rate and total as a share of the **composed ideal**
(DESIGN.md §4): stock generate timed on the whole prompt for the layers before the exit (or FastV's pruning) and on
the text-only (pruned) prompt for the rest, each weighted by its layers — 1.0 is an exit with no overhead of its own.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from tqdm import tqdm
from transformers import CLIPVisionConfig, CompileConfig, GenerationConfig, LlavaConfig, LlavaForConditionalGeneration

from llava.arguments import positive_int
from llava.bench.arguments import bench_parser, parse_bench_args, write_rows
from llava.bench.prefill import GATE_HIDDEN_SIZE, PRESETS, SYSTEM_PROMPT_TOKENS, VISUAL_TOKENS
from llava.bench.timing import device_and_dtype, interleaved_medians, synchronize
from llava.compat import output_cache
from llava.model.visual_exit import ExitConfig, ExitRequest, enable_visual_exit, exit_decoder_of
from llava.tiny.gates import dynamic_exit_layer, rig_gates

# llava-hf/llava-1.5-7b-hf's vocabulary: LLaMA's 32000 pieces, then <image> and <pad>, padded to 32064.
VOCAB_SIZE, IMAGE_TOKEN_ID, PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID = 32064, 32000, 32001, 1, 2
FIRST_TEXT_ID = 3  # after <unk>, <s>, </s>
IMAGE_SIZE, PATCH_SIZE = 336, 14  # (336 / 14)^2 = 576 patches, the class token dropped ("default" strategy)
TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
FASTV_K, FASTV_R = 2, 0.5
FIGURES = ("ttft_ms", "decode_tokens_per_s", "total_ms", "peak_memory_bytes", "generate_memory_bytes", "kv_cache_bytes")
TIMES = ("ttft_ms", "decode_tokens_per_s", "total_ms")  # the figures the composed ideal has
CACHES = ("dynamic", "static", "compiled")
# Enough compiled graphs for every mode, batch and prompt of a run (each has its own shapes); past dynamo's default
# limit of 8 the rest would silently run uncompiled.
RECOMPILE_LIMIT = 256


@dataclass(frozen=True)
class Mode:
    name: str
    k: int | None  # the exit (fixed, dynamic) or FastV's pruning layer
    exit_config: ExitConfig | None  # None: transformers' stock class


STOCK = Mode("stock", None, None)
# The stock runs the composed ideal is made of besides STOCK: the text-only prompt (after an exit), FastV's pruned one.
TEXT_ONLY, PRUNED = Mode("stock-text-only", None, None), Mode("stock-fastv-pruned", None, None)


@dataclass
class Row:
    """One mode under one cache at one batch size and new-token count. `exit_layer`: the prefill's mean exit layer
    as the model reported it (L: the visual tokens never left; None for stock). `generate_memory_bytes`: the peak
    during the generate less what was allocated before it (the weights, shared by every mode, and the inputs), i.e.
    the KV cache and activations. CUDA-only figures are None on a CPU. `vs_stock[figure]`: this row's figure /
    stock's under the same cache at the same batch and n. `ideal[figure]`: the composed ideal's TTFT, decode rate
    and total; `vs_ideal[figure]`: how much of it this row reaches (ideal time / time; rate / ideal rate)."""

    cache: str
    mode: str
    k: int | None
    batch: int
    new_tokens: int
    exit_layer: float | None
    ttft_ms: float
    decode_tokens_per_s: float | None
    total_ms: float
    peak_memory_bytes: int | None
    generate_memory_bytes: int | None
    kv_cache_bytes: int
    vs_stock: dict[str, float | None] = field(default_factory=dict)
    ideal: dict[str, float | None] = field(default_factory=dict)
    vs_ideal: dict[str, float | None] = field(default_factory=dict)


@dataclass
class Probe:
    """What one untimed generate call shows besides its time (it also warms up its shapes' kernels)."""

    peak_memory_bytes: int | None
    generate_memory_bytes: int | None
    kv_cache_bytes: int
    exit_layer: float | None


def build_models(preset: str, layers: int | None, dtype: torch.dtype, device: torch.device, attn: str):
    """(stock, ours): a random-weight `LlavaForConditionalGeneration` and the same weight tensors under our exit,
    with gates. Sharing the tensors keeps one copy in memory (the 13B preset fits beside itself), so memory figures
    differ only by what each generate allocates."""
    text = dict(PRESETS[preset], vocab_size=VOCAB_SIZE, pad_token_id=PAD_TOKEN_ID, bos_token_id=BOS_TOKEN_ID,
                eos_token_id=EOS_TOKEN_ID)
    if layers is not None:
        text["num_hidden_layers"] = layers
    config = LlavaConfig(
        text_config={"model_type": "llama", **text},
        vision_config=CLIPVisionConfig(**TINY_TOWER, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE).to_dict(),
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=VISUAL_TOKENS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)  # the same random weights in every run
    with torch.device(device):
        stock = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn).eval()
    stock.generation_config = GenerationConfig(
        bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID, do_sample=False
    )
    # deepcopy with every tensor already in its memo copies the modules and configs but shares the tensors.
    shared = {id(tensor): tensor for tensor in [*stock.parameters(), *stock.buffers()]}
    ours = enable_visual_exit(copy.deepcopy(stock, shared), gate_hidden_size=GATE_HIDDEN_SIZE)
    rig_gates(exit_decoder_of(ours))
    return stock, ours


def build_prompt(batch: int, text_tokens: int, dtype: torch.dtype, device: torch.device, visual_tokens: int = VISUAL_TOKENS,
                 with_image: bool = True) -> dict[str, torch.Tensor]:
    """generate's inputs: prefill.py's layout (text prefix, `visual_tokens` image placeholders, the rest of the
    text), random text ids per sample and random pixels. Without the image (the composed ideal's shorter prompts) the
    placeholders are plain tokens of the LM and no pixels are given."""
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(FIRST_TEXT_ID, IMAGE_TOKEN_ID, (batch, text_tokens), generator=generator)
    text[:, 0] = BOS_TOKEN_ID
    prefix = min(SYSTEM_PROMPT_TOKENS, text_tokens)
    image = torch.full((batch, visual_tokens), IMAGE_TOKEN_ID)
    input_ids = torch.cat([text[:, :prefix], image, text[:, prefix:]], dim=1)
    pixel_values = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    inputs = {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids, device=device)}
    if with_image:
        inputs["pixel_values"] = pixel_values.to(device=device, dtype=dtype)
    return inputs


def cache_options(cache: str, device: torch.device, backend: str) -> dict:
    """generate's arguments for one of CACHES; compiled: full graph, on a CPU too (transformers compiles the decode
    step by itself on accelerators only)."""
    if cache == "dynamic":
        return {}
    if cache == "static":
        return {"cache_implementation": "static", "disable_compile": True}
    config = CompileConfig(fullgraph=True, backend=backend, **({} if device.type == "cuda" else {"mode": None}))
    config._compile_all_devices = device.type != "cuda"
    return {"cache_implementation": "static", "compile_config": config}


def generate(model, inputs: dict, mode: Mode, new_tokens: int, options: dict | None = None):
    """One greedy generate of exactly `new_tokens` tokens; its output carries the cache (with one new token, the
    cache right after the prefill) and, under the exit, the prefill's `exit_stats`."""
    exit_argument = {} if mode.exit_config is None else {"exit_config": mode.exit_config}
    return model.generate(
        **inputs, **exit_argument, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        return_dict_in_generate=True, **(options or {}),
    )


def kv_cache_bytes(cache) -> int:
    """The keys and values the cache holds; of a static layer, the slots written so far (its allocation is sized
    by generate for the longest request it saw, which says nothing of this mode)."""
    total = 0
    for layer in cache.layers:
        slots = layer.keys.shape[-2]
        written = int(getattr(layer, "cumulative_length", slots))
        total += (layer.keys.nbytes + layer.values.nbytes) * written // slots
    return total


def bench_modes(text_config) -> list[Mode]:
    layers = text_config.num_hidden_layers
    fixed = sorted({max(1, layers // 4), max(1, layers // 2)})
    fastv_k = min(FASTV_K, layers)
    return [
        STOCK,
        Mode("none", None, ExitRequest("none").expand()),
        *[Mode("fixed", k, ExitRequest("fixed", k).expand()) for k in fixed],
        Mode("dynamic", dynamic_exit_layer(text_config), ExitRequest("dynamic").expand()),
        Mode("fastv", fastv_k, ExitRequest("fastv", fastv_k=fastv_k, fastv_r=FASTV_R).expand()),
    ]


def probe(call: Callable[[], object], device: torch.device) -> Probe:
    before = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    output = call()
    synchronize(device)
    peak = None if before is None else torch.cuda.max_memory_allocated(device)
    stats = getattr(output, "exit_stats", None)
    return Probe(
        peak_memory_bytes=peak,
        generate_memory_bytes=None if peak is None else peak - before,
        kv_cache_bytes=kv_cache_bytes(output_cache(output)),
        exit_layer=None if stats is None else stats.exit_layer.float().mean().item(),
    )


def measure(calls: dict, device: torch.device, repeats: int) -> tuple[dict, dict]:
    """(probes, median seconds) of each call: one untimed probe each (its warm-up), then timing.py's interleaved
    rounds."""
    probes = {key: probe(call, device) for key, call in tqdm(calls.items(), desc="probing generate calls", unit="call")}
    return probes, interleaved_medians(calls, device, repeats, warmup=0)


def ratio(value: float | None, reference: float | None) -> float | None:
    return None if value is None or not reference else value / reference


def run(args: argparse.Namespace) -> list[Row]:
    device, dtype = device_and_dtype(args.device, args.dtype)
    stock, ours = build_models(args.preset, args.layers, dtype, device, args.attn)
    modes = bench_modes(stock.config.text_config)
    batches, counts = sorted(set(args.batch)), sorted(set(args.new_tokens))
    kept = round((1 - FASTV_R) * VISUAL_TOKENS)
    prompts = {
        (mode, batch): build_prompt(batch, args.text_tokens, dtype, device, *shape)
        for batch in batches
        for mode, shape in [(None, ()), (TEXT_ONLY, (0, False)), (PRUNED, (kept, False))]
    }
    if "compiled" in args.caches:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    calls = {}  # n = 1 always: T(1) is the time to first token and the base of the decode rate
    for cache in args.caches:
        options = cache_options(cache, device, args.compile_backend)
        for batch in batches:
            for n in sorted({1, *counts}):
                for mode in [*modes, TEXT_ONLY, PRUNED]:
                    model = stock if mode.exit_config is None else ours
                    inputs = prompts[mode if mode in (TEXT_ONLY, PRUNED) else None, batch]
                    calls[cache, mode, batch, n] = partial(generate, model, inputs, mode, n, options)
    with torch.inference_mode():
        generate(stock, prompts[None, batches[0]], modes[0], 1)  # first-call costs (kernels, workspaces) out of any probe
        probes, seconds = measure(calls, device, args.repeats)
    layers = stock.config.text_config.num_hidden_layers
    rows = [
        row_of(cache, mode, batch, n, probes, seconds, layers)
        for cache in args.caches for batch in batches for n in counts for mode in modes
    ]
    stock_rows = {(row.cache, row.batch, row.new_tokens): row for row in rows if row.mode == "stock"}
    for row in rows:
        reference = stock_rows[row.cache, row.batch, row.new_tokens]
        row.vs_stock = {name: ratio(getattr(row, name), getattr(reference, name)) for name in FIGURES}
    return rows


def composed_ideal(mode: Mode, layers: int, full: float, text_only: float, pruned: float) -> float:
    """Seconds of a perfect exit: stock's time on the whole prompt for the layers before the exit (or FastV's
    pruning), on the shorter prompt for the rest."""
    if mode.name == "fastv":
        return (mode.k * full + (layers - mode.k) * pruned) / layers
    first = layers if mode.k is None else mode.k
    return (first * full + (layers - first) * text_only) / layers


def row_of(cache: str, mode: Mode, batch: int, n: int, probes: dict, seconds: dict, layers: int) -> Row:
    """The figures of `mode` under `cache` at `batch` and `n`; time to first token, exit layer and KV cache from its
    n = 1 calls; the composed ideal from the stock calls of the same cache."""
    first, total = seconds[cache, mode, batch, 1], seconds[cache, mode, batch, n]
    prefill, shown = probes[cache, mode, batch, 1], probes[cache, mode, batch, n]
    ideal_first, ideal_total = (
        composed_ideal(mode, layers, *(seconds[cache, m, batch, count] for m in (STOCK, TEXT_ONLY, PRUNED)))
        for count in (1, n)
    )
    row = Row(
        cache=cache, mode=mode.name, k=mode.k, batch=batch, new_tokens=n, exit_layer=prefill.exit_layer,
        ttft_ms=first * 1e3,
        decode_tokens_per_s=decode_rate(batch, n, first, total),
        total_ms=total * 1e3,
        peak_memory_bytes=shown.peak_memory_bytes,
        generate_memory_bytes=shown.generate_memory_bytes,
        kv_cache_bytes=prefill.kv_cache_bytes,
        ideal={"ttft_ms": ideal_first * 1e3, "decode_tokens_per_s": decode_rate(batch, n, ideal_first, ideal_total),
               "total_ms": ideal_total * 1e3},
    )
    row.vs_ideal = {  # > 1 is faster than the ideal (noise, or a stock overhead the exit does not have)
        "ttft_ms": ratio(row.ideal["ttft_ms"], row.ttft_ms),
        "decode_tokens_per_s": ratio(row.decode_tokens_per_s, row.ideal["decode_tokens_per_s"]),
        "total_ms": ratio(row.ideal["total_ms"], row.total_ms),
    }
    return row


def decode_rate(batch: int, n: int, first: float, total: float) -> float | None:
    """B·(n − 1) tokens over the time past the first; None for n = 1, or when noise makes that time negative."""
    return batch * (n - 1) / (total - first) if total > first else None


COLUMNS = (  # (figure, heading, scale, decimals)
    ("ttft_ms", "TTFT ms", 1, 1),
    ("decode_tokens_per_s", "decode tok/s", 1, 1),
    ("total_ms", "total ms", 1, 1),
    ("peak_memory_bytes", "peak MiB", 2**-20, 0),
    ("generate_memory_bytes", "generate MiB", 2**-20, 0),
    ("kv_cache_bytes", "KV MiB", 2**-20, 2),
)
CELL = 18


def format_table(rows: list[Row]) -> str:
    """Each figure with its ratio to stock (same cache) beside it, then the share of the composed ideal reached by
    TTFT / decode / total; '-' where a figure does not exist (CPU memory, n = 1)."""
    header = (f"{'cache':<9}{'mode':<8} {'K':>3} {'exit':>5} {'B':>3} {'n':>4} "
              + " ".join(f"{h:>{CELL}}" for _, h, _, _ in COLUMNS) + f" {'of ideal TTFT/dec/tot':>22}")
    lines = [header, "-" * len(header)]
    for row in rows:
        k = "" if row.k is None else row.k
        exit_layer = "" if row.exit_layer is None else f"{row.exit_layer:g}"
        cells = []
        for name, _, scale, decimals in COLUMNS:
            value, relative = getattr(row, name), row.vs_stock[name]
            text = "-" if value is None else f"{value * scale:.{decimals}f}"
            text += "" if relative is None else f" ({relative:.2f}x)"
            cells.append(f"{text:>{CELL}}")
        ideal = "/".join("-" if row.vs_ideal[name] is None else f"{row.vs_ideal[name]:.2f}" for name in TIMES)
        lines.append(f"{row.cache:<9}{row.mode:<8} {k:>3} {exit_layer:>5} {row.batch:>3} {row.new_tokens:>4} "
                     + " ".join(cells) + f" {ideal:>22}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__.splitlines()[0], PRESETS)
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=positive_int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa")
    parser.add_argument("--caches", choices=CACHES, nargs="+", default=list(CACHES),
                        help="dynamic (default cache), static, compiled (static, decode step compiled in full graph)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled runs")
    args = parse_bench_args(parser, argv, PRESETS)
    rows = run(args)
    print(f"preset {args.preset}, layers {args.layers}, {VISUAL_TOKENS} visual + {args.text_tokens} text tokens, "
          f"greedy, median of {args.repeats}; ratios to stock under the same cache")
    print(format_table(rows))
    write_rows(args.json, args, [asdict(row) for row in rows])


if __name__ == "__main__":
    main()
