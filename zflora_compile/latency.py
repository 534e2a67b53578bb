"""Interleaved latency measurement, shared by the latency gate and the benchmarks.

Variants run in rounds (A B C, B C A, C A B, ...: the order rotates every round) after warm-up,
on the same inputs, so that a noisy shared machine slows all variants alike. Results are medians
and min-max over rounds, and ratios of medians to the baseline; nothing here asserts a timing.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import numpy as np

Runner = Callable[[], object]


def rotated(names: list[str], round_index: int) -> list[str]:
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


def interleaved(runners: dict[str, Runner], *, rounds: int, warmup: int, progress: Callable[[], None] | None = None) -> tuple[dict[str, list[float]], list[list[str]]]:
    """Warm-up runs, then ``rounds`` rotated rounds; returns wall times in ms and the orders."""
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    orders = []
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for index in range(rounds):
            order = rotated(names, index)
            orders.append(order)
            for name in order:
                start = time.perf_counter()
                runners[name]()
                times[name].append((time.perf_counter() - start) * 1e3)
            if progress is not None:
                progress()
    finally:
        if gc_was_enabled:
            gc.enable()
    return times, orders


def summarize(times: dict[str, list[float]], baseline: str = "base") -> dict[str, dict]:
    """Median, min, max, quartiles; ratio of medians and median of per-round ratios to ``baseline``."""
    base = times[baseline]
    base_median = statistics.median(base)
    stats = {}
    for name, values in times.items():
        median = statistics.median(values)
        stats[name] = {
            "median_ms": median,
            "min_ms": min(values),
            "max_ms": max(values),
            "mean_ms": statistics.fmean(values),
            "stdev_ms": statistics.stdev(values) if len(values) > 1 else 0.0,
            "p25_ms": float(np.percentile(values, 25)),
            "p75_ms": float(np.percentile(values, 75)),
            "ratio_to_base": median / base_median,
            "paired_ratio_to_base_median": statistics.median(t / b for t, b in zip(values, base)),
            "runs": len(values),
            "timings_ms": [round(t, 4) for t in values],
        }
    return stats
