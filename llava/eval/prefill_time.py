"""Measured prefill time of several exit settings on the same questions, as a ratio to mode `none`: the third unit
(beside visual tokens and FLOPs) in which the comparison and the quickstart report every method.

The settings are timed in interleaved rounds (each round runs every setting once, on every batch), so a drift of
the machine hits them alike; each setting's time is the median over the rounds of its summed batch prefills. The
prefill is the model's first forward of `generate` (time to the first token's logits), as the loader times it."""

from __future__ import annotations

import statistics

import torch
from tqdm import tqdm

from llava.eval.answering import Answerer, PreparedQuestion
from llava.model.visual_exit import ExitConfig

PREFILL_TIME = "prefill_time.json"  # beside the runs' folders: {"questions", "repeats", "runs": {name: {seconds, ratio}}}


def prefill_seconds(answerer: Answerer, prepared: list[PreparedQuestion], configs: dict[str, ExitConfig],
                    repeats: int) -> dict[str, float]:
    """{name: median seconds of the prefills of every batch} for each exit setting, in interleaved rounds; the
    questions batched as the answerer's run batches them."""
    size = answerer.spec.batch_size
    batches = [answerer.batch_inputs(prepared[start : start + size]) for start in range(0, len(prepared), size)]
    samples: dict[str, list[float]] = {name: [] for name in configs}
    with torch.inference_mode():
        for round_ in tqdm(range(repeats + 1), desc="timing prefills", unit="round"):
            for name, config in configs.items():
                total = 0.0
                for batch in batches:
                    answerer.generate(batch, exit_config=config, max_new_tokens=1, do_sample=False, temperature=None,
                                      top_p=None, num_beams=1)
                    total += answerer.timer.prefill
                if round_ > 0:  # the first round warms up
                    samples[name].append(total)
    return {name: statistics.median(values) for name, values in samples.items()}


def ratios_to_none(seconds: dict[str, float], none: str = "none") -> dict[str, dict]:
    """{name: {"seconds", "ratio"}}: each setting's prefill time and its ratio to `none`'s."""
    return {name: {"seconds": value, "ratio": value / seconds[none]} for name, value in seconds.items()}
