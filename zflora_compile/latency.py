"""Interleaved latency measurement, shared by the latency gate and the benchmarks.

Variants run in rounds (A B C, B C A, C A B, ...: the order rotates every round) after warm-up,
on the same inputs, so that a noisy shared machine slows all variants alike. Results are medians
and min-max over rounds, and ratios of medians to the baseline; nothing here asserts a timing.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

Runner = Callable[[], object]


class DeviceTime(float):
    """A runner's own measurement in ms (e.g. CUDA events); used instead of the host's wall time."""


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
                result = runners[name]()
                elapsed = (time.perf_counter() - start) * 1e3
                times[name].append(float(result) if isinstance(result, DeviceTime) else elapsed)
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


def machine_info() -> dict:
    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_total = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = round(int(line.split()[1]) / 1024**2, 2)  # kB -> GiB
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_model": cpu_model or platform.processor() or None,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": mem_total,
        "load_average_start": load_average(),
    }


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
