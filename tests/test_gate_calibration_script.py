"""benchmarks/gate_calibration.py --quick runs end to end and writes a complete JSON.

No assertion on timings or verdicts: only the structure (every scenario, its counts adding up
to the runs, every run's phases with an interval), and that the slowed model is exact.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("rich")
pytest.importorskip("onnxruntime")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gate_calibration.py"
SCENARIOS = ("aa", "aa_one_load", "slowed", "fused")
VERDICTS = {"pass", "inconclusive", "regression"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gate_calibration") / "results" / "quick.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text()), proc.stdout


def test_json_structure(quick_run):
    results, _ = quick_run
    assert results["benchmark"] == "gate_calibration"
    assert results["target"] == "ort"
    assert results["settings"]["quick"] is True
    runs = results["settings"]["runs"]
    assert runs == 2
    for key in ("platform", "cpu_model", "logical_cores", "load_average_start", "load_average_end"):
        assert key in results["machine"]
    assert results["versions"]["onnxruntime"]
    phases = [p["name"] for p in results["settings"]["phases"]]
    assert phases == ["decode", "prefill"]
    assert set(results["scenarios"]) == set(SCENARIOS)
    assert results["scenarios"]["aa"]["max_overhead_pct"] == 2
    assert results["scenarios"]["slowed"]["max_overhead_pct"] == 2
    assert results["scenarios"]["fused"]["max_overhead_pct"] == 50
    from zflora_compile.latency import load_count

    assert results["scenarios"]["aa"]["sessions"] == 4 and results["scenarios"]["aa_one_load"]["sessions"] == 1
    assert "bound run" in results["settings"]["timer"]  # ORT I/O binding: no copies timed
    for name, scenario in results["scenarios"].items():
        for run in scenario["runs"]:
            for phase_name, phase in run["phases"].items():
                loads = phase["loads"]
                assert sum(item["rounds"] for item in loads) == phase["rounds"], name
                requested = results["settings"]["decode_rounds" if phase_name == "decode" else "prefill_rounds"]
                assert len(loads) >= load_count(requested, scenario["sessions"]), name
    for name, scenario in results["scenarios"].items():
        assert set(scenario["counts"]) == VERDICTS, name
        assert sum(scenario["counts"].values()) == runs, name
        assert len(scenario["runs"]) == runs, name
        assert set(scenario["median_of_ratio_medians"]) == set(phases), name
        for run in scenario["runs"]:
            assert run["verdict"] in VERDICTS
            assert set(run["phases"]) == set(phases)
            for phase in run["phases"].values():
                low, high = phase["ratio_interval"]
                assert low <= phase["ratio_median"] <= high
                assert phase["verdict"] in VERDICTS
                assert phase["rounds"] >= 1


def test_slowed_model_is_exact(quick_run):
    results, _ = quick_run
    slowed = results["slowed_model"]
    assert slowed["exactness"]["bit_identical"] is True
    assert slowed["exactness"]["max_abs_diff"] == 0.0
    assert slowed["width"] > 0 and slowed["last_token_width"] > 0


def test_table_printed(quick_run):
    _, stdout = quick_run
    for name in SCENARIOS:
        assert name in stdout
    assert "saved" in stdout
