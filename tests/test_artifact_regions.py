"""The ORT artifact of a model verified region by region is checked region by region too.

``model.optimized.onnx`` (ONNX Runtime's ``ORT_ENABLE_ALL`` graph, saved) against ``model.onnx``:
nodes the optimiser left identical are skipped, every group it fused or rewrote runs on seeded
activations against the nodes of ``model.onnx`` computing the same values. The check must fail
on a corrupted artifact, name the region, and fall back to the whole check (saying why) where an
artifact offers no ONNX model to split.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import onnx
from onnx import numpy_helper

from zflora_compile.cli import main
from zflora_compile.targets import ort as ort_target
from zflora_compile.targets.check import check_artifact
from zflora_compile.targets.ort import OPTIMIZED_NAME, OrtTarget

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_llama_lora.onnx"
SCHEMA = json.loads(resources.files("zflora_compile").joinpath("report_schema.json").read_text())


def _compile(capsys, out: Path, *flags) -> tuple[int, dict]:
    code = main([str(EXAMPLE), "-o", str(out), "--json", *flags])
    return code, json.loads(capsys.readouterr().out)


def test_the_ort_artifact_is_checked_region_by_region_with_regional_verification(capsys, tmp_path):
    code, report = _compile(capsys, tmp_path / "out", "--verify", "regions")
    assert code == 0, report.get("message")
    jsonschema.validate(report, SCHEMA)
    check = report["target"]["check"]
    assert check["mode"] == "regions" and check["passed"] and check["mode_reason"] == "--verify regions"
    assert check["regions"] and all(r["passed"] for r in check["regions"]) and check["region_cases"]
    assert check["atol"] == check["rtol"] == 1e-4  # the tolerance of the values compared: fp32 here
    artifact = onnx.load(str(tmp_path / "out" / OPTIMIZED_NAME))
    fused = {n.name for n in artifact.graph.node if n.op_type not in {m.op_type for m in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.node}}
    assert fused, "ONNX Runtime fused nothing: the check below would prove nothing"
    checked = {name for region in check["regions"] for name in region["changed_nodes"]}
    assert fused <= checked  # every node the optimiser introduced was run against model.onnx


def test_full_verification_checks_the_artifact_whole(capsys, tmp_path):
    code, report = _compile(capsys, tmp_path / "out", "--verify", "full")
    check = report["target"]["check"]
    assert code == 0 and check["mode"] == "full" and check["cases"] and "regions" not in check


def test_a_corrupted_artifact_fails_in_the_region_that_reads_the_weight(capsys, tmp_path, monkeypatch):
    real_build = OrtTarget.build
    hit = {}

    def build(self, model_path, out_dir, shapes):
        section = real_build(self, model_path, out_dir, shapes)
        path = out_dir / OPTIMIZED_NAME
        model = onnx.load(str(path))
        floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2]
        tensor = max(floats, key=lambda t: int(np.prod(t.dims)))
        array = numpy_helper.to_array(tensor)
        tensor.CopyFrom(numpy_helper.from_array((array * 1.01 + 0.01).astype(array.dtype), tensor.name))
        hit["readers"] = {n.name for n in model.graph.node if tensor.name in n.input}
        onnx.save(model, str(path))
        return section

    monkeypatch.setattr(OrtTarget, "build", build)
    code, report = _compile(capsys, tmp_path / "out", "--verify", "regions")
    assert code == 1 and report["status"] == "verification_failed" and not (tmp_path / "out").exists()
    check = report["target"]["check"]
    assert check["mode"] == "regions" and not check["passed"]
    assert report["message"].startswith("the ort artifact does not match model.onnx: region "), report["message"]
    failed = [r for r in check["regions"] if not r["passed"]]
    assert failed and hit["readers"] & {n for r in failed for n in r["changed_nodes"]}, (hit, failed)


class _NoOnnxArtifact(OrtTarget):
    """The ORT target as one whose artifact is no ONNX model (a TensorRT plan, a QNN context)."""

    def regional_artifact(self, out_dir):
        return None


def test_an_artifact_without_an_onnx_model_is_checked_whole_and_says_why(tmp_path):
    from zflora_compile.targets.base import Shape
    from zflora_compile.verify import token_vocab
    from zflora_compile.model_io import load_model

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(EXAMPLE.read_bytes())
    target = _NoOnnxArtifact()
    shapes = [Shape("decode", 1, 4)]
    target.build(out / "model.onnx", out, shapes)
    check = check_artifact(target, out, out / "model.onnx", shapes, token_vocab(load_model(EXAMPLE)), 0, mode="regions", mode_reason="--verify regions")
    assert check["passed"] and check["mode"] == "full" and check["cases"]
    assert check["mode_reason"] == "--verify regions; target ort's artifact is no ONNX model ONNX Runtime CPU runs as the target does: checked whole instead"
    assert ort_target.OPTIMIZED_NAME in {p.name for p in out.iterdir()}


def test_a_region_as_large_as_the_model_is_checked_whole(capsys, tmp_path, monkeypatch):
    from zflora_compile.targets import check

    monkeypatch.setattr(check, "MAX_REGION_SHARE", 0.0)  # every region is too large
    code, report = _compile(capsys, tmp_path / "out", "--verify", "regions")
    check_section = report["target"]["check"]
    assert code == 0 and check_section["mode"] == "full" and check_section["cases"]
    assert "of the weights" in check_section["mode_reason"] and "as large as the model): checked whole instead" in check_section["mode_reason"]


def test_half_precision_tolerance_follows_the_weights_bytes_not_one_constant():
    """Values of a model whose float weights are mostly 16-bit are judged at that tolerance (ORT
    may compute in fp32 what model.onnx rounds); one fp16 constant in an fp32 model changes nothing
    (a 0.3% error in a weight would otherwise pass at 1e-2)."""
    import onnx_ir as ir

    from zflora_compile.targets.check import _half_precision_tolerance
    from zflora_compile.verify import TOLERANCES

    def model(arrays):
        graph = ir.Graph([], [], nodes=[], initializers=[ir.Value(name=n, const_value=ir.tensor(a, name=n)) for n, a in arrays.items()])
        return ir.Model(graph, ir_version=9)

    fp32 = {"w": np.zeros((64, 64), np.float32)}
    assert _half_precision_tolerance(model(fp32)) == (None, None)
    assert _half_precision_tolerance(model({**fp32, "c": np.zeros(1, np.float16)})) == (None, None)
    assert _half_precision_tolerance(model({"w": np.zeros((64, 64), np.float16), "n": np.zeros(64, np.float32)})) == TOLERANCES["float16"]
