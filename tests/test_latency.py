"""The interleaved timing harness: rotation, counts and statistics (no timing is asserted)."""

from __future__ import annotations

import pytest

from zflora_compile.latency import interleaved, rotated, summarize


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
