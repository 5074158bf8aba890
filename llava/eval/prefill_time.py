"""Measured prefill time of several exit settings on the same questions, as a ratio to mode `none`: the third unit
(beside visual tokens and FLOPs) in which the comparison and the quickstart report every method.

The settings are timed in interleaved rounds (each round runs every setting once, on every batch), so a drift of
the machine hits them alike; each setting's time is the median over the rounds of its summed batch prefills. The
prefill is the model's first forward of `generate` (time to the first token's logits), as the loader times it."""

from __future__ import annotations

import statistics

import torch
from tqdm import tqdm

from llava.eval.model_vqa_loader import PrefillTimer, generate_inputs, timed_generate
from llava.model.visual_exit import ExitConfig

PREFILL_TIME = "prefill_time.json"  # beside the runs' folders: {"questions", "repeats", "runs": {name: {seconds, ratio}}}


def prefill_seconds(model, tokenizer, processor, prepared_batches: list[list], configs: dict[str, ExitConfig],
                    repeats: int) -> dict[str, float]:
    """{name: median seconds of the prefills of every batch} for each exit setting, in interleaved rounds."""
    inputs = [generate_inputs(model, tokenizer, batch, processor) for batch in prepared_batches]
    timer = PrefillTimer(model, model.device)
    samples: dict[str, list[float]] = {name: [] for name in configs}
    try:
        with torch.inference_mode():
            for round_ in tqdm(range(repeats + 1), desc="timing prefills", unit="round"):
                for name, config in configs.items():
                    total = 0.0
                    for batch in inputs:
                        timed_generate(model, batch, timer, exit_config=config, max_new_tokens=1, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)
                        total += timer.prefill
                    if round_ > 0:  # the first round warms up
                        samples[name].append(total)
    finally:
        timer.remove()
    return {name: statistics.median(values) for name, values in samples.items()}


def ratios_to_none(seconds: dict[str, float], none: str = "none") -> dict[str, dict]:
    """{name: {"seconds", "ratio"}}: each setting's prefill time and its ratio to `none`'s."""
    return {name: {"seconds": value, "ratio": value / seconds[none]} for name, value in seconds.items()}
