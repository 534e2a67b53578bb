"""zcompile end to end on the shipped example: exit codes, reports, no partial output.

Needs no torch: it uses ``examples/tiny_llama_lora.onnx`` (a dynamo export with a KV cache).
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import jsonschema
import onnx
import pytest

from zflora_compile import fuse_adapters
from zflora_compile.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_llama_lora.onnx"
SCHEMA = json.loads(resources.files("zflora_compile").joinpath("report_schema.json").read_text())


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_inspect_lists_sites(capsys):
    code, out, _ = run(capsys, "inspect", EXAMPLE, "--json")
    assert code == 0
    listing = json.loads(out)
    assert len(listing["sites"]) == 14 and listing["rejected"] == []
    assert {(s["layer"], s["projection"]) for s in listing["sites"]} >= {(0, "q_proj"), (1, "down_proj")}
    code, out, _ = run(capsys, "inspect", EXAMPLE)
    assert code == 0 and "14 adapter site(s)" in out and "gate_proj" in out


@pytest.mark.parametrize("strategy", ["fuse", "merge", "strip"])
def test_compile_writes_model_and_valid_report(capsys, tmp_path, strategy):
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, EXAMPLE, "-o", out_dir, "--strategy", strategy, "--json")
    assert code == 0, err
    report = json.loads(out)
    jsonschema.validate(report, SCHEMA)
    assert report == json.loads((out_dir / "report.json").read_text())
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.onnx", "model.optimized.onnx", "report.json"]
    assert report["target"]["check"]["passed"] and report["target"]["artifacts"] == ["model.optimized.onnx"]
    onnx.checker.check_model(str(out_dir / "model.onnx"), full_check=True)
    assert report["status"] == "ok" and report["verification"]["passed"] is True
    cases = report["verification"]["cases"]
    assert [c["case"] for c in cases] == ["seq=1,past=4", "seq=5,past=4", "seq=8,past=0"]
    assert all("skipped" not in c and c["outputs"]["logits"]["passed"] for c in cases)
    assert report["output"]["gemm_count"] == (21 if strategy == "fuse" else 19)


def test_human_output(capsys, tmp_path):
    code, out, _ = run(capsys, "compile", EXAMPLE, "-o", tmp_path / "o")
    assert code == 0
    assert "verified: max abs diff" in out and "GEMMs 47 -> 21" in out


def test_no_adapter_sites_is_success_and_writes_model(capsys, tmp_path):
    base = fuse_adapters(EXAMPLE, "strip", output_dir=tmp_path / "base")
    code, out, _ = run(capsys, base, "-o", tmp_path / "again", "--json")
    report = json.loads(out)
    assert code == 0 and report["sites"] == [] and report["message"].startswith("no adapter sites found")
    assert (tmp_path / "again" / "model.onnx").exists()
    assert report["output"]["op_counts"] == report["input"]["op_counts"]


def assert_exit(capsys, tmp_path, argv, code, *fragments):
    out_dir = tmp_path / "never"
    got, _, err = run(capsys, *argv, "-o", out_dir)
    assert got == code
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("zcompile: error: "), err
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in err
    assert not out_dir.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_missing_file(capsys, tmp_path):
    assert_exit(capsys, tmp_path, [tmp_path / "nope.onnx"], 2, "nope.onnx", "no such file")


def test_not_onnx(capsys, tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("these are not the weights you are looking for\n" * 20)
    assert_exit(capsys, tmp_path, [bad], 2, "notes.onnx", "not")


def test_empty_file(capsys, tmp_path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert_exit(capsys, tmp_path, [empty], 2, "empty.onnx", "empty")


def test_truncated_protobuf(capsys, tmp_path):
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(EXAMPLE.read_bytes()[: EXAMPLE.stat().st_size // 3])
    assert_exit(capsys, tmp_path, [cut], 2, "cut.onnx")


def test_missing_external_data(capsys, tmp_path):
    model = onnx.load(str(EXAMPLE))
    onnx.save(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.onnx.data")
    (tmp_path / "ext.onnx.data").unlink()
    assert_exit(capsys, tmp_path, [tmp_path / "ext.onnx"], 2, "ext.onnx.data", "missing")


def test_truncated_external_data(capsys, tmp_path):
    model = onnx.load(str(EXAMPLE))
    onnx.save(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.onnx.data")
    data = tmp_path / "ext.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    assert_exit(capsys, tmp_path, [tmp_path / "ext.onnx"], 2, "too short")


def test_unsupported_opset(capsys, tmp_path):
    model = onnx.load(str(EXAMPLE))
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 9
    onnx.save(model, str(tmp_path / "old.onnx"))
    assert_exit(capsys, tmp_path, [tmp_path / "old.onnx"], 2, "unsupported opset 9")


def test_directory_as_model(capsys, tmp_path):
    assert_exit(capsys, tmp_path, [tmp_path], 2, "directory")


def test_existing_output_dir_needs_force(capsys, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("x")
    code, _, err = run(capsys, EXAMPLE, "-o", out_dir)
    assert code == 2 and "--force" in err and (out_dir / "keep.txt").exists()
    code, _, err = run(capsys, EXAMPLE, "-o", out_dir, "--force")
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.onnx", "model.optimized.onnx", "report.json"]


@pytest.mark.parametrize("verify_mode", ["full", "regions"])
def test_verification_failure_exits_1_and_writes_nothing(capsys, tmp_path, monkeypatch, verify_mode):
    from zflora_compile.families import lora

    monkeypatch.setattr(lora, "scaled_b_fp32", lambda site: site.lora_b().astype("float32") * 1.5 * site.scale)
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, EXAMPLE, "-o", out_dir, "--json", "--verify", verify_mode)
    assert code == 1
    assert "verification failed" in err and "max abs diff" in err
    report = json.loads(out)
    jsonschema.validate(report, SCHEMA)
    assert report["status"] == "verification_failed" and report["exit_code"] == 1
    assert report["verification"]["passed"] is False and report["verification"]["mode"] == verify_mode
    if verify_mode == "regions":  # the message names the region and its rewritten nodes
        assert "verification failed in region " in err and "rewritten node(s)" in err
    assert not out_dir.exists() and list(tmp_path.iterdir()) == []


def test_no_verify_is_reported(capsys, tmp_path):
    code, out, _ = run(capsys, EXAMPLE, "-o", tmp_path / "o", "--no-verify", "--json")
    report = json.loads(out)
    assert code == 0 and report["verification"] == {"passed": None, "skipped": "--no-verify"}


def test_example_model_is_a_single_small_file():
    assert EXAMPLE.stat().st_size < 5_000_000
    model = onnx.load(str(EXAMPLE), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert shutil.which("zcompile") is not None


def test_export_is_a_zcompile_subcommand(capsys, tmp_path):
    """`zcompile export ...` runs the export CLI (docs/serving.md): listed in the main help, its
    own errors (one line, exit 2, nothing written)."""
    from zflora_compile.cli import build_parser, main

    assert "export" in build_parser().format_help()
    code = main(["export", "peft", str(tmp_path / "missing"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("zcompile export: error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
