"""Cost of one gate-training step against a plain forward of the same batch:
`python -m llava.bench.gate_step [--preset llava-1.5-7b --layers 4]`.

The step runs the decoder once to layer k, then the full and the exit continuation, reads the answer-token
logits of both, and trains gate k (backward + optimizer step). k is drawn uniformly in training, so the table
gives each k and their mean.
"""

from __future__ import annotations

import torch

from llava.bench.prefill import PRESETS, SYSTEM_PROMPT_TOKENS, VISUAL_TOKENS, build_model
from llava.arguments import positive_int
from llava.bench.arguments import bench_parser, parse_bench_args
from llava.bench.timing import device_and_dtype, interleaved_medians
from llava.model.visual_exit.training import IGNORE_INDEX, ExitLabelRule, gate_training_pass

VOCAB = 32000


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__.splitlines()[0], PRESETS)
    parser.add_argument("--answer-tokens", type=positive_int, default=10)
    parser.add_argument("--batch", type=positive_int, default=2)
    args = parse_bench_args(parser, argv, PRESETS)
    if args.layers < 2:
        parser.error("--layers 1: a gate trains for an exit before the last layer, so at least 2")
    if args.answer_tokens >= args.text_tokens:
        parser.error(f"--answer-tokens {args.answer_tokens}: the answer is part of the {args.text_tokens} text tokens")
    device, dtype = device_and_dtype(args.device, args.dtype)

    model = build_model(args.preset, args.layers, dtype, device, "sdpa")
    model.requires_grad_(False)
    model.visual_gates_router.requires_grad_(True)
    with torch.device(device):
        lm_head = torch.nn.Linear(model.config.hidden_size, VOCAB, bias=False).to(dtype).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.visual_gates_router.parameters(), lr=1e-5)
    length = VISUAL_TOKENS + args.text_tokens
    embeds = torch.randn(args.batch, length, model.config.hidden_size, device=device, dtype=dtype)
    mask = torch.ones(args.batch, length, dtype=torch.long, device=device)
    visual = torch.zeros_like(mask, dtype=torch.bool)
    visual[:, SYSTEM_PROMPT_TOKENS : SYSTEM_PROMPT_TOKENS + VISUAL_TOKENS] = True
    labels = torch.full_like(mask, IGNORE_INDEX)
    labels[:, -args.answer_tokens :] = torch.randint(0, VOCAB, (args.batch, args.answer_tokens), device=device)

    def forward():
        with torch.no_grad():
            return lm_head(model(inputs_embeds=embeds, attention_mask=mask, visual_mask=visual, use_cache=False).last_hidden_state)

    def step(layer: int):
        def run():
            out = gate_training_pass(model, lm_head, embeds, mask, None, visual, labels, layer, ExitLabelRule())
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    layers = model.config.num_hidden_layers
    fns = {"forward": forward} | {k: step(k) for k in range(layers - 1)}
    times = interleaved_medians(fns, device, args.repeats)
    base = times.pop("forward")
    print(f"preset {args.preset}, layers {layers}, batch {args.batch}, {length} tokens, {args.answer_tokens} answer tokens")
    print(f"{'gate layer k':>12} {'step ms':>10} {'x forward':>10}")
    print(f"{'forward':>12} {base * 1e3:10.1f} {1.0:10.2f}")
    for k, seconds in times.items():
        print(f"{k:>12} {seconds * 1e3:10.1f} {seconds / base:10.2f}")
    mean = sum(times.values()) / len(times)
    print(f"{'mean':>12} {mean * 1e3:10.1f} {mean / base:10.2f}   (k uniform, as in training)")


if __name__ == "__main__":
    main()
