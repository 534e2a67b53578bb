"""Targets: QNN (HTP emulator) artifacts compiled, reloaded and compared; the static-shape
preparation rules; TensorRT's missing-dependency path (its engine tests skip without it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from zflora_compile.cli import main
from zflora_compile.errors import DependencyError, TargetError
from zflora_compile.targets.prepare_static import constants_last, gather_nd_identity, prepare_static
from zflora_compile.targets import QnnOptions, Shape, TrtOptions, get_target
from zflora_compile.targets.qnn import QnnTarget
from zflora_compile.targets.trt import TrtTarget
from zflora_compile.verify import input_specs, make_feeds, session, symbol_values

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_llama_lora.onnx"
needs_qnn = pytest.mark.skipif(QnnTarget.missing_dependency() is not None, reason=f"QNN target unavailable: {QnnTarget.missing_dependency()}")
TRT_MISSING = TrtTarget.missing_dependency()


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def save(graph, path: Path, opset: int = 17) -> Path:
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    return path


def ort_run(path, feeds):
    return session(path).run(None, feeds)


# ---------------------------------------------------------------- static-shape preparation


def test_gather_nd_identity_becomes_reshape_and_stays_exact(tmp_path):
    grid = np.stack(np.meshgrid(np.arange(1), np.arange(5), indexing="ij"), -1).reshape(1, 1, 1, 5, 2).astype(np.int64)
    graph = helper.make_graph(
        [helper.make_node("GatherND", ["mask", "idx"], ["y"], name="gather_mask")],
        "g",
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 1, 5])],
        [helper.make_tensor("idx", TensorProto.INT64, grid.shape, grid.ravel())],
    )
    path = save(graph, tmp_path / "g.onnx")
    model = ir.load(path)
    assert gather_nd_identity(model) == 1
    assert [n.op_type for n in model.graph] == ["Reshape"]
    ir.save(model, tmp_path / "r.onnx")
    feeds = {"mask": np.random.default_rng(0).standard_normal((1, 5)).astype(np.float32)}
    np.testing.assert_array_equal(ort_run(path, feeds)[0], ort_run(tmp_path / "r.onnx", feeds)[0])


def test_gather_nd_with_permuted_indices_is_left_alone(tmp_path):
    index = np.array([[0, 1], [0, 0], [0, 2]], dtype=np.int64)
    graph = helper.make_graph(
        [helper.make_node("GatherND", ["mask", "idx"], ["y"], name="gather_perm")],
        "g",
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        [helper.make_tensor("idx", TensorProto.INT64, index.shape, index.ravel())],
    )
    model = ir.load(save(graph, tmp_path / "g.onnx"))
    assert gather_nd_identity(model) == 0
    assert [n.op_type for n in model.graph] == ["GatherND"]


def test_constants_last_swaps_only_constant_first_operands(tmp_path):
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["w", "x"], ["a"], name="const_first"),
            helper.make_node("Add", ["a", "w"], ["b"], name="const_second"),
            helper.make_node("Sub", ["w", "b"], ["y"], name="not_commutative"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor("w", TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])],
    )
    path = save(graph, tmp_path / "g.onnx")
    model = ir.load(path)
    assert constants_last(model) == 1
    assert constants_last(model) == 0  # idempotent
    nodes = {n.name: n for n in model.graph}
    assert nodes["const_first"].inputs[0].name == "x" and nodes["not_commutative"].inputs[0].name == "w"
    ir.save(model, tmp_path / "s.onnx")
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)}
    np.testing.assert_array_equal(ort_run(path, feeds)[0], ort_run(tmp_path / "s.onnx", feeds)[0])


def test_prepare_static_on_the_example_is_exact(tmp_path):
    specs = input_specs(EXAMPLE)
    model = ir.load(EXAMPLE)
    fired = prepare_static(model, symbol_values(specs, seq=3, past=5))
    assert fired == {"gather_nd_identity": 1, "constants_last": 5}
    assert all(isinstance(d, int) for v in model.graph.inputs for d in v.shape)
    assert "GatherND" not in {n.op_type for n in model.graph.all_nodes()}
    ir.save(model, tmp_path / "static.onnx")
    feeds = make_feeds(specs, 128, seq=3, past=5, seed=3)
    for expected, got in zip(ort_run(EXAMPLE, feeds), ort_run(tmp_path / "static.onnx", feeds)):
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- QNN (HTP emulator)


@needs_qnn
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_qnn_context_binary_compiles_loads_and_matches_the_fused_model(capsys, tmp_path, precision):
    out_dir = tmp_path / f"qnn_{precision}"
    code, out, err = run(capsys, EXAMPLE, "-o", out_dir, "--target", "qnn", "--precision", precision, "--prefill", "12", "--past", "8", "--json")
    assert code == 0, err
    report = json.loads(out)
    target = report["target"]
    assert target["precision"] == precision and target["cpu_fallback"] == "disabled"
    assert target["artifacts"] == ["model_decode_ctx.onnx", "model_decode_ctx_qnn.bin", "model_prefill_ctx.onnx", "model_prefill_ctx_qnn.bin"]
    assert set(target["artifacts"]) <= {p.name for p in out_dir.iterdir()}
    assert target["check"]["passed"] and target["check"]["max_abs_diff"] < 2e-2
    # the context model is an EPContext wrapper around the binary, not the ONNX graph again
    ctx = onnx.load(str(out_dir / "model_decode_ctx.onnx"), load_external_data=False)
    assert {n.op_type for n in ctx.graph.node} == {"EPContext"}
    # reload the artifact independently and compare to the fused ONNX model on CPU
    qnn = QnnTarget(QnnOptions(precision=precision))
    for shape in (Shape("decode", 1, 8), Shape("prefill", 12, 0)):
        loaded = qnn.load(out_dir, out_dir / "model.onnx", shape)
        feeds = make_feeds(input_specs(out_dir / "model.onnx"), 128, seq=shape.seq, past=shape.past, seed=7)
        expected = ort_run(out_dir / "model.onnx", feeds)[0]
        got = dict(zip(loaded.output_names, loaded.run(feeds)))["logits"]
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=2e-2, rtol=2e-2)


@needs_qnn
def test_qnn_names_the_nodes_that_cannot_run_on_htp(capsys, tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu0"), helper.make_node("Det", ["r"], ["y"], name="det_on_cpu_only")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    path = save(graph, tmp_path / "det.onnx")
    code, _, err = run(capsys, path, "-o", tmp_path / "out", "--target", "qnn")
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert "det_on_cpu_only (Det" in line and "CPU fallback is disabled" in line
    assert not (tmp_path / "out").exists()


@needs_qnn
def test_qnn_latency_gate_runs_on_the_emulator(capsys, tmp_path):
    code, out, err = run(capsys, EXAMPLE, "-o", tmp_path / "out", "--target", "qnn", "--check-latency", "--max-overhead", "-100",
                         "--phases", "decode", "--past", "8", "--rounds", "3", "--warmup", "1", "--json")
    assert code == 1, err
    latency = json.loads(out)["latency"]
    assert latency["emulated"] is True and latency["target"] == "qnn"
    assert latency["phases"]["decode"]["runs_on"].startswith("QNN HTP context binary")


def test_qnn_rejects_bf16_before_the_compile_starts(capsys, tmp_path):
    with pytest.raises(TargetError, match="fp16 or fp32"):
        QnnOptions(precision="bf16")
    code, _, err = run(capsys, EXAMPLE, "-o", tmp_path / "out", "--target", "qnn", "--precision", "bf16", "--report", tmp_path / "r.json")
    assert code == 2 and "target 'qnn' supports --precision fp16 or fp32, not bf16" in err
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "error" and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- TensorRT


@pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT is installed here: the missing-dependency path cannot be exercised")
def test_trt_missing_exits_2_with_install_hint_and_writes_nothing(capsys, tmp_path):
    code, out, err = run(capsys, EXAMPLE, "-o", tmp_path / "out", "--target", "trt")
    assert code == 2 and out == ""
    line = err.strip()
    assert len(line.splitlines()) == 1
    assert line.startswith("zcompile: error: target 'trt' is not available:") and "pip install" in line
    assert not (tmp_path / "out").exists()
    with pytest.raises(DependencyError, match="tensorrt"):
        get_target("trt")


def test_trt_profile_covers_the_sequence_and_cache_ranges():
    target = TrtTarget(TrtOptions(seq_range=(1, 64, 256), past_range=(0, 32, 512)))
    profile = target.profile_shapes(EXAMPLE)
    assert profile["input_ids"] == ((1, 1), (1, 64), (1, 256))
    assert profile["attention_mask"] == ((1, 1), (1, 96), (1, 768))
    assert profile["past_key_values.0.key"] == ((1, 2, 0, 32), (1, 2, 32, 32), (1, 2, 512, 32))


@pytest.mark.skipif(TRT_MISSING is not None, reason=f"TensorRT target unavailable here: {TRT_MISSING}")
def test_trt_engine_builds_and_matches_the_fused_model(capsys, tmp_path):
    code, out, err = run(capsys, EXAMPLE, "-o", tmp_path / "out", "--target", "trt", "--trt-seq", "1,16,32", "--trt-past", "0,16,32",
                         "--prefill", "16", "--past", "16", "--check-latency", "--max-overhead", "100000", "--rounds", "5", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["target"]["artifacts"] == ["model.plan"] and report["target"]["check"]["passed"]
    assert report["latency"]["phases"]["decode"]["timer"] == "device (CUDA events)"


def test_unknown_precision_for_ort_is_a_clear_error(capsys, tmp_path):
    code, _, err = run(capsys, EXAMPLE, "-o", tmp_path / "out", "--precision", "fp16")
    assert code == 2 and "target 'ort' runs the model in its own precision" in err
    assert not (tmp_path / "out").exists()

