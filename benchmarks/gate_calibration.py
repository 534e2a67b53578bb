"""How the latency gate behaves over repeated runs: A/A, a deliberately slowed model, the real fused model.

The shipped example (``examples/tiny_llama_lora.onnx``) is compiled once (``compile_file``,
``strategy="fuse"``, target ``ort``, verification on) and the gate's ``base`` and ``unfused``
artifacts are built the way ``zcompile --check-latency`` builds them
(``zflora_compile.build._gate_variants``: the input stripped of its adapters, and the input, each
built with the ORT target). Then ``--runs`` gate runs (``zflora_compile.gate.run_gate``, the
gate's own timing, statistic, verdict and budget of further rounds) of each of three scenarios,
in which only the model standing in as ``fused`` changes:

    aa        fused := base itself (A/A), --max-overhead 2: never a regression, ideally pass
    aa_one_load  the same with every round in one load of the sessions (``--gate-sessions 1``, the
              gate before load-order reversal): how far one load's order alone moves the ratio
    slowed    fused := base with an exact no-op costing ~30%, --max-overhead 2: regression every time
    fused     fused := the real compiled model, --max-overhead 50: pass every time

The slowed model is the base model with, on the LM head's input ``h``,
``h := h + 0 * (ReduceMean(h @ W1) + ReduceMean(h[:, -1:] @ W2))`` (seeded random ``W1`` of
``--slow-width`` columns, default 1280: a cost per token, which prefill feels; ``W2`` of
``--slow-last-width`` columns, default 3840: a cost per run, which decode feels; the defaults
cost ~30% in both phases of the example on a 2-core x86 machine, measured over 200 paired rounds:
decode 1.32, prefill 1.30). It is exact (``0 * y`` is ``±0`` for a finite ``y``, and
``h + ±0 == h``), and ONNX Runtime cannot remove it (``0 * y`` is not ``0`` for a non-finite
``y``, so no optimizer folds it). The script checks that the slowed model's outputs equal the
base model's bit for bit (ORT_ENABLE_ALL, both phases) and reports what it costs (the median
ratio of the slowed scenario).

Rounds: the gate's defaults (30 decode, 10 prefill, 3 warm-up runs, ``--gate-budget-s`` 60 per
phase for further rounds while a verdict is inconclusive); ``--rounds``, ``--prefill-rounds``,
``--warmup``, ``--budget-s`` change them. On the example each gate run takes about a second, so
3 x 20 runs take one to two minutes unless many runs spend their budget.

Scenarios run interleaved (run 1 of aa, slowed, fused; run 2 ...), so a load spike hits all three.
Prints a rich table, saves JSON (``--out``, default ``benchmarks/results/gate_calibration.json``)
with the machine, the load averages, the settings, and per scenario the verdict counts and every
run's interval.

    python benchmarks/gate_calibration.py                 # 20 runs per scenario
    python benchmarks/gate_calibration.py --quick --out /tmp/gate.json   # 2 runs, smoke test
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "tiny_llama_lora.onnx"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gate_calibration.json"
VERDICTS = ("pass", "inconclusive", "regression")

# scenario -> (what stands in as fused, --max-overhead, expected verdict, session loads: None = --sessions)
SCENARIOS = {
    "aa": ("base (A/A)", 2.0, "never regression", None),
    "aa_one_load": ("base (A/A), one load", 2.0, "shows the load-order bias", 1),
    "slowed": ("base + ~30% exact no-op", 2.0, "regression", None),
    "fused": ("the compiled fused model", 50.0, "pass", None),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def slowed_model(base_model: Path, out_model: Path, width: int, last_width: int, seed: int = 0) -> dict:
    """The base model with ``h + 0 * (ReduceMean(h @ W1) + ReduceMean(h[:, -1:] @ W2))`` on the LM
    head's input ``h``: exact, not foldable. ``W1`` (``width`` columns) costs per token (prefill),
    ``W2`` (``last_width`` columns) costs once per run (decode's share)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(base_model))
    graph = model.graph
    head = next(n for n in reversed(graph.node) if n.op_type == "MatMul" and "logits" in n.output)
    hidden_name = head.input[0]
    inits = {t.name: t for t in graph.initializer}
    if head.input[1] not in inits:
        raise SystemExit(f"cannot size the no-op: the LM head's weight {head.input[1]!r} is not an initializer")
    hidden = numpy_helper.to_array(inits[head.input[1]]).shape[0]
    rng = np.random.default_rng(seed)

    def weight(columns):
        return (rng.standard_normal((hidden, columns)) / np.sqrt(hidden)).astype(np.float32)

    graph.initializer.extend([
        numpy_helper.from_array(weight(width), "calib_noop_W1"),
        numpy_helper.from_array(weight(last_width), "calib_noop_W2"),
        numpy_helper.from_array(np.array(0.0, np.float32), "calib_noop_zero"),
        numpy_helper.from_array(np.array([-1], np.int64), "calib_noop_axes"),
        numpy_helper.from_array(np.array([-1], np.int64), "calib_noop_start"),
        numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), "calib_noop_end"),
        numpy_helper.from_array(np.array([1], np.int64), "calib_noop_seq_axis"),
    ])
    nodes = [
        helper.make_node("MatMul", [hidden_name, "calib_noop_W1"], ["calib_noop_y1"], name="calib_noop_matmul1"),
        helper.make_node("ReduceMean", ["calib_noop_y1", "calib_noop_axes"], ["calib_noop_m1"], name="calib_noop_mean1", keepdims=1),
        helper.make_node("Slice", [hidden_name, "calib_noop_start", "calib_noop_end", "calib_noop_seq_axis"], ["calib_noop_last"], name="calib_noop_slice"),
        helper.make_node("MatMul", ["calib_noop_last", "calib_noop_W2"], ["calib_noop_y2"], name="calib_noop_matmul2"),
        helper.make_node("ReduceMean", ["calib_noop_y2", "calib_noop_axes"], ["calib_noop_m2"], name="calib_noop_mean2", keepdims=1),
        helper.make_node("Add", ["calib_noop_m1", "calib_noop_m2"], ["calib_noop_sum"], name="calib_noop_sum"),
        helper.make_node("Mul", ["calib_noop_sum", "calib_noop_zero"], ["calib_noop_zeroed"], name="calib_noop_mul"),
        helper.make_node("Add", [hidden_name, "calib_noop_zeroed"], ["calib_noop_h"], name="calib_noop_add"),
    ]
    index = list(graph.node).index(head)
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)
    head.input[0] = "calib_noop_h"
    onnx.checker.check_model(model)
    onnx.save(model, str(out_model))
    return {"inserted_before": head.name or "the logits MatMul", "hidden": hidden, "width": width, "last_token_width": last_width,
            "form": "h + 0 * (ReduceMean(h @ W1, -1) + ReduceMean(h[:, -1:] @ W2, -1)), W1 [hidden, width], W2 [hidden, last_token_width]"}


