"""The ``onnx`` target (no engine) and the artifact check's memory discipline.

- ``--target onnx`` writes the verified model.onnx and the report only, skips the artifact check
  with the reason, and the latency gate still runs (ONNX Runtime CPU on the model files).
- The artifact check keeps one ONNX Runtime session alive at a time (counted with weak
  references to every session created): a model's weights are held once, not once per session.
"""

from __future__ import annotations

import gc
import json
import weakref
from importlib import resources
from pathlib import Path

import jsonschema
import onnxruntime as ort

from zflora_compile.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_llama_lora.onnx"
SCHEMA = json.loads(resources.files("zflora_compile").joinpath("report_schema.json").read_text())
FAST = ["--prefill", "16", "--past", "16", "--rounds", "4", "--prefill-rounds", "4", "--warmup", "1", "--gate-budget-s", "0", "--gate-sessions", "2"]


def test_onnx_target_writes_the_model_only(capsys, tmp_path):
    out = tmp_path / "out"
    code = main([str(EXAMPLE), "-o", str(out), "--target", "onnx", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    jsonschema.validate(report, SCHEMA)
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.json"]
    assert report["target"]["name"] == "onnx" and report["target"]["artifacts"] == []
    assert report["target"]["check"]["passed"] is True and "builds no artifact" in report["target"]["check"]["skipped"]
    assert report["verification"]["passed"] is True


def test_onnx_target_prints_what_it_did(capsys, tmp_path):
    """The human-readable summary (not --json) says no artifact was built and checked."""
    code = main([str(EXAMPLE), "-o", str(tmp_path / "out"), "--target", "onnx"])
    out = capsys.readouterr().out
    assert code == 0 and "target onnx: target onnx builds no artifact" in out


def test_onnx_target_runs_the_latency_gate(capsys, tmp_path):
    code = main([str(EXAMPLE), "-o", str(tmp_path / "out"), "--target", "onnx", "--check-latency", "--max-overhead", "100000", "--json", *FAST])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["latency"]["verdict"] == "pass" and report["latency"]["target"] == "onnx"
    assert all("model.onnx" in phase["runs_on"] for phase in report["latency"]["phases"].values())


def test_artifact_check_holds_one_session_at_a_time(monkeypatch, tmp_path):
    from zflora_compile.gate import LatencyOptions, phase_shapes
    from zflora_compile.targets import get_target
    from zflora_compile.targets.check import check_artifact

    target = get_target("ort")
    built = tmp_path / "built"
    built.mkdir()
    shapes = phase_shapes(EXAMPLE, LatencyOptions(prefill=16, past=16))
    target.build(EXAMPLE, built, shapes)
    alive, most, created_count = [], [0], [0]
    real = ort.InferenceSession

    def counted(*args, **kwargs):
        gc.collect()
        alive[:] = [ref for ref in alive if ref() is not None]
        created = real(*args, **kwargs)
        alive.append(weakref.ref(created))
        created_count[0] += 1
        most[0] = max(most[0], len(alive))
        return created

    monkeypatch.setattr(ort, "InferenceSession", counted)
    check = check_artifact(target, built, EXAMPLE, shapes, None, 0)
    assert check["passed"] and len(check["cases"]) == len(shapes) == 2
    assert created_count[0] == 1 + len(shapes)  # the reference, then the artifact per shape
    assert most[0] == 1
