"""examples/train_tiny.py: a few training steps per family lower the loss; adapter and ONNX written."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

pytest.importorskip("torch")
pytest.importorskip("safetensors")

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_tiny.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_tiny", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family", ["ffba", "zflora"])  # ffba runs the FFA and the FBA code paths
def test_train_tiny_example(family, tmp_path, capsys):
    example = load_example()
    (result,) = example.main(["--family", family, "--steps", "30", "--batch", "8", "--seq", "16", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert result["last_loss"] < 0.7 * result["first_loss"], result["losses"]
    assert result["reload_diff"] == 0.0
    assert result["onnx"].is_file() and result["onnx"] == tmp_path / family / "model.onnx"
    meta = json.loads((tmp_path / family / "adapter" / "adapter_config.json").read_text())
    assert meta["family"] == family
    assert "step    1  loss" in out and "-> " in out
    # the trained adapter compiles: fused with zero extra GEMMs, verified before it was written
    assert result["compile_exit"] == 0 and result["sites"] > 0
    report = result["report"]
    assert report["verification"]["passed"] is True and (tmp_path / family / "fused" / "model.onnx").is_file()
    assert report["output"]["gemm_count"] < report["input"]["gemm_count"]
    assert {s["family"] for s in report["sites"]} <= {family, "ffa", "fba", "ffba"}
    assert "verified against the unfused export: True" in out
