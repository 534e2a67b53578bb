"""benchmarks/ort_latency.py --quick runs end to end and writes a complete, consistent JSON.

No assertion on timings: only that every variant x phase was measured, that the GEMM counts
from the compile reports show what the strategies promise, and that verification passed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("rich")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "ort_latency.py"
VARIANTS = ("base", "unfused", "merged", "fused")
PHASES = ("decode", "prefill")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ort_latency")
    out = tmp / "results" / "quick.json"
    workdir = tmp / "work"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--workdir", str(workdir), "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text()), proc.stdout, workdir


def test_json_has_every_variant_and_phase(quick_run):
    results, _, _ = quick_run
    assert results["benchmark"] == "ort_latency"
    assert results["settings"]["quick"] is True
    assert results["ranks"] == [4]
    assert [entry["rank"] for entry in results["results"]] == results["ranks"]
    for key in ("platform", "cpu_model", "logical_cores", "memory_gib"):
        assert key in results["machine"]
    for key in ("onnxruntime", "torch", "zflora_compile"):
        assert results["versions"][key]
    assert any("interleaved" in note for note in results["notes"])
    for entry in results["results"]:
        assert entry["export"]["past_axis_dynamic"] is True
        assert set(entry["phases"]) == set(PHASES)
        assert entry["phases"]["decode"]["new_tokens"] == 1
        assert entry["phases"]["decode"]["past_length"] == 8
        assert entry["phases"]["prefill"]["new_tokens"] == 16
        assert entry["phases"]["prefill"]["past_length"] in (0, 1)
        for phase, data in entry["phases"].items():
            assert set(data["variants"]) == set(VARIANTS), phase
            rounds = data["rounds"]
            assert len(data["round_orders"]) == rounds
            assert all(sorted(order) == sorted(VARIANTS) for order in data["round_orders"])
            for variant, stats in data["variants"].items():
                assert stats["median_ms"] > 0, (phase, variant)
                assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"], (phase, variant)
                assert len(stats["timings_ms"]) == rounds == stats["runs"]
                assert stats["ratio_to_base"] > 0
            assert data["variants"]["base"]["ratio_to_base"] == pytest.approx(1.0)


def test_gemm_counts_follow_the_strategies(quick_run):
    results, _, _ = quick_run
    for entry in results["results"]:
        gemms = {v: entry["variants"][v]["gemm_count"] for v in VARIANTS}
        assert entry["adapter_sites"] == 7 * results["settings"]["layers"]
        assert gemms["fused"] < gemms["unfused"]
        assert gemms["merged"] < gemms["unfused"]
        # every adapted projection costs two extra GEMMs (x @ A, then @ B) in the export
        assert gemms["unfused"] == gemms["base"] + 2 * entry["adapter_sites"]
        assert gemms["merged"] == gemms["base"]
        # fuse: a group of n projections reading one tensor becomes 2 GEMMs instead of n
        # (QKV: -1, O: +1, gate/up: 0, down: +1, so +1 per Llama layer)
        assert gemms["fused"] == gemms["base"] + sum(2 - g["sites"] for g in entry["groups"])
        assert gemms["fused"] - gemms["base"] == results["settings"]["layers"]


def test_verification_passed_for_every_variant(quick_run):
    results, _, _ = quick_run
    for entry in results["results"]:
        for variant in ("base", "merged", "fused"):
            verification = entry["variants"][variant]["verification"]
            assert verification["passed"] is True, variant
            assert verification["max_abs_diff"] <= 1e-4, variant
        assert entry["variants"]["unfused"]["verification"]["passed"] is None  # it is the reference
        for phase, data in entry["phases"].items():
            assert data["adapter_effect_max_abs_logit_diff"] > 1e-3, phase  # base really differs
            for variant, stats in data["variants"].items():
                assert stats["output_check"]["torch_close"], (phase, variant)


def test_table_printed_and_workdir_kept_out_of_results(quick_run):
    _, stdout, workdir = quick_run
    for word in ("base", "unfused", "merged", "fused", "decode", "prefill", "median ms"):
        assert word in stdout
    assert (workdir / "r4" / "export" / "model.onnx").exists()  # an explicit --workdir is kept


def test_prefill_falls_back_to_a_one_token_cache():
    import importlib.util

    import numpy as np

    spec = importlib.util.spec_from_file_location("ort_latency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class Failing:
        def run(self, names, feeds):
            raise RuntimeError("Concat: zero-length past\nmore")

    class Wrong:
        def run(self, names, feeds):
            return [np.ones((1, 2, 3), np.float32)]

    references = {("prefill", 0, True): np.zeros((1, 2, 3), np.float32)}
    feeds = {("prefill", 0): {}, ("prefill", 1): {}}
    past, why = module.choose_prefill_past({"unfused": Failing()}, references, feeds)
    assert past == 1 and "fails" in why and "zero-length past" in why
    past, why = module.choose_prefill_past({"unfused": Wrong()}, references, feeds)
    assert past == 1 and "differs from PyTorch" in why