def check_exact(base: Path, slowed: Path, shapes, vocab, seed: int) -> dict:
    """The slowed model's outputs against the base model's, per phase shape, with ORT_ENABLE_ALL."""
    import onnxruntime as ort

    from zflora_compile.verify import input_specs, make_feeds

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    sessions = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in (base, slowed)]
    specs = input_specs(base)
    worst = 0.0
    for shape in shapes:
        feeds = make_feeds(specs, vocab, seq=shape.seq, past=shape.past, seed=seed)
        a, b = (s.run(None, feeds) for s in sessions)
        for x, y in zip(a, b):
            worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.size else 0.0)
            if not np.array_equal(x, y):
                raise SystemExit(f"the slowed model is not exact: outputs differ on {shape.name} (max abs diff {worst})")
    return {"bit_identical": True, "max_abs_diff": worst, "optimization": "ORT_ENABLE_ALL"}


def versions() -> dict:
    import importlib.metadata as md

    found = {}
    for name in ("onnxruntime", "onnx", "onnx-ir", "numpy", "zflora-compile"):
        try:
            found[name.replace("-", "_")] = md.version(name)
        except md.PackageNotFoundError:
            found[name.replace("-", "_")] = None
    return found


def run_summary(latency: dict) -> dict:
    return {
        "verdict": latency["verdict"],
        "phases": {
            name: {
                "verdict": p["verdict"],
                "ratio_median": p["ratio_median"],
                "ratio_interval": p["ratio_interval"],
                "rounds": p["rounds"],
                "extra_rounds": p["extra_rounds"],
                "stopped_by_budget": p["stopped_by_budget"],
                "loads": p["loads"],
                "base_median_ms": p["variants"]["base"]["median_ms"] if "median_ms" in p["variants"]["base"] else None,
                "load_average_before": p["load_average_before"],
                "load_average_after": p["load_average_after"],
            }
            for name, p in latency["phases"].items()
        },
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="gate runs per scenario (default 20)")
    parser.add_argument("--quick", action="store_true", help="2 runs per scenario, few rounds: a smoke test")
    parser.add_argument("--model", type=Path, default=EXAMPLE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--rounds", type=int, default=30, help="decode rounds per gate run (the gate's default 30)")
    parser.add_argument("--prefill-rounds", type=int, default=10, help="prefill rounds per gate run (the gate's default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up runs per variant (the gate's default 3)")
    parser.add_argument("--budget-s", type=float, default=60.0, help="--gate-budget-s per phase (the gate's default, 60)")
    parser.add_argument("--slow-width", type=int, default=1280, help="columns of the slowed model's no-op GEMM (sets its cost)")
    parser.add_argument("--slow-last-width", type=int, default=3840, help="columns of the slowed model's last-token no-op GEMM (its cost per run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: the target's default)")
    parser.add_argument("--sessions", type=int, default=4, help="--gate-sessions: loads per phase, load order reversed each time (the gate's default 4)")
    parser.add_argument("--cpus", default=None, help="--gate-cpus: pin the process while timing (default: not pinned)")
    parser.add_argument("--scenarios", nargs="+", choices=tuple(SCENARIOS), default=list(SCENARIOS), help="scenarios to run (default: all)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    if args.quick:
        args.runs, args.rounds, args.prefill_rounds, args.warmup, args.budget_s = 2, 10, 5, 1, 1.0

    from rich.console import Console
    from rich.table import Table

    from zflora_compile.build import _gate_variants, compile_file
    from zflora_compile.gate import LatencyOptions, Variant, phase_shapes, run_gate
    from zflora_compile.latency import load_average, machine_info
    from zflora_compile.model_io import load_model
    from zflora_compile.options import CompileOptions
    from zflora_compile.verify import token_vocab
    from zflora_compile.progress import NullProgress
    from zflora_compile.targets import get_target

    started = time.perf_counter()
    machine = machine_info()
    target_options = None
    if args.threads is not None:
        from zflora_compile.targets import target_class

        target_options = target_class("ort").Options(threads=args.threads)
    target = get_target("ort", target_options)
    gate = {
        name: LatencyOptions(max_overhead_pct=pct, decode_rounds=args.rounds, prefill_rounds=args.prefill_rounds, warmup=args.warmup, budget_s=args.budget_s, sessions=loads or args.sessions, cpus=args.cpus)
        for name, (_, pct, _, loads) in SCENARIOS.items()
    }

    with tempfile.TemporaryDirectory(prefix="zflora-gate-calibration-") as tmp:
        tmp = Path(tmp)
        log(f"compiling {args.model} (fuse, target ort)")
        options = CompileOptions(strategy="fuse", target="ort", target_options=target_options, seed=args.seed, latency=gate["aa"])
        compile_file(args.model, tmp / "fused", options)
        fused = Variant(tmp / "fused", tmp / "fused" / "model.onnx")
        shapes = phase_shapes(fused.model, gate["aa"])
        vocab = token_vocab(load_model(args.model))
        log("building the gate's base and unfused variants")
        (tmp / "gate").mkdir()
        built = _gate_variants(args.model, tmp / "gate", target, shapes, options, NullProgress())
        (tmp / "slowed").mkdir()
        noop = slowed_model(built["base"].model, tmp / "slowed" / "model.onnx", args.slow_width, args.slow_last_width, seed=args.seed)
        target.build(tmp / "slowed" / "model.onnx", tmp / "slowed", shapes)
        noop["exactness"] = check_exact(built["base"].model, tmp / "slowed" / "model.onnx", shapes, vocab, args.seed)
        slowed = Variant(tmp / "slowed", tmp / "slowed" / "model.onnx")
        stand_ins = {"aa": built["base"], "aa_one_load": built["base"], "slowed": slowed, "fused": fused}

        runs = {name: [] for name in args.scenarios}
        for index in range(args.runs):
            for name in args.scenarios:
                variants = {"base": built["base"], "unfused": built["unfused"], "fused": stand_ins[name]}
                t0 = time.perf_counter()
                latency = run_gate(target, variants, shapes, gate[name], vocab, seed=args.seed + index)
                summary = run_summary(latency)
                summary["seconds"] = round(time.perf_counter() - t0, 2)
                runs[name].append(summary)
                phases = ", ".join(f"{p} {v['ratio_median']:.3f} [{v['ratio_interval'][0]:.3f}, {v['ratio_interval'][1]:.3f}] {v['verdict']}" for p, v in summary["phases"].items())
                log(f"run {index + 1}/{args.runs} {name}: {summary['verdict']} ({phases}; {summary['seconds']} s, load {load_average()})")

    scenarios = {}
    for name in args.scenarios:
        fused_is, pct, expected, _ = SCENARIOS[name]
        counts = Counter(r["verdict"] for r in runs[name])
        per_phase = {p: dict(Counter(r["phases"][p]["verdict"] for r in runs[name])) for p in runs[name][0]["phases"]} if runs[name] else {}
        medians = {p: float(np.median([r["phases"][p]["ratio_median"] for r in runs[name]])) for p in per_phase}
        scenarios[name] = {
            "fused_is": fused_is,
            "max_overhead_pct": pct,
            "expected": expected,
            "sessions": gate[name].sessions,
            "counts": {v: counts.get(v, 0) for v in VERDICTS},
            "counts_per_phase": {p: {v: c.get(v, 0) for v in VERDICTS} for p, c in per_phase.items()},
            "median_of_ratio_medians": medians,
            "runs": runs[name],
        }
    machine["load_average_end"] = load_average()
    results = {
        "benchmark": "gate_calibration",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": str(args.model.relative_to(ROOT)) if args.model.is_relative_to(ROOT) else str(args.model),
        "machine": machine,
        "versions": versions(),
        "target": target.name,
        "settings": {
            "quick": args.quick,
            "runs": args.runs,
            "decode_rounds": args.rounds,
            "prefill_rounds": args.prefill_rounds,
            "warmup": args.warmup,
            "budget_s": args.budget_s,
            "seed": args.seed,
            "seeds": f"run i uses seed {args.seed} + i (inputs and bootstrap)",
            "phases": [{"name": s.name, "seq": s.seq, "past": s.past} for s in shapes],
            "threads": args.threads,
            "sessions": args.sessions,
            "cpus": args.cpus,
            "timer": next(iter(latency["phases"].values()))["timer"],
        },
        "slowed_model": noop,
        "scenarios": scenarios,
        "total_seconds": round(time.perf_counter() - started, 1),
        "notes": [
            "each gate run is zflora_compile.gate.run_gate on ORT-target artifacts built as zcompile --check-latency builds them; only the model standing in as fused differs",
            "scenarios interleaved run by run, so machine load affects all three alike",
            "wall-clock timings on a shared machine; the counts, not single intervals, are the result",
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)) + "\n")

    table = Table(title=f"latency gate, {args.runs} runs per scenario ({args.rounds} decode / {args.prefill_rounds} prefill rounds, budget {args.budget_s:g} s/phase); load {machine['load_average_start']} -> {machine['load_average_end']}")
    for column in ("scenario", "fused is", "loads", "max overhead", "expected", *VERDICTS, "median ratio (decode / prefill)"):
        table.add_column(column, justify="right" if column in VERDICTS or column == "max overhead" else "left")
    for name, s in scenarios.items():
        ratios = " / ".join(f"{v:.3f}" for v in s["median_of_ratio_medians"].values())
        table.add_row(name, s["fused_is"], str(s["sessions"]), f"{s['max_overhead_pct']:g}%", s["expected"], *(str(s["counts"][v]) for v in VERDICTS), ratios)
    Console(width=160).print(table)
    print(f"saved {args.out} ({results['total_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
