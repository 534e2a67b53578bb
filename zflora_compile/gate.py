"""The latency gate: the fused model must cost what the base model costs on the target.

The file pipeline (:mod:`zflora_compile.build`) builds three artifacts with the same target:
``base`` (the input with every adapter stripped: the exact base model), ``unfused`` (the input
as given) and ``fused`` (the compiled model). This module only times and decides: each phase
(decode: 1 new token on a ``past``-token KV cache; prefill: ``prefill`` tokens on an empty
cache) runs them in rounds after warm-up (:func:`zflora_compile.latency.interleaved`) on the
same seeded inputs: ``unfused``, then ``base`` and ``fused`` back to back in alternating order
(a balanced order: each of the pair follows ``unfused`` and its partner equally often). The
rounds are split over ``sessions`` fresh loads of the three artifacts, the load order reversed
on every other load (measured here: of two sessions of one model, the one loaded later ran ~1.5%
faster; reversing cancels that). Timing binds the inputs and outputs first where the target can
(ONNX Runtime's I/O binding) and may pin the process (``cpus``).

The statistic of a phase is the per-round ratio fused / base: its median with a seeded 95%
bootstrap interval over loads and rounds (:func:`zflora_compile.latency.paired_ratio_interval`).
Against the ratio allowed, ``1 + max_overhead_pct / 100``: pass when the whole interval is at or
below it, regression (exit 1) when the whole interval is above it, inconclusive (exit 4) when it
straddles it; an inconclusive phase runs further rounds, in pairs of fresh loads, while
``budget_s`` allows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from zflora_compile.latency import DeviceTime, interleaved, load_average, load_count, load_orders, machine_info, paired_ratio_interval, split_rounds, summarize, verdict
from zflora_compile.progress import NullProgress
from zflora_compile.targets.base import Shape, Target
from zflora_compile.verify import ROTARY_COS_CACHE, has_kv_cache, input_role, input_specs, make_feeds


class Variant(NamedTuple):
    """An artifact built into ``dir`` from the ONNX file ``model``."""

    dir: Path
    model: Path


@dataclasses.dataclass
class LatencyOptions:
    max_overhead_pct: float = 2.0
    prefill: int = 128
    past: int = 128
    decode_rounds: int = 30
    prefill_rounds: int = 10
    warmup: int = 3
    phases: tuple[str, ...] = ("decode", "prefill")
    #: seconds of further rounds a phase may spend while its verdict is inconclusive
    budget_s: float = 60.0
    #: also run base against itself (A/A), the same way: the noise floor beside the gate
    calibrate: bool = False
    #: loads of the artifacts a phase's rounds are split over, the load order reversed each time
    sessions: int = 4
    #: CPUs the process is pinned to while timing ("2,3", "0-3"); None: not pinned
    cpus: str | None = None

    def __post_init__(self):
        from zflora_compile.errors import InputError

        def whole(flag: str, value, least: int) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise InputError(f"{flag} must be an integer >= {least}, got {value}")

        if not (isinstance(self.max_overhead_pct, (int, float)) and math.isfinite(self.max_overhead_pct)):
            raise InputError(f"--max-overhead must be a finite number, got {self.max_overhead_pct}")
        if not (isinstance(self.budget_s, (int, float)) and not isinstance(self.budget_s, bool) and math.isfinite(self.budget_s) and self.budget_s >= 0):
            raise InputError(f"--gate-budget-s must be a finite number >= 0, got {self.budget_s}")
        whole("--prefill", self.prefill, 1)
        whole("--past", self.past, 0)
        whole("--rounds", self.decode_rounds, 1)
        whole("--prefill-rounds", self.prefill_rounds, 1)
        whole("--warmup", self.warmup, 0)
        whole("--gate-sessions", self.sessions, 1)
        self.cpu_set = parse_cpus(self.cpus) if self.cpus is not None else None
        self.phases = tuple(self.phases)
        unknown = [p for p in self.phases if p not in ("decode", "prefill")]
        if not self.phases or unknown:
            raise InputError(f"--phases must name decode and/or prefill, got {' '.join(map(str, self.phases)) or 'nothing'}")


def parse_cpus(text: str) -> tuple[int, ...]:
    """``"2,3"`` / ``"0-3"`` / ``"0,2-3"`` as sorted CPU numbers; each must be one this process may
    run on (``os.sched_getaffinity``), else :class:`InputError` naming it."""
    import os

    from zflora_compile.errors import InputError

    cpus: set[int] = set()
    for part in str(text).split(","):
        first, _, last = part.strip().partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError:
            raise InputError(f"--gate-cpus must list CPU numbers like 2,3 or 0-3, got {text!r}") from None
        if low < 0 or high < low:
            raise InputError(f"--gate-cpus: {part.strip()!r} is not a CPU range")
        cpus.update(range(low, high + 1))
    if not hasattr(os, "sched_setaffinity"):
        raise InputError(f"--gate-cpus: this platform ({os.name}) cannot pin a process (no sched_setaffinity)")
    allowed = os.sched_getaffinity(0)
    outside = sorted(cpus - allowed)
    if outside:
        raise InputError(f"--gate-cpus: CPU {outside[0]} is not one this process may run on (allowed: {','.join(map(str, sorted(allowed)))})")
    return tuple(sorted(cpus))


class PositionRange(NamedTuple):
    """The positions a model has learned: ``positions`` rows of ``table`` that ``node`` gathers,
    read at position + ``offset``."""

    positions: int
    table: str
    node: str
    offset: int = 0

    def describe(self) -> str:
        shift = f" at position + {self.offset}" if self.offset else ""
        return f"{self.positions} positions ({self.table!r} rows, gathered by '{self.node}'{shift})"


# ops that carry a position index on unchanged (the index path to a position table)
_INDEX_PASS = frozenset({"Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Expand", "Flatten"})
# ops whose output depends only on their inputs' shapes, not their values
_SHAPE_ONLY = frozenset({"Shape", "Size"})


def _index_sources(value) -> tuple[set[str], set[str]]:
    """(roles of the graph inputs, op types) whose values reach ``value`` (through shapes: not)."""
    roles, ops, seen, frontier = set(), set(), set(), [value]
    while frontier:
        current = frontier.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        producer = current.producer()
        if producer is None:
            if current.const_value is None and current.name:
                roles.add(input_role(current.name))
            continue
        ops.add(producer.op_type)
        if producer.op_type not in _SHAPE_ONLY:
            frontier.extend(producer.inputs)
    return roles, ops


def _scalar(value) -> int | None:
    """The integer a constant scalar value holds, else None."""
    tensor = value.const_value if value is not None else None
    if tensor is None and value is not None and value.producer() is not None and value.producer().op_type == "Constant":
        attribute = value.producer().attributes.get("value")
        tensor = attribute.value if attribute is not None else None
    if tensor is None:
        return None
    array = np.asarray(tensor.numpy())
    return int(array.reshape(-1)[0]) if array.size == 1 and array.dtype.kind in "iu" else None


def _offset(value) -> int:
    """The constant added to the positions on the index path (``positions + 2``: OPT), 0 if none."""
    offset = 0
    for _ in range(32):
        producer = value.producer() if value is not None else None
        if producer is None:
            return offset
        if producer.op_type in _INDEX_PASS:
            value = producer.inputs[0]
        elif producer.op_type in ("Add", "Sub") and len(producer.inputs) == 2:
            left, right = (_scalar(v) for v in producer.inputs)
            if right is not None:
                offset, value = offset + (right if producer.op_type == "Add" else -right), producer.inputs[0]
            elif left is not None and producer.op_type == "Add":
                offset, value = offset + left, producer.inputs[1]
            else:
                return offset
        else:
            return offset
    return offset


def position_range(model_path: Path, model=None) -> PositionRange | None:
    """The positions the model has learned, read structurally: a ``Gather`` of a constant table
    whose indices come from the position ids (a ``position_ids`` / ``cache_position`` input, a
    ``Range`` or a ``CumSum`` of the mask), not from the token ids; the table's rows along the
    gathered axis, less a constant added on the way. The smallest such range; ``None`` when the
    model has none (rotary positions are computed, they have no table). ``model``: the file as
    an ``onnx_ir.Model``, when the caller holds it."""
    import onnx_ir as ir

    model = model if model is not None else ir.load(str(model_path))
    found = []
    for node in model.graph.all_nodes():
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2 or node.inputs[0] is None:
            continue
        table, indices = node.inputs
        axis = node.attributes["axis"].value if "axis" in node.attributes else 0
        shape = table.shape if table.const_value is None else table.const_value.shape
        if (table.const_value is None and not table.is_initializer()) or shape is None or not -len(shape) <= axis < len(shape) or not isinstance(shape[axis], int):
            continue
        roles, ops = _index_sources(indices)
        if "input_ids" in roles or not ({"position_ids", "cache_position"} & roles or {"Range", "CumSum"} & ops):
            continue
        offset = _offset(indices)
        found.append(PositionRange(int(shape[axis]) - max(offset, 0), table.name or "", node.name or "", max(offset, 0)))
    found += _rotary_caches(model)
    return min(found, default=None)




def _rotary_caches(model) -> list[PositionRange]:
    """Positions bounded by ONNX Runtime's rotary caches (onnxruntime-genai's builder): a
    ``GroupQueryAttention`` with ``do_rotary`` or a ``RotaryEmbedding`` reads a constant cos
    cache of ``[positions, rotary_dim / 2]``; ONNX Runtime refuses a total length beyond it."""
    found = []
    for node in model.graph.all_nodes():
        index = ROTARY_COS_CACHE.get(node.op_type) if node.domain == "com.microsoft" else None
        if index is None or len(node.inputs) <= index or node.inputs[index] is None:
            continue
        if node.op_type == "GroupQueryAttention" and not ("do_rotary" in node.attributes and node.attributes["do_rotary"].value):
            continue
        cache = node.inputs[index]
        shape = cache.shape if cache.const_value is None else cache.const_value.shape
        if (cache.const_value is not None or cache.is_initializer()) and shape is not None and len(shape) >= 1 and isinstance(shape[0], int):
            found.append(PositionRange(int(shape[0]), cache.name or "", node.name or ""))
    return found


def phase_shapes(model_path: Path, options: LatencyOptions, model=None) -> list[Shape]:
    """The input shapes of the phases, as this model's signature admits them, kept within the
    positions it has learned (``past + seq <= positions``; :func:`position_range`): a shape that
    asks for more is clamped and says so."""
    specs = input_specs(model_path)
    if not any(not isinstance(d, int) for s in specs for d in s.shape):
        return [Shape("static", 0, 0)]
    cache = has_kv_cache(specs)
    limit = position_range(model_path, model)
    decode_past, prefill = options.past if cache else 0, options.prefill
    notes = {"decode": "", "prefill": ""}
    if limit is not None and decode_past + 1 > limit.positions:
        decode_past = max(limit.positions - 1, 0)
        notes["decode"] = f"past {options.past} -> {decode_past}: the model has {limit.describe()}"
    if limit is not None and prefill > limit.positions:
        prefill = max(limit.positions, 1)
        notes["prefill"] = f"{options.prefill} -> {prefill} tokens: the model has {limit.describe()}"
    shapes = {"decode": Shape("decode", 1, decode_past, notes["decode"]), "prefill": Shape("prefill", prefill, 0, notes["prefill"])}
    return [shapes[p] for p in options.phases]


def measure_pair(
    runners, pair: tuple[str, str], *, rounds: int, warmup: int, threshold: float, budget_s: float,
    sessions: int = 1, seed: int = 0, progress=None, label: str = "",
) -> dict:
    """Rounds of ``runners`` with ``pair`` (base, candidate) back to back, then the verdict of the
    per-round ratio candidate / base against ``threshold``.

    ``runners`` is a dict of runners (one set of sessions), or ``load(block) -> dict`` that loads
    fresh sessions for batch ``block`` (the gate reverses the load order on odd blocks); then the
    ``rounds`` are split over ``sessions`` loads (:func:`load_count`: at least 5 rounds each, an
    even number), each warmed up, and the bootstrap resamples
    loads and rounds (:func:`~zflora_compile.latency.paired_ratio_interval`: loads drawn
    within their order, rounds within their load). While the verdict is
    inconclusive, further batches of up to ``rounds`` rounds (with ``load``: split over two fresh
    loads, one in each order, warmed up) run as long as they fit in ``budget_s`` seconds
    (estimated from the rounds so far, loads included). Returns ``times`` (ms per runner), ``blocks`` (the load of each round),
    ``loads`` (per load: rounds and median ratio), ``interval``, ``verdict``, ``rounds_requested``,
    ``extra_rounds``, ``extra_seconds`` and ``stopped_by_budget``."""
    progress = progress or NullProgress()
    load = runners if callable(runners) else (lambda block: runners)
    reload = callable(runners)
    times: dict[str, list[float]] = {}
    blocks: list[int] = []

    def batch(size: int, block: int, title: str, warm: bool) -> None:
        current = load(block)
        with progress.bar(title, size) as advance:
            more, _ = interleaved(current, rounds=size, warmup=warmup if warm else 0, progress=advance, pair=pair, start=len(blocks))
        for name, values in more.items():
            times.setdefault(name, []).extend(values)
        blocks.extend([block] * size)

    started = time.perf_counter()
    loads = load_count(rounds, sessions) if reload else 1
    for block, size in enumerate(split_rounds(rounds, loads)):
        batch(size, block, f"{label}, {rounds} interleaved rounds" + (f" (load {block + 1} of {loads})" if loads > 1 else ""), warm=True)
    per_round = (time.perf_counter() - started) / rounds

    def decide():
        interval = paired_ratio_interval(times[pair[0]], times[pair[1]], blocks=blocks if reload else None, strata=load_orders(blocks) if reload else None, seed=seed)
        return interval, verdict(interval, threshold)

    interval, decided = decide()
    extra_rounds, extra_seconds, stopped = 0, 0.0, False
    while decided == "inconclusive":
        size = min(rounds, int((budget_s - extra_seconds) // per_round)) if per_round > 0 else rounds
        if size < 1:
            stopped = True
            break
        started = time.perf_counter()  # the budget counts the loads, the rounds and the bootstrap
        if reload:  # two loads, in both orders, so the further rounds stay balanced too
            for part in split_rounds(size, 2):
                batch(part, max(blocks) + 1, f"{label}: inconclusive, {part} more rounds (a fresh load)", warm=True)
        else:
            batch(size, 0, f"{label}: inconclusive, {size} more rounds", warm=False)
        interval, decided = decide()
        spent = time.perf_counter() - started
        extra_rounds, extra_seconds, per_round = extra_rounds + size, extra_seconds + spent, spent / size
    ratios = np.asarray(interval["ratios"])
    loads = [{"load": b, "rounds": int(np.sum(np.asarray(blocks) == b)), "ratio_median": float(np.median(ratios[np.asarray(blocks) == b]))} for b in dict.fromkeys(blocks)]
    return {
        "times": times,
        "blocks": blocks,
        "loads": loads,
        "interval": interval,
        "verdict": decided,
        "rounds_requested": rounds,
        "extra_rounds": extra_rounds,
        "extra_seconds": round(extra_seconds, 3),
        "stopped_by_budget": stopped,
    }


def _gate_fields(measured: dict) -> dict:
    interval = measured["interval"]
    return {
        "verdict": measured["verdict"],
        "ratio_median": interval["median"],
        "ratio_interval": [interval["low"], interval["high"]],
        "overhead_pct": (interval["median"] - 1) * 100,
        "overhead_interval_pct": [(interval["low"] - 1) * 100, (interval["high"] - 1) * 100],
        "ratios": interval["ratios"],
        "rounds": interval["rounds"],
        "rounds_requested": measured["rounds_requested"],
        "extra_rounds": measured["extra_rounds"],
        "extra_seconds": measured["extra_seconds"],
        "stopped_by_budget": measured["stopped_by_budget"],
        "loads": measured["loads"],
    }


_SEVERITY = {"pass": 0, "inconclusive": 1, "regression": 2}


def run_gate(
    target: Target,
    variants: dict[str, Variant],
    shapes: list[Shape],
    options: LatencyOptions,
    vocab: int | None,
    *,
    seed: int = 0,
    progress=None,
) -> dict:
    """Time the ``base``, ``unfused`` and ``fused`` artifacts interleaved per shape and decide; the report's ``latency`` section."""
    progress = progress or NullProgress()
    specs = input_specs(variants["unfused"].model)
    machine = machine_info()
    threshold = 1 + options.max_overhead_pct / 100
    phases = {}
    with pinned(options.cpu_set) as pinning:
        for shape in shapes:
            rounds = options.prefill_rounds if shape.name == "prefill" else options.decode_rounds
            feeds = make_feeds(specs, vocab, seq=None if shape.name == "static" else shape.seq, past=shape.past, seed=seed)
            described = {}

            def loader(chosen: dict[str, Variant], shape=shape, feeds=feeds, described=described):
                """Fresh sessions of ``chosen`` for load ``block``: in the given order on even
                blocks, reversed on odd ones (the earlier-loaded session's edge cancels)."""

                def load(block: int) -> dict:
                    order = list(chosen) if block % 2 == 0 else list(reversed(chosen))
                    loaded = {name: target.load(chosen[name].dir, chosen[name].model, shape) for name in order}
                    described.update(loaded)
                    return {name: _runner(loaded[name], feeds) for name in chosen}

                return load

            before = load_average()
            measured = measure_pair(
                loader(variants), ("base", "fused"), rounds=rounds, warmup=options.warmup, threshold=threshold, budget_s=options.budget_s,
                sessions=options.sessions, seed=seed, progress=progress, label=f"latency gate: {shape.describe()}",
            )
            times = measured["times"]
            stats = summarize(times, "base")
            unfused = paired_ratio_interval(times["base"], times["unfused"], blocks=measured["blocks"], strata=load_orders(measured["blocks"]), seed=seed)
            phases[shape.name] = {
                "seq": shape.seq,
                "past": shape.past,
                "timer": _timer(described["fused"]),
                "runs_on": described["fused"].description,
                "variants": stats,
                **_gate_fields(measured),
                "unfused_overhead_pct": (unfused["median"] - 1) * 100,
                "load_average_before": before,
                "load_average_after": load_average(),
            }
            if options.calibrate:
                twice = {"base": variants["base"], "base_again": variants["base"]}  # two sessions of one artifact
                aa = measure_pair(
                    loader(twice), ("base", "base_again"), rounds=rounds, warmup=options.warmup, threshold=threshold, budget_s=options.budget_s,
                    sessions=options.sessions, seed=seed, progress=progress, label=f"A/A calibration: {shape.describe()}",
                )
                phases[shape.name]["calibration"] = _gate_fields(aa)
            if shape.clamped:
                phases[shape.name]["clamped"] = shape.clamped
            described.clear()
    worst = max(phases.values(), key=lambda p: p["overhead_pct"])
    overall = max((p["verdict"] for p in phases.values()), key=_SEVERITY.__getitem__)
    machine["load_average_end"] = load_average()
    return {
        "passed": overall == "pass",
        "verdict": overall,
        "max_overhead_pct": options.max_overhead_pct,
        "threshold_ratio": threshold,
        "worst_overhead_pct": worst["overhead_pct"],
        "rule": (
            "per phase, ratio_i = fused_i / base_i of round i (base and fused back to back, alternating order); "
            "median of the ratios with a 95% percentile bootstrap interval (2000 resamples, seeded); "
            "pass: interval high <= 1 + max_overhead_pct / 100, regression: interval low above it, inconclusive: it straddles; "
            "an inconclusive phase runs more rounds while budget_s allows; the gate takes the worst phase"
        ),
        "confidence": 0.95,
        "budget_s": options.budget_s,
        "calibrated": options.calibrate,
        "target": target.name,
        "warmup_runs": options.warmup,
        "sessions": options.sessions,
        "pinning": pinning,
        "interleaving": (
            "every round runs unfused, then base and fused back to back, their order alternating (each of base and fused follows unfused in half the rounds and the other in the rest); "
            "a phase's rounds are split over `sessions` fresh loads of the artifacts, the load order reversed on every other load; the bootstrap draws loads within their load order, then rounds within their load"
        ),
        "phases": phases,
        "machine": machine,
        "emulated": target.emulated,
    }


