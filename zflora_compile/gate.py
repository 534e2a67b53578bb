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

import numpy as np

from zflora_compile.latency import DeviceTime, interleaved, load_average, machine_info, summarize
from zflora_compile.progress import NullProgress
from zflora_compile.targets.base import Shape, Target
from zflora_compile.verify import input_role, has_kv_cache, input_specs, make_feeds


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


#: ONNX Runtime operators that read precomputed rotary caches: the cos cache's input index
_ROTARY_CACHE_INPUT = {"GroupQueryAttention": 7, "RotaryEmbedding": 2}


def _rotary_caches(model) -> list[PositionRange]:
    """Positions bounded by ONNX Runtime's rotary caches (onnxruntime-genai's builder): a
    ``GroupQueryAttention`` with ``do_rotary`` or a ``RotaryEmbedding`` reads a constant cos
    cache of ``[positions, rotary_dim / 2]``; ONNX Runtime refuses a total length beyond it."""
    found = []
    for node in model.graph.all_nodes():
        index = _ROTARY_CACHE_INPUT.get(node.op_type) if node.domain == "com.microsoft" else None
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
        if shape.clamped:
            phases[shape.name]["clamped"] = shape.clamped
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
