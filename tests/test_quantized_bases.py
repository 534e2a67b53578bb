"""LoRA on quantized base projections: ONNX Runtime's MatMulNBitsQuantizer (MatMulNBits, or its QDQ
form DequantizeLinear -> MatMul) applied to a small float LoRA model, and onnxruntime-genai's ``-p int4``
build. fuse packs the base q/k/v (and the A's) into one MatMulNBits / DequantizeLinear along N: the
GEMM count drops and the outputs are equal in ONNX Runtime (atol 1e-5 stated; measured bit-exact, 0.0,
on this CPU: each output column uses only its own packed rows). merge refuses (re-quantization), strip
gives the quantized base model."""

from __future__ import annotations

import collections
import copy
import logging
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from zflora_compile.api import detect_adapters
from zflora_compile.errors import PlanError, UnrecognizedAdapterError
from zflora_compile.options import CompileOptions
from zflora_compile.pipeline import compile_model

quantization = pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")
from onnxruntime.quantization import QuantFormat  # noqa: E402

D, RANK, OUTS = 64, 8, {"q": 64, "k": 32, "v": 32}
ATOL = 1e-5
GENAI_INT4 = Path(__file__).parent / "fixtures" / "exporters" / "genai_llama_lora_int4" / "model.onnx"


def lora_model(*, lora=True, relu_between=False, seed=0) -> onnx.ModelProto:
    """q/k/v of x: ``x @ W + (x @ A) @ B`` (GenAI's layout: the scale folded into B, no Mul)."""
    rng = np.random.default_rng(seed)
    nodes, inits, outputs = [], [], []
    for n, out in OUTS.items():
        stem = f"/model/layers.0/attn/{n}_proj"
        W = (rng.standard_normal((D, out)) * 0.2).astype(np.float32)
        A = (rng.standard_normal((D, RANK)) * 0.2).astype(np.float32)
        B = (rng.standard_normal((RANK, out)) * 0.2).astype(np.float32)
        inits.append(numpy_helper.from_array(W, f"{n}.weight"))
        if not lora:
            nodes.append(helper.make_node("MatMul", ["x", f"{n}.weight"], [f"{n}_out"], name=f"{stem}/MatMul"))
        else:
            inits += [numpy_helper.from_array(A, f"{n}.lora_A"), numpy_helper.from_array(B, f"{n}.lora_B")]
            lanes = f"{n}_z"
            nodes += [
                helper.make_node("MatMul", ["x", f"{n}.weight"], [f"{n}_base"], name=f"{stem}/MatMul"),
                helper.make_node("MatMul", ["x", f"{n}.lora_A"], [lanes], name=f"{stem}/lora_A/MatMul"),
            ]
            if relu_between and n == "k":
                nodes.append(helper.make_node("Relu", [lanes], [f"{n}_r"], name=f"{stem}/lora/Relu"))
                lanes = f"{n}_r"
            nodes += [
                helper.make_node("MatMul", [lanes, f"{n}.lora_B"], [f"{n}_u"], name=f"{stem}/lora_B/MatMul"),
                helper.make_node("Add", [f"{n}_base", f"{n}_u"], [f"{n}_out"], name=f"{stem}/lora/Add"),
            ]
        outputs.append(helper.make_tensor_value_info(f"{n}_out", TensorProto.FLOAT, ["b", "s", out]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", D])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def quantize(model, *, exclude=(), fmt=QuantFormat.QOperator, accuracy_level=4) -> onnx.ModelProto:
    config = quantization.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=False, accuracy_level=accuracy_level, quant_format=fmt)
    quantizer = quantization.MatMulNBitsQuantizer(copy.deepcopy(model), algo_config=config, nodes_to_exclude=list(exclude))
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        quantizer.process()
    finally:
        logging.disable(previous)
    return quantizer.model.model


def _session(proto):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _outputs(proto, seed=3, seq=7):
    x = np.random.default_rng(seed).standard_normal((2, seq, D)).astype(np.float32)
    return _session(proto).run(None, {"x": x})


def _compile(proto, strategy):
    model, report = compile_model(ir.from_proto(proto), CompileOptions(strategy=strategy, verify=False))
    return ir.to_proto(model), report.to_json()


def _ops(proto) -> collections.Counter:
    return collections.Counter(n.op_type for n in proto.graph.node)


def _gemms(proto) -> int:
    ops = _ops(proto)
    return ops["MatMul"] + ops["MatMulNBits"]


LORA_NODES = [f"/model/layers.0/attn/{n}_proj/lora_{ab}/MatMul" for n in OUTS for ab in "AB"]

CASES = {
    # name: (quantize kwargs, GEMMs after fuse, what the plan does)
    "all_nbits": (dict(), 4, ("packed", "with base", "per site")),  # [Wq|Wk|Wv|Aq|Ak|Av] + 3 B's
    "all_nbits_accuracy0": (dict(accuracy_level=0), 4, ("packed", "with base", "per site")),
    "base_nbits_float_lora": (dict(exclude=LORA_NODES), 3, ("packed", "constant", "constant")),  # packed W, x@[A], z@blockdiag
    "qdq": (dict(fmt=QuantFormat.QDQ), 4, ("packed dequantized", "with base", "per site")),
}


@pytest.mark.parametrize("case", CASES)
def test_fuse_packs_and_is_exact(case):
    kwargs, gemms_after, modes = CASES[case]
    quantized = quantize(lora_model(), **kwargs)
    detection = detect_adapters(quantized)
    sites = [s.to_json() for s in detection]
    assert len(sites) == 3 and detection.unrecognized == [] and detection.rejections == []
    assert {s["base"] for s in sites} == {"QDQ" if case == "qdq" else "MatMulNBits"} and not any(s["switchable"] for s in sites)
    fused, report = _compile(quantized, "fuse")
    assert _gemms(quantized) == 9 and _gemms(fused) == gemms_after
    (group,) = report["plan"]["fused_groups"]
    assert (group["runtime"]["base"], group["runtime"]["A"], group["runtime"]["B"]) == modes
    for seq in (1, 7):
        for want, got in zip(_outputs(quantized, seq=seq), _outputs(fused, seq=seq)):
            np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_unpackable_bases_are_kept():
    """q's MatMulNBits has another accuracy_level: the bases cannot be packed (left as they are);
    only the adapter GEMMs fuse (the A's, packable among themselves, and the B's per site)."""
    quantized = quantize(lora_model())
    node = next(n for n in quantized.graph.node if n.name.startswith("/model/layers.0/attn/q_proj/MatMul"))
    for attr in node.attribute:
        if attr.name == "accuracy_level":
            attr.i = 0
    fused, report = _compile(quantized, "fuse")
    (group,) = report["plan"]["fused_groups"]
    assert group["runtime"]["base"] == "kept" and group["runtime"]["A"] == "packed"
    assert _gemms(fused) == 3 + 1 + 3
    for want, got in zip(_outputs(quantized), _outputs(fused)):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_strip_is_the_quantized_base_and_merge_refuses():
    quantized = quantize(lora_model())
    stripped, report = _compile(quantized, "strip")
    assert report["plan"]["stripped_sites"] == ["lora_rt0", "lora_rt1", "lora_rt2"] and _gemms(stripped) == 3
    base = quantize(lora_model(lora=False))  # the same weights, quantized the same way, no adapter
    for want, got in zip(_outputs(base), _outputs(stripped)):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert max(float(np.abs(a - b).max()) for a, b in zip(_outputs(quantized), _outputs(base))) > 0.1  # the adapter mattered
    with pytest.raises(PlanError, match=r"MatMulNBits.*re-quantized") as caught:  # exit 2, nothing written
        _compile(quantized, "merge")
    assert caught.value.exit_code == 2


def test_nonlinear_chain_on_quantized_base_is_reported():
    """A Relu between A and B (all MatMulNBits): no site there, reported unrecognised; strip refuses."""
    quantized = quantize(lora_model(relu_between=True))
    detection = detect_adapters(quantized)
    assert len(detection.sites) == 2
    assert len(detection.unrecognized) == 1 and "k_proj" in detection.unrecognized[0].node
    assert "quantized projection" in detection.unrecognized[0].reason
    fused, _ = _compile(quantized, "fuse")
    assert any(n.op_type == "Relu" for n in fused.graph.node)
    for want, got in zip(_outputs(quantized), _outputs(fused)):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    with pytest.raises(UnrecognizedAdapterError):
        _compile(quantized, "strip")


@pytest.mark.skipif(not GENAI_INT4.exists(), reason="no onnxruntime-genai int4 fixture")
def test_genai_int4_fixture():
    """onnxruntime-genai -p int4 with a LoRA: 14 sites (A and B are MatMulNBits too); fuse packs
    q/k/v and gate/up with their A's: 43 -> 23 MatMulNBits, logits equal (atol 1e-5; measured 0.0)."""
    original = onnx.load(str(GENAI_INT4))
    fused, report = _compile(original, "fuse")
    sites = report["sites"]
    assert len(sites) == 14 and all(s["base"] == "MatMulNBits" and s["quantization"]["bits"] == 4 for s in sites)
    assert report["unrecognized"] == []
    assert _ops(original)["MatMulNBits"] == 43 and _ops(fused)["MatMulNBits"] == 23
    feeds = {"input_ids": np.array([[1, 17, 42, 99, 7, 23, 150, 64]], np.int64), "attention_mask": np.ones((1, 8), np.int64)}
    s0, s1 = _session(original), _session(fused)
    for info in s0.get_inputs():
        if info.name.startswith("past_key_values"):
            feeds[info.name] = np.zeros((1, 2, 0, 16), np.float32)
    want, got = s0.run(None, feeds), s1.run(None, feeds)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, atol=ATOL, rtol=0)
    stripped, report = _compile(original, "strip")
    assert _ops(stripped)["MatMulNBits"] == 15 and len(report["plan"]["stripped_sites"]) == 14


