"""The differential fuzzer (tests/fuzz_graphs.py) over a few hundred seeds: no crash, no wrong output.

Every seed is a random graph of projections, LoRA chains, FFA/FBA lanes and zFLoRA reads placed
validly and invalidly; every strategy's written model is compared in ONNX Runtime with the
original (fuse, merge) or with the original with the generator's own adapters zeroed (strip).
``benchmarks/fuzz.py --n 5000`` runs the long version.
"""

from __future__ import annotations

import collections

import fuzz_graphs
import pytest

SEEDS = range(10_000, 10_250)


def test_generator_is_deterministic_and_valid():
    a, b = fuzz_graphs.generate(7), fuzz_graphs.generate(7)
    assert a.model.SerializeToString() == b.model.SerializeToString()
    assert a.adapters and fuzz_graphs.run(a.model, a.feeds)


def _seeds_with(feature: str, count: int = 4) -> list[int]:
    seeds = (seed for seed in range(20_000, 22_000) if feature in fuzz_graphs.generate(seed).features)
    return [next(seeds) for _ in range(count)]


@pytest.mark.parametrize(
    "feature, strategies",
    [
        ("x@W + (C1 + C2)", ("strip",)),  # strip once kept C1, taking its B GEMM for a base projection
        ("crossed lane hosts", ("fuse", "strip")),  # two hosts reading each other's lanes: a cycle if widened as drawn
        ("cast int32", ("merge",)),  # Cast(Cast(x, int32), float) was a pass-through: merged as LoRA on x
        ("shared weight", ("merge",)),  # a weight two GEMMs read is never rewritten in place
    ],
)
def test_drawn_known_bug_shapes(feature, strategies):
    for seed in _seeds_with(feature):
        case = fuzz_graphs.generate(seed)
        for strategy in strategies:
            verdict = fuzz_graphs.judge(case, strategy)
            assert verdict.cls in ("exact", "refused", "unchanged"), (seed, verdict)


def test_fuzz_no_crash_no_wrong_output(capsys):
    counts = {s: collections.Counter() for s in fuzz_graphs.STRATEGIES}
    bad = []
    for verdict in fuzz_graphs.fuzz(SEEDS):
        counts[verdict.strategy][verdict.cls] += 1
        if verdict.cls in ("crash", "wrong"):
            bad.append(f"seed {verdict.seed} {verdict.strategy}: {verdict.cls}: {verdict.detail[:400]}")
    with capsys.disabled():
        for strategy, c in counts.items():
            print(f"\nfuzz {len(SEEDS)} seeds {strategy}: " + " ".join(f"{k}={c.get(k, 0)}" for k in fuzz_graphs.CLASSES), end="")
        print()
    assert not bad, "\n".join(bad)
    for strategy in ("fuse", "merge"):
        assert counts[strategy]["exact"] > len(SEEDS) // 3  # the generator keeps drawing rewritable adapters
    # strip refuses while anything adapter-shaped is unrecognised, and the generator crowds its graphs
    # with near-misses: most strips are refused (exit 2), some are written, none is wrong
    assert counts["strip"]["exact"] > len(SEEDS) // 20
