"""Interleaved latency measurement, shared by the latency gate and the benchmarks.

Variants run in rounds (A B C, B C A, C A B, ...: the order rotates every round) after warm-up,
on the same inputs, so that a noisy shared machine slows all variants alike; with ``pair`` the two
variants compared run back to back at the end of every round, in alternating order
(:func:`paired_orders`).
Results are medians and min-max over rounds, ratios of medians to the baseline and, for the
latency gate, the per-round ratio with a bootstrap interval (:func:`paired_ratio_interval`) and
its three-valued verdict (:func:`verdict`); nothing here asserts a timing.
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


def paired_orders(names: list[str], pair: tuple[str, str], round_index: int) -> list[str]:
    """Round ``round_index``'s order: the other names first (in their given order), then the two
    names of ``pair`` back to back in alternating order (a b, b a, ...).

    The design is balanced for the pair: over two rounds each of ``a`` and ``b`` runs once right
    after another variant and once right after its partner (in ``[u a b] [u b a]``, ``a`` follows
    ``u`` then ``b``; ``b`` follows ``a`` then ``u``). Running right after another session costs
    (its thread pool still spinning, the caches holding its weights); an order in which one of the
    pair follows the others more often (rotating their place: ``[a b u] [b a u] [u a b] [u b a]``
    puts ``b`` after ``u`` twice and ``a`` once) biases the ratio by that cost."""
    first, second = pair
    block = [first, second] if round_index % 2 == 0 else [second, first]
    return [n for n in names if n not in pair] + block


def interleaved(
    runners: dict[str, Runner],
    *,
    rounds: int,
    warmup: int,
    progress: Callable[[], None] | None = None,
    pair: tuple[str, str] | None = None,
    start: int = 0,
) -> tuple[dict[str, list[float]], list[list[str]]]:
    """Warm-up runs, then ``rounds`` rounds (rotated; with ``pair``: :func:`paired_orders`,
    numbered from ``start`` so that further batches continue the alternation); returns wall
    times in ms and the orders."""
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
        for index in range(start, start + rounds):
            order = paired_orders(names, pair, index) if pair is not None else rotated(names, index)
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


def split_rounds(rounds: int, parts: int) -> list[int]:
    """``rounds`` as ``parts`` near-equal batches (none empty)."""
    parts = max(1, min(parts, rounds))
    return [rounds // parts + (1 if i < rounds % parts else 0) for i in range(parts)]


#: the fewest rounds one load runs, so that its median means something
ROUNDS_PER_LOAD = 5


def load_count(rounds: int, sessions: int) -> int:
    """Loads ``rounds`` are split over: ``sessions``, but at least :data:`ROUNDS_PER_LOAD` rounds
    per load, and an even number when there are several (as many loads in each order)."""
    loads = min(sessions, max(1, rounds // ROUNDS_PER_LOAD))
    return loads - loads % 2 if loads > 1 else loads


def load_orders(blocks: list[int]) -> list[int]:
    """The load order of each round's load: 0 for the given order (even loads), 1 reversed (odd)."""
    return [block % 2 for block in blocks]


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


#: the gate's interval: a percentile bootstrap of the median per-round ratio
CONFIDENCE = 0.95
RESAMPLES = 2000


def paired_ratio_interval(
    base: list[float],
    other: list[float],
    *,
    blocks: list[int] | None = None,
    strata: list[int] | None = None,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict:
    """The paired statistic of the latency gate.

    Method: round ``i`` ran ``base`` and ``other`` back to back, so ``ratio_i = other_i / base_i``
    cancels the load both saw. The estimate is the median of the per-round ratios; its
    ``confidence`` interval is a percentile bootstrap: ``resamples`` resamples (numpy
    ``default_rng(seed)``: deterministic for given samples), the median of each, and the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of those medians.

    Without ``blocks`` a resample draws the rounds with replacement. With ``blocks`` (one label
    per round: the session load it ran in) the bootstrap has two levels, because rounds of one
    load share that load's sessions, and two sessions of one model can differ by several percent
    for as long as they live (measured: up to ~10% on a 0.1 ms decode): a resample draws loads with
    replacement, then each drawn load's rounds with replacement from that load. Loads are drawn
    within their ``strata`` label (one per round; the gate's: the load order), so every resample
    keeps each order's share and a fixed load-order effect cancels instead of widening the
    interval. With one load per stratum this is a bootstrap of the rounds stratified by load; the
    spread between loads shows in the interval only once a stratum has several loads.
    Returns ``ratios``, ``median``, ``low``, ``high``, ``rounds``, ``confidence``, ``resamples``.
    """
    if len(base) != len(other) or not base:
        raise ValueError(f"paired samples need the same, nonzero number of rounds, got {len(base)} and {len(other)}")
    for name, labels in (("block", blocks), ("stratum", strata)):
        if labels is not None and len(labels) != len(base):
            raise ValueError(f"one {name} label per round: {len(labels)} labels for {len(base)} rounds")
    ratios = np.asarray(other, dtype=float) / np.asarray(base, dtype=float)
    rng = np.random.default_rng(seed)
    if blocks is None:
        medians = np.median(ratios[rng.integers(0, len(ratios), size=(resamples, len(ratios)))], axis=1)
    else:
        medians = _two_level_medians(ratios, np.asarray(blocks), np.asarray(strata if strata is not None else [0] * len(base)), rng, resamples)
    low, high = np.quantile(medians, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {
        "ratios": [round(float(r), 6) for r in ratios],
        "median": float(np.median(ratios)),
        "low": float(low),
        "high": float(high),
        "rounds": int(len(ratios)),
        "confidence": confidence,
        "resamples": resamples,
    }


def _two_level_medians(ratios: np.ndarray, blocks: np.ndarray, strata: np.ndarray, rng, resamples: int) -> np.ndarray:
    """Medians of ``resamples`` two-level resamples: per stratum, its loads drawn with
    replacement, then each drawn load's rounds drawn with replacement from that load (a load
    keeps its number of rounds)."""
    loads = list(dict.fromkeys(blocks.tolist()))
    members = [np.flatnonzero(blocks == load) for load in loads]
    width = max(len(m) for m in members)
    table = np.full((len(loads), width), np.nan)
    for row, m in enumerate(members):
        table[row, : len(m)] = ratios[m]
    sizes = np.array([len(m) for m in members])
    load_stratum = np.array([strata[m[0]] for m in members])
    drawn = []
    for stratum in dict.fromkeys(load_stratum.tolist()):
        rows = np.flatnonzero(load_stratum == stratum)
        picked = rows[rng.integers(0, len(rows), size=(resamples, len(rows)))]  # [resamples, loads]
        columns = np.floor(rng.random((resamples, len(rows), width)) * sizes[picked][..., None]).astype(int)
        values = table[picked[..., None], columns]  # a load's rounds, drawn from that load
        values[np.arange(width)[None, None, :] >= sizes[picked][..., None]] = np.nan  # a load keeps its own size
        drawn.append(values.reshape(resamples, -1))
    return np.nanmedian(np.concatenate(drawn, axis=1), axis=1)


def verdict(interval: dict, threshold: float) -> str:
    """``pass`` when the interval's upper bound is <= ``threshold`` (the ratio allowed,
    ``1 + max_overhead / 100``), ``regression`` when its lower bound is above it, else
    ``inconclusive`` (the interval straddles the threshold: more rounds narrow it)."""
    if interval["high"] <= threshold:
        return "pass"
    if interval["low"] > threshold:
        return "regression"
    return "inconclusive"


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
