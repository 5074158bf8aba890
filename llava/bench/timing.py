"""Wall-clock timing that waits for the device (CUDA synchronisation) around each measured call."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable

import torch
from tqdm import tqdm


def device_and_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """The benches' defaults: CUDA when there is one, bf16 there and fp32 on a CPU."""
    resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return resolved, getattr(torch, dtype or ("bfloat16" if resolved.type == "cuda" else "float32"))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_medians(
    fns: dict[Hashable, Callable[[], object]], device: torch.device, repeats: int, warmup: int = 1
) -> dict[Hashable, float]:
    """Median seconds of each function. Rounds run every function once, so slow drifts of the machine (clocks,
    other load) hit all of them alike instead of whichever happened to run last."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[Hashable, list[float]] = {key: [] for key in fns}
    for _ in tqdm(range(repeats), desc="timing rounds", unit="round"):
        for key, fn in fns.items():
            samples[key].append(timed(fn, device))
    return {key: statistics.median(values) for key, values in samples.items()}
