"""The latency gate: the fused model must cost what the base model costs on the target.

The file pipeline (:mod:`zflora_compile.build`) builds three artifacts with the same target:
``base`` (the input with every adapter stripped: the exact base model), ``unfused`` (the input
as given) and ``fused`` (the compiled model). This module only times and decides: each phase
(decode: 1 new token on a ``past``-token KV cache; prefill: ``prefill`` tokens on an empty
cache) runs them interleaved after warm-up (:func:`zflora_compile.latency.interleaved`) on the
same seeded inputs. The overhead of a phase is ``median(fused) / median(base) - 1``; the gate
fails (exit 1) when any phase's overhead exceeds ``max_overhead_pct``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import NamedTuple

from zflora_compile.latency import DeviceTime, interleaved, load_average, machine_info, summarize
from zflora_compile.progress import NullProgress
from zflora_compile.targets.base import Shape, Target
from zflora_compile.verify import has_kv_cache, input_specs, make_feeds


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

    def __post_init__(self):
        from zflora_compile.errors import InputError

        def whole(flag: str, value, least: int) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise InputError(f"{flag} must be an integer >= {least}, got {value}")

        if not (isinstance(self.max_overhead_pct, (int, float)) and math.isfinite(self.max_overhead_pct)):
            raise InputError(f"--max-overhead must be a finite number, got {self.max_overhead_pct}")
        whole("--prefill", self.prefill, 1)
        whole("--past", self.past, 0)
        whole("--rounds", self.decode_rounds, 1)
        whole("--prefill-rounds", self.prefill_rounds, 1)
        whole("--warmup", self.warmup, 0)
        self.phases = tuple(self.phases)
        unknown = [p for p in self.phases if p not in ("decode", "prefill")]
        if not self.phases or unknown:
            raise InputError(f"--phases must name decode and/or prefill, got {' '.join(map(str, self.phases)) or 'nothing'}")


def phase_shapes(model_path: Path, options: LatencyOptions) -> list[Shape]:
    """The input shapes of the phases, as this model's signature admits them."""
    specs = input_specs(model_path)
    if not any(not isinstance(d, int) for s in specs for d in s.shape):
        return [Shape("static", 0, 0)]
    cache = has_kv_cache(specs)
    shapes = {"decode": Shape("decode", 1, options.past if cache else 0), "prefill": Shape("prefill", options.prefill, 0)}
    return [shapes[p] for p in options.phases]


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
    """Time the ``base``, ``unfused`` and ``fused`` artifacts interleaved per shape; the report's ``latency`` section."""
    progress = progress or NullProgress()
    specs = input_specs(variants["unfused"].model)
    machine = machine_info()
    phases = {}
    for shape in shapes:
        rounds = options.prefill_rounds if shape.name == "prefill" else options.decode_rounds
        feeds = make_feeds(specs, vocab, seq=None if shape.name == "static" else shape.seq, past=shape.past, seed=seed)
        loaded = {name: target.load(variant.dir, variant.model, shape) for name, variant in variants.items()}
        runners = {name: _runner(item, feeds) for name, item in loaded.items()}
        with progress.bar(f"latency gate: {shape.describe()}, {rounds} interleaved rounds", rounds) as advance:
            times, _ = interleaved(runners, rounds=rounds, warmup=options.warmup, progress=advance)
        stats = summarize(times, "base")
        phases[shape.name] = {
            "seq": shape.seq,
            "past": shape.past,
            "rounds": rounds,
            "timer": "device (CUDA events)" if loaded["fused"].timed else "host wall clock around run()",
            "runs_on": loaded["fused"].description,
            "variants": stats,
            "overhead_pct": (stats["fused"]["ratio_to_base"] - 1) * 100,
            "unfused_overhead_pct": (stats["unfused"]["ratio_to_base"] - 1) * 100,
        }
        del loaded, runners
    worst = max(phases.values(), key=lambda p: p["overhead_pct"])
    machine["load_average_end"] = load_average()
    passed = all(p["overhead_pct"] <= options.max_overhead_pct for p in phases.values())
    return {
        "passed": passed,
        "max_overhead_pct": options.max_overhead_pct,
        "worst_overhead_pct": worst["overhead_pct"],
        "rule": "overhead = median(fused) / median(base) - 1 per phase; fails when any phase exceeds max_overhead_pct",
        "target": target.name,
        "warmup_runs": options.warmup,
        "interleaving": "every round runs base, unfused and fused once, in an order rotated per round",
        "phases": phases,
        "machine": machine,
        "emulated": target.emulated,
    }


def _runner(loaded, feeds):
    if loaded.timed is not None:
        return lambda: DeviceTime(loaded.timed(feeds))
    return lambda: loaded.run(feeds)


def gate_failure_message(latency: dict) -> str:
    bad = [f"{name} {p['overhead_pct']:+.1f}%" for name, p in latency["phases"].items() if p["overhead_pct"] > latency["max_overhead_pct"]]
    return f"latency gate failed on target {latency['target']}: fused vs base overhead {', '.join(bad)} exceeds --max-overhead {latency['max_overhead_pct']:g}%"