def _runner(loaded, feeds):
    """The timed call: the device's own timer, else the target's prepared call (inputs and outputs
    bound before timing: ONNX Runtime's I/O binding), else ``run(feeds)``."""
    if loaded.timed is not None:
        return lambda: DeviceTime(loaded.timed(feeds))
    if loaded.prepare is not None:
        return loaded.prepare(feeds)
    return lambda: loaded.run(feeds)


def _timer(loaded) -> str:
    if loaded.timed is not None:
        return "device (CUDA events)"
    if loaded.prepare is not None:
        return "host wall clock around one bound run (inputs and outputs bound before timing: no copies in the timed region)"
    return "host wall clock around run()"


@contextlib.contextmanager
def pinned(cpus: tuple[int, ...] | None):
    """While timing, the process runs on ``cpus`` only (``os.sched_setaffinity``; threads created
    meanwhile, such as a session's thread pool, inherit it); the previous set is restored after.
    Yields what the report records."""
    import os

    if cpus is None:
        yield {"pinned": False, "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}
        return
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield {"pinned": True, "cpus": list(cpus), "previous": sorted(previous)}
    finally:
        os.sched_setaffinity(0, previous)


def _phase_line(name: str, phase: dict) -> str:
    low, high = phase["overhead_interval_pct"]
    return f"{name} {phase['overhead_pct']:+.1f}% (95% interval {low:+.1f}% .. {high:+.1f}%, {phase['rounds']} rounds)"


def gate_failure_message(latency: dict) -> str:
    """The regression: the phases whose whole interval lies above the threshold."""
    bad = [_phase_line(name, p) for name, p in latency["phases"].items() if p["verdict"] == "regression"]
    return f"latency gate failed on target {latency['target']}: fused vs base overhead {', '.join(bad)} exceeds --max-overhead {latency['max_overhead_pct']:g}% (the whole interval lies above it)"


def gate_inconclusive_message(latency: dict) -> str:
    """No phase regressed but some interval straddles the threshold: what it is and what narrows it."""
    unsure = [_phase_line(name, p) for name, p in latency["phases"].items() if p["verdict"] == "inconclusive"]
    return (
        f"latency gate inconclusive on target {latency['target']}: fused vs base overhead {', '.join(unsure)} straddles --max-overhead "
        f"{latency['max_overhead_pct']:g}% after the --gate-budget-s {latency['budget_s']:g} s of further rounds; more rounds "
        f"(--rounds, --prefill-rounds, a larger --gate-budget-s) or a quieter machine narrow the interval"
    )
