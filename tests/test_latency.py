"""The interleaved timing harness: rotation, pairing, counts and statistics; the gate's paired
ratio interval and verdict on synthetic samples (seeded bootstrap: deterministic; no timing is asserted)."""

from __future__ import annotations

import pytest

import numpy as np

from zflora_compile.latency import interleaved, paired_orders, paired_ratio_interval, rotated, summarize, verdict


def test_rounds_rotate_and_warmup_is_not_timed():
    calls = []
    runners = {name: (lambda n=name: calls.append(n)) for name in ("base", "unfused", "fused")}
    times, orders = interleaved(runners, rounds=4, warmup=2)
    assert calls[:6] == ["base", "base", "unfused", "unfused", "fused", "fused"]
    assert orders == [rotated(["base", "unfused", "fused"], i) for i in range(4)]
    assert orders[1] == ["unfused", "fused", "base"]
    assert calls[6:] == [name for order in orders for name in order]
    assert {name: len(v) for name, v in times.items()} == {"base": 4, "unfused": 4, "fused": 4}
    assert all(t >= 0 for v in times.values() for t in v)


def test_summary_statistics():
    stats = summarize({"base": [10.0, 12.0, 11.0], "fused": [11.0, 12.0, 13.2]})
    assert stats["base"]["median_ms"] == 11.0 and stats["base"]["ratio_to_base"] == 1.0
    assert stats["fused"]["median_ms"] == 12.0
    assert stats["fused"]["ratio_to_base"] == pytest.approx(12.0 / 11.0)
    assert stats["fused"]["paired_ratio_to_base_median"] == pytest.approx(1.1)  # 1.1, 1.0, 1.2
    assert (stats["fused"]["min_ms"], stats["fused"]["max_ms"]) == (11.0, 13.2)


def test_paired_rounds_keep_base_and_fused_adjacent_in_alternating_order():
    calls = []
    runners = {name: (lambda n=name: calls.append(n)) for name in ("base", "unfused", "fused")}
    times, orders = interleaved(runners, rounds=8, warmup=0, pair=("base", "fused"))
    assert calls == [name for order in orders for name in order]
    for index, order in enumerate(orders):
        assert sorted(order) == ["base", "fused", "unfused"]
        at = order.index("base"), order.index("fused")
        assert abs(at[0] - at[1]) == 1
        assert (at[0] < at[1]) == (index % 2 == 0)  # base first in even rounds, fused first in odd ones
    assert {tuple(o) for o in orders} == {tuple(paired_orders(["base", "unfused", "fused"], ("base", "fused"), i)) for i in range(2)}
    # balanced: over the rounds, base and fused each follow unfused, and each other, equally often
    sequence = [name for order in orders for name in order]
    follows = [(sequence[i - 1], sequence[i]) for i in range(1, len(sequence))]
    assert follows.count(("unfused", "base")) == follows.count(("unfused", "fused")) == 4
    assert follows.count(("fused", "base")) == follows.count(("base", "fused")) == 4
    _, more = interleaved(runners, rounds=2, warmup=0, pair=("base", "fused"), start=8)
    assert more == orders[:2]  # a further batch continues the alternation


def _noisy(center: float, spread: float, rounds: int, seed: int):
    rng = np.random.default_rng(seed)
    base = 10.0 * (1 + rng.uniform(0, 0.5, rounds))  # the machine's load moves both alike
    return list(base), list(base * (center + rng.normal(0, spread, rounds)))


def test_paired_interval_is_the_seeded_bootstrap_of_the_median_ratio():
    base, fused = _noisy(1.0, 0.02, 40, 1)
    first = paired_ratio_interval(base, fused, seed=3)
    assert first == paired_ratio_interval(base, fused, seed=3)  # deterministic
    assert first["rounds"] == 40 and first["resamples"] == 2000 and first["confidence"] == 0.95
    assert first["median"] == pytest.approx(float(np.median(np.asarray(fused) / np.asarray(base))))
    assert first["low"] <= first["median"] <= first["high"]
    assert first["ratios"] == pytest.approx([f / b for f, b in zip(fused, base)], abs=1e-6)
    with pytest.raises(ValueError):
        paired_ratio_interval([1.0, 2.0], [1.0])


@pytest.mark.parametrize(
    ("center", "expected"),
    [(0.90, "pass"), (1.25, "regression"), (1.02, "inconclusive")],
)
def test_verdict_on_synthetic_rounds(center, expected):
    """Threshold 1.02 (--max-overhead 2): clearly faster passes, clearly slower is a regression,
    noise around the threshold itself straddles it."""
    base, fused = _noisy(center, 0.03, 30, 7)
    interval = paired_ratio_interval(base, fused, seed=0)
    assert verdict(interval, 1.02) == expected, interval


def test_verdict_bounds():
    assert verdict({"low": 0.9, "high": 1.02}, 1.02) == "pass"
    assert verdict({"low": 1.0201, "high": 1.1}, 1.02) == "regression"
    assert verdict({"low": 1.02, "high": 1.1}, 1.02) == "inconclusive"


def test_bootstrap_keeps_each_load_orders_share():
    """Two loads in opposite load orders whose sessions favour opposite variants by a fixed amount
    (ratios 0.95 in one, 1.05 in the other, 10 rounds each): every resample draws one load per
    order, so its median is always 1.0; a plain resample of the rounds may hold 14 of one and
    moves the median to that load's value: the plain interval spans the bias, this one does not."""
    base = [1.0] * 20
    other = [0.95] * 10 + [1.05] * 10
    blocks = [0] * 10 + [1] * 10
    by_order = paired_ratio_interval(base, other, blocks=blocks, strata=blocks, seed=0)
    plain = paired_ratio_interval(base, other, seed=0)
    assert by_order["median"] == pytest.approx(1.0)
    assert (by_order["low"], by_order["high"]) == pytest.approx((1.0, 1.0))
    assert plain["low"] == pytest.approx(0.95) and plain["high"] == pytest.approx(1.05)
    with pytest.raises(ValueError, match="one block label per round"):
        paired_ratio_interval(base, other, blocks=[0, 1])
    with pytest.raises(ValueError, match="one stratum label per round"):
        paired_ratio_interval(base, other, blocks=blocks, strata=[0])


def test_bootstrap_over_loads_shows_a_session_that_stays_slow():
    """An A/A run as measured on the 2-core machine: four loads (orders 0 1 0 1) whose medians were
    1.12, 0.91, 1.10, 1.15: sessions that stay slower or faster for their lifetime. Rounds within
    a load agree closely, so a bootstrap of the rounds alone (stratified by load) is sure of a
    ~10% regression; drawing the loads too puts the 0.91 load's weight in the interval, which
    then reaches below a 2% threshold: inconclusive, not a false regression."""
    rng = np.random.default_rng(0)
    centres = [1.12, 0.91, 1.10, 1.15]
    other = [c * (1 + rng.normal(0, 0.005)) for c in centres for _ in range(15)]
    base = [1.0] * len(other)
    blocks = [load for load in range(4) for _ in range(15)]
    orders = [load % 2 for load in blocks]
    rounds_only = paired_ratio_interval(base, other, blocks=blocks, strata=blocks, seed=0)
    loads_too = paired_ratio_interval(base, other, blocks=blocks, strata=orders, seed=0)
    assert verdict(rounds_only, 1.02) == "regression"
    assert verdict(loads_too, 1.02) == "inconclusive" and loads_too["low"] < 1.02 and loads_too["high"] > 1.1
    assert loads_too["median"] == rounds_only["median"]  # the estimate is the same; only its uncertainty differs
