"""benchmarks/family_latency.py --quick runs end to end: every variant timed in both phases, the
GEMM counts the fusions promise, equal-budget ranks, verification passed. No timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "family_latency.py"
VARIANTS = ("base", "lora_unfused", "lora_merged", "lora_fused", "ffba_unfused", "ffba_fused", "zflora_unfused", "zflora_fused")


def test_quick_run(tmp_path):
    out = tmp_path / "families.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--workdir", str(tmp_path / "work"), "--threads", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    variants = results["variants"]
    assert set(variants) == set(VARIANTS)
    base_gemms = variants["base"]["gemm_count"]
    for family in ("ffba", "zflora"):
        assert variants[f"{family}_fused"]["gemm_count"] == base_gemms < variants[f"{family}_unfused"]["gemm_count"]
        budget = variants["lora_unfused"]["adapter_parameters"]
        assert abs(variants[f"{family}_fused"]["adapter_parameters"] - budget) < 0.25 * budget
    assert variants["lora_merged"]["gemm_count"] == base_gemms < variants["lora_fused"]["gemm_count"] < variants["lora_unfused"]["gemm_count"]
    assert variants["zflora_fused"]["op_counts"] == variants["base"]["op_counts"]
    for phase in ("decode", "prefill"):
        stats = results["phases"][phase]["variants"]
        assert set(stats) == set(VARIANTS)
        for variant in VARIANTS:
            assert stats[variant]["median_ms"] > 0
            if variant != "base":
                assert stats[variant]["max_abs_diff_vs_unfused"] <= 1e-4
    assert "zflora_fused" in proc.stdout
