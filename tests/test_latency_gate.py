"""The latency gate on the ORT target: pass, deterministic failure, report schema, PNG, pipeline files.

No test depends on timing noise: the passing cases allow 100000% (a thousandfold slowdown,
beyond what a loaded shared CI machine produces on a sub-millisecond model), the failing cases
use a negative threshold (fused/base - 1 > -100% always).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import jsonschema
import pytest

from zflora_compile.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_llama_lora.onnx"
SCHEMA = json.loads(resources.files("zflora_compile").joinpath("report_schema.json").read_text())
FAST = ["--prefill", "16", "--past", "16", "--rounds", "6", "--prefill-rounds", "4", "--warmup", "1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_gate_passes_with_a_generous_threshold(capsys, tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, EXAMPLE, "-o", out_dir, "--check-latency", "--max-overhead", "100000", "--json", *FAST)
    assert code == 0, err
    report = json.loads(out)
    jsonschema.validate(report, SCHEMA)
    latency = report["latency"]
    assert latency["passed"] is True and latency["max_overhead_pct"] == 100000 and latency["target"] == "ort"
    assert latency["emulated"] is False
    assert set(latency["phases"]) == {"decode", "prefill"}
    decode, prefill = latency["phases"]["decode"], latency["phases"]["prefill"]
    assert (decode["seq"], decode["past"], decode["rounds"]) == (1, 16, 6)
    assert (prefill["seq"], prefill["past"], prefill["rounds"]) == (16, 0, 4)
    for phase in (decode, prefill):
        assert set(phase["variants"]) == {"base", "unfused", "fused"}
        assert all(v["runs"] == phase["rounds"] and v["min_ms"] <= v["median_ms"] <= v["max_ms"] for v in phase["variants"].values())
        assert phase["variants"]["base"]["ratio_to_base"] == 1.0
        assert phase["overhead_pct"] == pytest.approx((phase["variants"]["fused"]["ratio_to_base"] - 1) * 100)
    assert latency["worst_overhead_pct"] == max(decode["overhead_pct"], prefill["overhead_pct"])
    assert sorted(p.name for p in out_dir.iterdir()) == ["latency.png", "model.onnx", "model.optimized.onnx", "report.json"]
    assert (out_dir / "latency.png").read_bytes()[:8] == PNG_MAGIC
    assert "latency gate passed" in report["message"]


def test_gate_fails_with_exit_1_and_a_complete_report(capsys, tmp_path):
    out_dir, report_path = tmp_path / "out", tmp_path / "ci" / "zcompile.json"
    code, out, err = run(capsys, EXAMPLE, "-o", out_dir, "--check-latency", "--max-overhead", "-100", "--report", report_path, *FAST, "--phases", "decode")
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("zcompile: error: latency gate failed on target ort: fused vs base overhead decode")
    report = json.loads(report_path.read_text())
    jsonschema.validate(report, SCHEMA)
    assert report["status"] == "latency_gate_failed" and report["exit_code"] == 1
    assert report == json.loads((out_dir / "report.json").read_text())
    assert set(report["latency"]["phases"]) == {"decode"} and report["latency"]["passed"] is False
    assert (out_dir / "latency.png").read_bytes()[:8] == PNG_MAGIC
    assert "gate" in out and "FAILED" in out  # the table is printed even on failure


def test_report_file_is_written_on_bad_input_too(capsys, tmp_path):
    missing, report_path = tmp_path / "missing.onnx", tmp_path / "r.json"
    code, _, err = run(capsys, missing, "-o", tmp_path / "out", "--report", report_path)
    assert code == 2 and str(missing) in err
    report = json.loads(report_path.read_text())
    jsonschema.validate(report, SCHEMA)
    assert report["status"] == "error" and report["exit_code"] == 2
    assert not (tmp_path / "out").exists()


def test_gate_on_a_model_without_adapters_compares_equal_graphs(capsys, tmp_path):
    base_dir = tmp_path / "base"
    assert run(capsys, EXAMPLE, "-o", base_dir, "--strategy", "strip", "--quiet")[0] == 0
    code, out, err = run(capsys, base_dir / "model.onnx", "-o", tmp_path / "gated", "--check-latency", "--max-overhead", "100000", "--json", *FAST)
    assert code == 0, err
    report = json.loads(out)
    assert report["sites"] == [] and report["latency"]["passed"] is True
    assert report["output"]["op_counts"] == report["input"]["op_counts"]


def test_artifact_mismatch_fails_verification_and_writes_nothing(capsys, tmp_path, monkeypatch):
    from zflora_compile.targets import ort as ort_target

    original_load = ort_target.OrtTarget.load

    def corrupted_load(self, out_dir, model_path, shape):
        loaded = original_load(self, out_dir, model_path, shape)
        run_model = loaded.run
        loaded.run = lambda feeds: [output + 1.0 for output in run_model(feeds)]
        return loaded

    monkeypatch.setattr(ort_target.OrtTarget, "load", corrupted_load)
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, EXAMPLE, "-o", out_dir, "--json")
    assert code == 1
    assert "the ort artifact does not match model.onnx: output 'logits'" in err
    assert json.loads(out)["status"] == "verification_failed"
    assert not out_dir.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


@pytest.mark.parametrize(("max_overhead", "expected"), [("100000", 0), ("-100", 1)])
def test_pipeline_example_stops_on_a_regression(tmp_path, max_overhead, expected):
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "examples" / "pipeline.sh"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", str(script), str(EXAMPLE), "ort", max_overhead], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == expected, done.stderr
    report = json.loads((tmp_path / "build" / "reports" / "tiny_llama_lora_ort.json").read_text())
    jsonschema.validate(report, SCHEMA)
    assert report["exit_code"] == expected
    assert ("deploy: build/tiny_llama_lora_ort" in done.stdout) == (expected == 0)
    assert ("blocked:" in done.stderr) == (expected == 1)
