"""Prefill benchmark of the exit decoder: `python -m llava.bench.prefill [--preset llava-1.5-7b --layers 4]`.

A random-weight decoder of the chosen geometry gets 576 visual + N text tokens (the image after a LLaVA-length
system prompt). It times, in one run: transformers' stock LlamaModel.forward, our decoder in mode `none`, and
`fixed` K for each K; and prints theoretical FLOPs, the FLOPs-ideal speed-up and the **composed ideal**: stock
layers timed at the full length for the first K layers and at the text-only length for the rest. Efficiency =
composed ideal time / measured time: how close the exit gets to what a perfect exit would take on this hardware.
Dynamic mode twice: gates that never fire (tau = 1) give the gates' share of prefill time; gates firing after L/2
layers compare with fixed K = L/2. FastV (K, R) is composed of stock layers at the full length for K layers and at
the pruned length after.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

import torch
from transformers import LlamaConfig, LlamaModel

from llava.arguments import positive_int
from llava.bench.arguments import bench_parser, parse_bench_args, write_rows
from llava.bench.timing import device_and_dtype, interleaved_medians
from llava.model.visual_exit import DecoderGeometry, ExitRequest, VisualExitCache, VisualExitDecoderMixin, prefill_flops
from llava.tiny.gates import dynamic_exit_layer, rig_gates

PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=172, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=4),
    "llava-1.5-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, num_hidden_layers=32),
    "llava-1.5-13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40, num_hidden_layers=40),
}
VISUAL_TOKENS = 576  # CLIP ViT-L/14 at 336 px: 24 x 24 patches
SYSTEM_PROMPT_TOKENS = 35  # tokens before the image in LLaVA-1.5's vicuna_v1 prompt
GATE_HIDDEN_SIZE = 2048


class ExitLlamaModel(VisualExitDecoderMixin, LlamaModel):
    """A plain LLaMA decoder with the exit loop: the exit package needs no LLaVA around it."""


@dataclass
class Row:
    mode: str
    k: int | None
    median_ms: float
    tflops: float
    flops_speedup: float
    composed_ideal_ms: float | None
    speedup_vs_stock: float
    efficiency: float | None


def build_model(preset: str, layers: int | None, dtype: torch.dtype, device: torch.device, attn: str) -> ExitLlamaModel:
    """Random weights; the gates give P(exit) = 0.5 everywhere except after layer L/2 - 1, where P(exit) > 0.5.
    So tau = 0.5 exits after L/2 layers, and tau = 1 never exits while still running every gate."""
    geometry = dict(PRESETS[preset])
    if layers is not None:
        geometry["num_hidden_layers"] = layers
    config = LlamaConfig(**geometry, vocab_size=32, visual_gate_hidden_size=GATE_HIDDEN_SIZE, attn_implementation=attn)
    with torch.device(device):
        model = ExitLlamaModel(config).to(dtype).eval()
    rig_gates(model)
    return model


def run(args: argparse.Namespace) -> list[Row]:
    device, dtype = device_and_dtype(args.device, args.dtype)
    model = build_model(args.preset, args.layers, dtype, device, args.attn)
    layers = model.config.num_hidden_layers
    ks = args.k or sorted({max(1, layers // 4), max(1, layers // 2), max(1, 3 * layers // 4)})

    length = VISUAL_TOKENS + args.text_tokens
    prefix = min(SYSTEM_PROMPT_TOKENS, args.text_tokens)
    generator = torch.Generator(device=device).manual_seed(0)
    embeds = torch.randn(args.batch, length, model.config.hidden_size, generator=generator, device=device, dtype=dtype)
    visual = torch.zeros(args.batch, length, dtype=torch.bool, device=device)
    visual[:, prefix : prefix + VISUAL_TOKENS] = True
    mask = torch.ones(args.batch, length, dtype=torch.long, device=device)
    text_embeds = embeds[~visual].view(args.batch, args.text_tokens, -1)
    text_mask = mask[:, : args.text_tokens]
    fastv_k = min(args.fastv_k, layers)
    kept_visual = round((1 - args.fastv_r) * VISUAL_TOKENS)
    pruned_embeds, pruned_mask = embeds[:, : args.text_tokens + kept_visual], mask[:, : args.text_tokens + kept_visual]

    def stock(inputs, attention):
        return lambda: LlamaModel.forward(model, inputs_embeds=inputs, attention_mask=attention, use_cache=True)

    def ours(config):
        return lambda: model(
            inputs_embeds=embeds, attention_mask=mask, visual_mask=visual, exit_config=config,
            cache=VisualExitCache(config=model.config), use_cache=True,
        )

    plans = [("stock", None, stock(embeds, mask)), ("stock-text-only", None, stock(text_embeds, text_mask))]
    plans += [("stock-fastv-pruned", None, stock(pruned_embeds, pruned_mask))]
    plans += [("none", None, ours(ExitRequest("none").expand()))]
    plans += [("dynamic-never-exits", None, ours(ExitRequest("dynamic", threshold=1.0).expand()))]
    plans += [("dynamic", dynamic_exit_layer(model.config), ours(ExitRequest("dynamic").expand()))]
    plans += [("fixed", k, ours(ExitRequest("fixed", k).expand())) for k in ks]
    plans += [("fastv", fastv_k, ours(ExitRequest("fastv", fastv_k=fastv_k, fastv_r=args.fastv_r).expand()))]
    with torch.inference_mode():
        times = interleaved_medians({(mode, k): fn for mode, k, fn in plans}, device, args.repeats, args.warmup)

    geometry = DecoderGeometry.from_config(model.config)
    full_time, text_time = times[("stock", None)], times[("stock-text-only", None)]

    def flops(exit_layer: int, gates: int = 0, pruned: int = 0, prune_layer: int | None = None) -> float:
        """The batch's FLOPs: `prune_layer` layers at the full length, then the pruned length until `exit_layer`,
        then text only."""
        prune_layer = exit_layer if prune_layer is None else prune_layer
        entering = [length] * prune_layer + [length - pruned] * (exit_layer - prune_layer)
        entering += [length - VISUAL_TOKENS] * (layers - exit_layer)
        return prefill_flops(geometry, torch.tensor([entering]), torch.tensor([gates])).item() * args.batch

    base_flops = flops(layers)
    rows = []
    for (mode, k), seconds in times.items():
        if mode.startswith("stock-"):
            continue
        if mode == "fastv":  # the first K layers at the full length, the rest at the pruned length
            composed = (k * full_time + (layers - k) * times[("stock-fastv-pruned", None)]) / layers
            used = flops(layers, pruned=VISUAL_TOKENS - kept_visual, prune_layer=k)
        else:
            exit_layer = layers if k is None else k
            composed = (exit_layer * full_time + (layers - exit_layer) * text_time) / layers if k is not None else None
            used = flops(exit_layer, {"dynamic": exit_layer, "dynamic-never-exits": layers - 1}.get(mode, 0))
        rows.append(
            Row(
                mode=mode,
                k=k,
                median_ms=seconds * 1e3,
                tflops=used / 1e12,
                flops_speedup=base_flops / used,
                composed_ideal_ms=None if composed is None else composed * 1e3,
                speedup_vs_stock=full_time / seconds,
                efficiency=None if composed is None else composed / seconds,
            )
        )
    return rows


def format_table(rows: list[Row], args: argparse.Namespace) -> str:
    header = f"{'mode':<20} {'K':>3} {'median ms':>10} {'TFLOPs':>8} {'FLOPs x':>8} {'ideal ms':>9} {'vs stock':>9} {'efficiency':>10}"
    lines = [header, "-" * len(header)]
    for row in rows:
        ideal = f"{row.composed_ideal_ms:9.2f}" if row.composed_ideal_ms is not None else f"{'':>9}"
        efficiency = f"{row.efficiency:10.3f}" if row.efficiency is not None else f"{'':>10}"
        k = "" if row.k is None else row.k
        lines.append(
            f"{row.mode:<20} {k:>3} {row.median_ms:10.2f} {row.tflops:8.3f} {row.flops_speedup:8.2f}x {ideal} "
            f"{row.speedup_vs_stock:8.2f}x {efficiency}"
        )
    by_mode = {row.mode: row for row in rows}
    none_ratio = by_mode["none"].median_ms / by_mode["stock"].median_ms
    gate_share = 1 - by_mode["none"].median_ms / by_mode["dynamic-never-exits"].median_ms
    lines.append(f"mode none / stock time: {none_ratio:.3f}   gates' share of dynamic prefill: {gate_share:+.2%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__.splitlines()[0], PRESETS, dtypes=("float32", "bfloat16", "float16"))
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--k", type=int, nargs="*", default=None, help="fixed exit layers (default: L/4, L/2, 3L/4)")
    parser.add_argument("--fastv-k", type=positive_int, default=2, help="FastV: layers that see every visual token (FastV's K)")
    parser.add_argument("--fastv-r", type=float, default=0.5, help="FastV: share of visual tokens pruned after K")
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"), help="attention implementation")
    parser.add_argument("--warmup", type=int, default=1)
    args = parse_bench_args(parser, argv, PRESETS)
    if any(not 0 <= k <= args.layers for k in args.k or ()):
        parser.error(f"--k {' '.join(map(str, args.k))}: exit layers lie in 0..{args.layers}")
    if args.fastv_k > args.layers or not 0 <= args.fastv_r <= 1 or args.warmup < 0:
        parser.error(f"--fastv-k in 1..{args.layers}, --fastv-r in [0, 1] and --warmup >= 0")
    rows = run(args)
    print(f"preset {args.preset}, layers {args.layers}, batch {args.batch}, {VISUAL_TOKENS} visual + "
          f"{args.text_tokens} text tokens")
    print(format_table(rows, args))
    write_rows(args.json, args, [asdict(row) for row in rows])


if __name__ == "__main__":
    main()
