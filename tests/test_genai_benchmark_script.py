"""benchmarks/genai_latency.py --quick runs end to end (onnxruntime-genai's builder, zcompile, generation)
and writes a complete, consistent JSON.

No assertion on timings: only that every built variant was timed in one interleaved run, that the
fp32 fused_lora folder generates builder_lora's greedy tokens exactly and has fewer GEMMs, and that
a variant zcompile did not compile is recorded as such instead of being timed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime_genai")
pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("rich")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "genai_latency.py"
KINDS = ("base", "builder_lora", "fused_lora")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("genai_latency")
    out = tmp / "results" / "quick.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--workdir", str(tmp / "work"), "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text()), proc.stdout


def test_json_structure(quick_run):
    results, stdout = quick_run
    assert results["benchmark"] == "genai_latency"
    settings = results["settings"]
    assert settings["quick"] is True and settings["ranks"] == [4] and settings["precisions"] == ["fp32", "int4"]
    for key in ("platform", "cpu_model", "logical_cores", "memory_gib", "load_average_start", "load_average_end"):
        assert key in results["machine"]
    for key in ("onnxruntime", "onnxruntime-genai", "zflora-compile"):
        assert results["versions"][key]
    run = results["run"]
    expected = [f"{p}/base" if k == "base" else f"{p}/r4/{k}" for p in ("fp32", "int4") for k in KINDS]
    assert list(run["variants"]) == expected
    assert run["load_average_timing_start"] is not None and run["load_average_timing_end"] is not None
    rounds = settings["rounds"]
    timed = run["timed_variants"]
    assert {"fp32/base", "fp32/r4/builder_lora", "fp32/r4/fused_lora", "int4/base", "int4/r4/builder_lora"} <= set(timed)
    # one interleaved run: every round has every timed variant once
    assert len(run["round_orders"]) == rounds
    assert all(sorted(order) == sorted(timed) for order in run["round_orders"])
    assert len({tuple(order) for order in run["round_orders"]}) == min(rounds, len(timed))  # rotated
    for v in timed:
        assert len(run["samples"][v]) == rounds
        stats = run["results"][v]
        for key in ("ttft", "decode_ms_per_token"):
            assert len(stats[key]["timings_ms"]) == rounds
            assert 0 < stats[key]["min_ms"] <= stats[key]["median_ms"] <= stats[key]["max_ms"]
            assert "paired_ratio_to_base_median" in stats[key]
        assert stats["decode_tokens_per_s"]["median"] > 0
        assert len(run["variants"][v]["tokens"]) == 1 + settings["new_tokens"]
        assert run["variants"][v]["tokens_same_in_every_run"]
        assert run["variants"][v]["dead_nodes"] == []  # every timed node reaches the logits
    for p in ("fp32", "int4"):
        assert run["results"][f"{p}/base"]["ttft"]["ratio_to_base"] == pytest.approx(1.0)
    # a variant that was not timed says why
    for v, status in run["untimed_variants"].items():
        assert status.startswith("not compiled: "), (v, status)
    assert "TTFT" in stdout and "decode tok/s" in stdout


def test_vocab_equal_to_a_linear_size_is_refused():
    """The builder would take the FFN's gate_proj for the LM head (logits wired to layer 0)."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--vocab", "8192", "--out", "/dev/null"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "LM head" in proc.stderr


def test_fp32_fused_tokens_equal_builder_and_fewer_gemms(quick_run):
    results, _ = quick_run
    run = results["run"]
    variants = run["variants"]
    fused, builder, base = variants["fp32/r4/fused_lora"], variants["fp32/r4/builder_lora"], variants["fp32/base"]
    assert fused["status"] == "compiled" and fused["compile"]["sites"] == 7 * results["settings"]["layers"]
    assert fused["tokens"] == builder["tokens"]
    check = run["token_checks"]["fp32/r4"]
    assert check["passed"] is True and check["fused_vs_builder_lora"]["equal"]
    assert check["prompt_logits_max_abs_diff"] < 1e-4
    assert check["adapter_effect"]["prompt_logits_max_abs_diff"] > 1e-3  # the adapter is not a no-op
    assert fused["gemm_count"] < builder["gemm_count"]
    assert run["results"]["fp32/r4/fused_lora"]["vs_builder_lora"]["decode_tokens_per_s_paired_ratio_median"] > 0
    assert builder["gemm_count"] > base["gemm_count"]  # the builder adds 2 GEMMs per adapted projection
    int4 = run["token_checks"]["int4/r4"]
    if variants["int4/r4/fused_lora"]["status"] == "compiled":
        assert 0 <= int4["fused_vs_builder_lora"]["agreement"] <= 1
        assert variants["int4/r4/fused_lora"]["gemm_count"] < variants["int4/r4/builder_lora"]["gemm_count"]
    else:
        assert int4["fused_vs_builder_lora"] is None and int4["note"].startswith("not compiled: ")
