"""Differential fuzzer: seeded random ONNX graphs through ``compile_model``, judged in ONNX Runtime.

    python benchmarks/fuzz.py --n 5000 [--seed0 S] [--out results.json] [--no-rank0] [--fast]

Prints the class counts (exact / unchanged / refused / caught / crash / wrong) in total and per
strategy, and the seeds of every crash, wrong output and verification catch; saves the JSON to
``benchmarks/results/fuzz.json`` (or ``--out``). The generator and the judge are
``tests/fuzz_graphs.py``. Exit status 1 when any crash or wrong output was found.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import fuzz_graphs  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="number of seeds")
    parser.add_argument("--seed0", type=int, default=0, help="first seed")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fuzz.json")
    parser.add_argument("--strategies", default=",".join(fuzz_graphs.STRATEGIES))
    parser.add_argument("--no-rank0", action="store_true", help="draw no rank-0 float graph inputs")
    parser.add_argument("--fast", action="store_true", help="run verify=True only where the raw rewrite is wrong")
    args = parser.parse_args(argv)
    fuzz_graphs.RANK0_INPUTS = not args.no_rank0
    strategies = tuple(args.strategies.split(","))
    start = time.perf_counter()
    total, per = collections.Counter(), {s: collections.Counter() for s in strategies}
    features = collections.Counter()
    findings = []
    for i, verdict in enumerate(fuzz_graphs.fuzz(range(args.seed0, args.seed0 + args.n), strategies, always_verify=not args.fast)):
        total[verdict.cls] += 1
        per[verdict.strategy][verdict.cls] += 1
        if verdict.strategy == strategies[0]:
            features.update(verdict.features)
        if verdict.cls in ("crash", "wrong", "caught"):
            findings.append(verdict.to_json())
            print(f"seed {verdict.seed} {verdict.strategy}: {verdict.cls}: {verdict.detail.splitlines()[0][:300]}", flush=True)
        if (i + 1) % (300 * len(strategies)) == 0:
            print(f"  {(i + 1) // len(strategies)} seeds, {time.perf_counter() - start:.0f} s: {dict(total)}", flush=True)
    elapsed = time.perf_counter() - start

    def line(counts):
        return " ".join(f"{c}={counts.get(c, 0)}" for c in fuzz_graphs.CLASSES)

    print(f"fuzz: {args.n} seeds x {len(strategies)} strategies in {elapsed:.0f} s: {line(total)}")
    for strategy in strategies:
        print(f"  {strategy:6s} {line(per[strategy])}")
    result = {
        "command": " ".join(["python", "benchmarks/fuzz.py", *(argv if argv is not None else sys.argv[1:])]),
        "n": args.n,
        "seed0": args.seed0,
        "strategies": list(strategies),
        "elapsed_s": round(elapsed, 1),
        "classes": {c: total.get(c, 0) for c in fuzz_graphs.CLASSES},
        "per_strategy": {s: {c: per[s].get(c, 0) for c in fuzz_graphs.CLASSES} for s in strategies},
        "feature_coverage": dict(sorted(features.items())),
        "findings": findings,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")
    return 1 if total.get("crash", 0) or total.get("wrong", 0) else 0


if __name__ == "__main__":
    raise SystemExit(main())
