"""benchmarks/swap.py --quick runs end to end and writes a complete JSON.

No assertion on timings: the structure (4 adapters with different ranks up to the max rank and
different seeds, every figure present, medians), and that every swapped model equals its
from-scratch compile (max |diff| <= 1e-5).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("rich")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "swap.py"


def test_quick_run(tmp_path):
    out = tmp_path / "results" / "swap.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    results = json.loads(out.read_text())
    assert results["benchmark"] == "swap" and results["settings"]["quick"] is True
    for key in ("platform", "cpu_model", "logical_cores"):
        assert key in results["machine"]
    rows = results["adapters"]
    assert len(rows) == 4 and len({r["rank"] for r in rows}) == 4 and len({r["seed"] for r in rows}) == 4
    assert max(r["rank"] for r in rows) <= results["settings"]["max_rank"]
    for row in rows:
        assert row["swap_s"] > 0 and row["compile_s"] > 0 and row["ratio"] == pytest.approx(row["compile_s"] / row["swap_s"], rel=0.05)
        assert row["max_abs_diff"] <= 1e-5
    assert set(results["medians"]) >= {"swap_s", "compile_s", "ratio"}
    assert "medians: swap" in proc.stdout and "saved" in proc.stdout