def test_a_quantized_A_with_g_idx_is_not_packed():
    """Found by review: fuse packed a MatMulNBits A that carries ``g_idx`` (act-order) and dropped
    the ``g_idx`` operand (max diff 10). Such an A is left as it is; the output stays exact."""
    rng = np.random.default_rng(1)
    k, n, r, block = 32, 32, 4, 16
    blocks = k // block
    inits = [
        numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.integers(0, 256, (r, blocks, block // 2), dtype=np.uint8), "A.B"),
        numpy_helper.from_array((rng.random(r * blocks) * 0.1 + 0.01).astype(np.float32), "A.scales"),
        numpy_helper.from_array(rng.integers(0, 256, (r * ((blocks * 4 + 7) // 8),), dtype=np.uint8), "A.zp"),
        numpy_helper.from_array(rng.permutation(np.repeat(np.arange(blocks, dtype=np.int32), block)), "A.gidx"),
        numpy_helper.from_array(rng.standard_normal((r, n)).astype(np.float32), "Bw"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["base"], name="base"),
        helper.make_node("MatMulNBits", ["x", "A.B", "A.scales", "A.zp", "A.gidx"], ["za"], domain="com.microsoft", name="A", K=k, N=r, bits=4, block_size=block),
        helper.make_node("MatMul", ["za", "Bw"], ["zb"], name="bmm"),
        helper.make_node("Add", ["base", "zb"], ["y"], name="add"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    fused, _ = _compile(model, "fuse")
    assert any(list(node.input)[-1] == "A.gidx" for node in fused.graph.node if node.op_type == "MatMulNBits")
    x = {"x": rng.standard_normal((3, k)).astype(np.float32)}
    for want, got in zip(_session(model).run(None, x), _session(fused).run(None, x)):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
