"""benchmarks/family_latency.py --quick runs end to end: every variant timed in both phases, the
GEMM counts the strategies promise, equal-budget sizes, verification passed. No timing assertions.

Two quick runs (each well under a minute): the families of the first version (LoRA, FFBA, zFLoRA)
with DoRA, and BD-LoRA with GAWS and GAWS-D."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "family_latency.py"
LORA = ("base", "lora_unfused", "lora_merged", "lora_fused")
RUNS = {
    "first": (("ffba", "zflora", "dora"), LORA + ("ffba_unfused", "ffba_fused", "zflora_unfused", "zflora_fused", "dora_unfused", "dora_merged", "dora_fused")),
    "second": (("bdlora", "gaws", "gaws_d"), LORA + tuple(f"{f}_{k}" for f in ("bdlora", "gaws", "gaws_d") for k in ("unfused", "merged", "fused"))),
}


@pytest.fixture(scope="module", params=sorted(RUNS))
def quick_run(request, tmp_path_factory):
    families, variants = RUNS[request.param]
    tmp_path = tmp_path_factory.mktemp(f"families_{request.param}")
    out = tmp_path / "families.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--families", *families, "--out", str(out), "--workdir", str(tmp_path / "work"), "--threads", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return families, variants, json.loads(out.read_text()), proc.stdout


def test_every_variant_compiled_verified_and_timed(quick_run):
    families, variants, results, stdout = quick_run
    assert results["schema_version"] == 2 and results["settings"]["families"] == ["lora", *families]
    assert results["settings"]["variants"] == list(variants) and set(results["variants"]) == set(variants)
    assert results["failures"] == {}
    for variant in variants:
        info = results["variants"][variant]
        assert isinstance(info["gemm_count"], int) and info["gemm_count"] > 0
        if not variant.endswith("_unfused"):  # base, merged, fused: through compile_file, verified
            assert info["verified"] is True and info["verify_max_abs_diff"] <= 1e-4
        assert variant in stdout
    for phase in ("decode", "prefill"):
        stats = results["phases"][phase]["variants"]
        assert set(stats) == set(variants)
        for variant in variants:
            assert stats[variant]["median_ms"] > 0
            if variant != "base":
                assert stats[variant]["max_abs_diff_vs_unfused"] <= 1e-4
        assert all(effect > 1e-3 for effect in results["phases"][phase]["adapter_effect_max_abs_logit_diff"].values())
    assert "GEMMs" in stdout


def test_gemm_counts(quick_run):
    families, _, results, _ = quick_run
    variants = results["variants"]
    base_gemms = variants["base"]["gemm_count"]
    assert variants["lora_merged"]["gemm_count"] == base_gemms < variants["lora_fused"]["gemm_count"] < variants["lora_unfused"]["gemm_count"]
    for family in families:
        unfused, fused = variants[f"{family}_unfused"]["gemm_count"], variants[f"{family}_fused"]["gemm_count"]
        assert base_gemms < unfused and fused <= unfused
        if family in ("ffba", "zflora"):  # zero extra GEMMs
            assert fused == base_gemms
        else:
            assert variants[f"{family}_merged"]["gemm_count"] == base_gemms
        if family in ("dora", "bdlora"):  # fused as LoRA: the widened groups (DoRA: plus a per-column Mul)
            assert base_gemms < fused < unfused
    if "zflora" in families:
        assert variants["zflora_fused"]["op_counts"] == variants["base"]["op_counts"]


def test_equal_parameter_budget(quick_run):
    families, _, results, _ = quick_run
    budget = results["equal_parameter_budget"]
    lora = budget["lora"]["adapter_parameters"]
    assert set(budget) == {"lora", *families} and budget["lora"]["size"] == 4
    for family in families:
        entry = budget[family]
        assert entry["adapter_parameters"] == results["variants"][f"{family}_unfused"]["adapter_parameters"] == results["variants"][f"{family}_fused"]["adapter_parameters"]
        assert abs(entry["adapter_parameters"] - lora) < 0.25 * lora
        assert entry["ratio_to_lora"] == pytest.approx(entry["adapter_parameters"] / lora, abs=1e-4)
        if family == "bdlora":
            assert entry["size"] % 2 == 0
        if family in ("gaws", "gaws_d"):  # one factor per projection, closer than any single factor
            assert set(entry["size"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
            assert abs(entry["adapter_parameters"] - lora) <= abs(entry["closest_single_factor"]["adapter_parameters"] - lora)
