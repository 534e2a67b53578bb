"""benchmarks/gpu_latency.py --quick runs end to end on CPU and writes a complete JSON.

No assertion on timings: only the structure, the GEMM counts the strategies promise, and that
every rewrite was verified. Two quick runs: ``--families ffba zflora`` and ``--families dora
bdlora gaws gaws_d``.
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

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_latency.py"
LORA = ("base", "unfused", "fused", "merged")
RUNS = {
    "ffba_zflora": (("ffba", "zflora"), LORA + ("ffba_unfused", "ffba_fused", "zflora_unfused", "zflora_fused")),
    "peft_gaws": (("dora", "bdlora", "gaws", "gaws_d"), LORA + tuple(f"{f}_{k}" for f in ("dora", "bdlora", "gaws", "gaws_d") for k in ("unfused", "merged", "fused"))),
}
PHASES = ("decode", "prefill")


@pytest.fixture(scope="module", params=sorted(RUNS))
def quick_run(request, tmp_path_factory):
    families, variants = RUNS[request.param]
    out = tmp_path_factory.mktemp("gpu_latency") / "quick.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--families", *families, "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text()), proc.stdout, families, variants


def test_json_structure(quick_run):
    results, _, families, variants = quick_run
    assert results["benchmark"] == "gpu_latency" and results["schema_version"] == 1
    assert results["device"]["type"] == "cpu" and results["device"]["name"]
    settings = results["settings"]
    assert settings["quick"] is True and settings["batch"] == 1 and settings["dtype"] == "float32"
    assert settings["decode"] == {"new_tokens": 1, "past_length": 16}
    assert settings["prefill"]["new_tokens"] == 16
    budget = settings["equal_parameter_budget"]
    assert set(budget) == {"lora", *families} and settings["families"] == list(families)
    assert all(abs(b["adapter_parameters"] - budget["lora"]["adapter_parameters"]) < 0.25 * budget["lora"]["adapter_parameters"] for b in budget.values())
    for family in families:
        size = budget[family].get("groups") or budget[family].get("block") or budget[family]["rank"]
        if family in ("gaws", "gaws_d"):  # a group count / block size per projection
            assert set(size) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        elif family == "bdlora":  # 2 blocks
            assert size % 2 == 0
    assert set(results["results"]) == set(PHASES)
    for phase in PHASES:
        eager = results["results"][phase]["eager"]
        assert set(eager["variants"]) == set(variants)
        assert len(eager["orders"]) == eager["rounds"] and all(sorted(order) == sorted(variants) for order in eager["orders"])
        for stats in eager["variants"].values():
            assert stats["runs"] == eager["rounds"] and len(stats["timings_ms"]) == eager["rounds"]
            assert stats["median_ms"] > 0
        assert eager["variants"]["base"]["ratio_to_base"] == 1.0
        assert results["results"][phase]["cuda_graphs"] == {"skipped": "no CUDA device"}


def test_variants_are_verified_and_have_the_promised_gemm_counts(quick_run):
    results, _, families, variants_run = quick_run
    for phase in PHASES:
        variants = results["variants"][phase]
        sites = variants["fused"]["sites"]
        assert sites == 14  # 2 layers x 7 projections
        unfused = variants["unfused"]["gemm_count"]
        assert variants["base"]["gemm_count"] == variants["merged"]["gemm_count"] == unfused - 2 * sites
        assert variants["fused"]["gemm_count"] == unfused - 3 * sites + 2 * 8  # QKV, O, GU, D per layer
        assert set(variants) == set(variants_run)
        for variant in variants_run:
            if variant == "unfused" or variant.endswith("_unfused"):
                continue
            assert variants[variant]["verification_passed"] is True, (phase, variant, variants[variant])
            assert "verification_error" not in variants[variant]
        base = variants["base"]["gemm_count"]
        for family in families:
            unfused, fused = variants[f"{family}_unfused"]["gemm_count"], variants[f"{family}_fused"]["gemm_count"]
            assert base < unfused and fused <= unfused
            if family in ("ffba", "zflora"):  # zero extra GEMMs: the fused family has the base's count
                assert fused == base
            else:  # merge folds the update into W
                assert variants[f"{family}_merged"]["gemm_count"] == base
            if family in ("dora", "bdlora"):  # fused as LoRA
                assert base < fused < unfused


def test_table_is_printed(quick_run):
    _, stdout, _, variants = quick_run
    assert "median ms" in stdout and "skipped: no CUDA device" in stdout
    for variant in variants:
        assert variant in stdout
