"""zcompile / model_io on a saved ExportedProgram (``.pt2``) and on a model directory."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from zflora_compile import cli, zoo  # noqa: E402
from zflora_compile.api import detect_adapters, fuse_adapters  # noqa: E402
from zflora_compile.errors import InputError  # noqa: E402
from zflora_compile.model_io import load_model, resolve_model_path  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny PEFT Qwen2 saved as .pt2 (torch.export.save) and as <dir>/model.onnx."""
    root = tmp_path_factory.mktemp("fx_cli")
    model = zoo.build_lora_model("qwen2")
    program = zoo.export_program(model)
    pt2 = root / "peft.pt2"
    torch.export.save(program, str(pt2))
    onnx_path = zoo.export_onnx(model, root / "model_dir" / "model.onnx")
    return {"root": root, "pt2": pt2, "dir": onnx_path.parent, "program": program}


def _inspect(capsys, path) -> dict:
    capsys.readouterr()
    assert cli.main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_reads_pt2_and_model_directory(saved, capsys):
    from_pt2 = _inspect(capsys, saved["pt2"])
    from_dir = _inspect(capsys, saved["dir"])
    for result in (from_pt2, from_dir):
        assert len(result["sites"]) == 14 and not result["rejected"]
        assert sum(s["bias"] for s in result["sites"]) == 6  # q/k/v of two Qwen2 layers
    # the ONNX export of the program finds what the FX front-end finds in the program itself
    fx_sites = detect_adapters(saved["program"]).sites
    assert sorted((s.rank, s.in_features, s.out_features) for s in fx_sites) == sorted((s["rank"], s["in_features"], s["out_features"]) for s in from_pt2["sites"])


def test_compile_pt2_writes_fused_onnx(saved, capsys):
    out = saved["root"] / "pt2_fused"
    capsys.readouterr()
    assert cli.main([str(saved["pt2"]), "-o", str(out), "--json", "--no-verify"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "ok" and len(report["sites"]) == 14
    assert report["output"]["gemm_count"] == report["input"]["gemm_count"] - 3 * 14 + 2 * 8
    # the written model computes what the FX-fused program computes
    onnxruntime = pytest.importorskip("onnxruntime")
    ids = np.random.default_rng(0).integers(0, 128, size=(1, 9)).astype(np.int64)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    with torch.no_grad():
        want = fuse_adapters(saved["program"]).module()(torch.from_numpy(ids), torch.ones(1, 9, dtype=torch.int64))
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("source", ["pt2", "dir"])
def test_compile_pt2_and_model_directory_with_verification(saved, capsys, source):
    out = saved["root"] / f"verified_{source}"
    capsys.readouterr()
    assert cli.main([str(saved[source]), "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verification"]["passed"] is True and report["verification"]["reference"] == "the input model"
    assert report["target"]["check"]["passed"] and report["input"]["sha256"]


def test_model_io_resolves_directories_and_pt2(saved, tmp_path):
    assert resolve_model_path(saved["dir"]) == saved["dir"] / "model.onnx"
    assert resolve_model_path(saved["pt2"]) == saved["pt2"]
    assert len(load_model(saved["dir"]).graph.initializers) > 0
    assert len(load_model(saved["pt2"]).graph.initializers) > 0  # exported in memory, temp files gone
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no .onnx file"):
        load_model(empty)
    (tmp_path / "bad.pt2").write_bytes(b"not a zip archive")
    with pytest.raises(InputError, match="not a readable torch.export program"):
        load_model(tmp_path / "bad.pt2")
