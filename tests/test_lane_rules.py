"""Hand-built lane graphs for the corner cases of the FFA/FBA and zFLoRA rules (ONNX front-end):
a node that hosts one lane and reads another behind a bias, a base output with a second consumer,
a Cast between the zFLoRA stream and the projection, and a lane whose only GEMM on its input is
a LoRA chain's. Every fused graph is compared with ONNX Runtime against the input, with the tool's
own verification off, so a wrong rewrite cannot hide behind it."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from graphs import GraphBuilder

from zflora_compile.compile import CompileOptions, compile_in_memory, detect

S, D, R = 4, 8, 2
F32 = np.float32


def const(gb: GraphBuilder, rng, name, shape, dtype=F32):
    return gb.initializer(name, (rng.standard_normal(shape) * 0.5).astype(dtype))


def scaled(gb, value, scale=2.0, dtype=F32):
    return gb.op("Mul", [value, gb.initializer(f"s_{value.name}", np.array(scale, dtype=dtype))])


def run(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def feeds_for(model: ir.Model, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {v.name: rng.standard_normal([d if isinstance(d, int) else S for d in v.shape]).astype(v.dtype.numpy()) for v in model.graph.inputs}


def assert_exact_without_verification(model: ir.Model):
    fused, report = compile_in_memory(model, CompileOptions(verify=False))
    feeds = feeds_for(model)
    for got, want in zip(run(fused, feeds), run(model, feeds)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    return fused, report


def test_host_that_also_reads_lanes_behind_a_bias():
    """N = t @ Wn + bn hosts lane z1 (read by R first in graph order) and reads lane z2 after its bias."""
    rng = np.random.default_rng(0)
    gb = GraphBuilder()
    t, u, v = (gb.input(n, [1, S, D], F32) for n in ("t", "u", "v"))
    z1 = gb.op("MatMul", [t, const(gb, rng, "A1", [D, R])], "A1")
    out_r = gb.op("Add", [gb.op("MatMul", [v, const(gb, rng, "Wr", [D, D])], "R"), scaled(gb, gb.op("MatMul", [z1, const(gb, rng, "B1", [R, D])], "B1"))], "R_add")
    h2 = gb.op("MatMul", [u, const(gb, rng, "Wh2", [D, D])], "H2")
    z2 = gb.op("MatMul", [u, const(gb, rng, "A2", [D, R])], "A2")
    biased = gb.op("Add", [gb.op("MatMul", [t, const(gb, rng, "Wn", [D, D])], "N"), const(gb, rng, "bn", [D])], "N_bias")
    out_n = gb.op("Add", [biased, scaled(gb, gb.op("MatMul", [z2, const(gb, rng, "B2", [R, D])], "B2"))], "N_add")
    for value, name in ((out_r, "out_r"), (h2, "h2"), (out_n, "out_n")):
        gb.output(value, name, F32, [1, S, D])
    model = gb.model()
    detection = detect(model)
    assert not detection.rejections and {s.nodes[0]: (len(s.reads), len(s.writes)) for s in detection.widened}["N"] == (1, 1)
    fused, _ = assert_exact_without_verification(model)
    assert sum(n.op_type == "MatMul" for n in fused.graph) == 3  # R, H2, N: the base GEMMs only


def test_base_output_with_another_consumer_is_left_alone():
    rng = np.random.default_rng(1)
    gb = GraphBuilder()
    t, o = gb.input("t", [1, S, D], F32), gb.input("o", [1, S, D], F32)
    host = gb.op("MatMul", [t, const(gb, rng, "Wq", [D, D])], "host")
    z = gb.op("MatMul", [t, const(gb, rng, "A", [D, R])], "A")
    base = gb.op("Add", [gb.op("MatMul", [o, const(gb, rng, "Wo", [D, D])], "reader"), const(gb, rng, "bo", [D])], "reader_bias")
    out = gb.op("Add", [base, scaled(gb, gb.op("MatMul", [z, const(gb, rng, "B", [R, D])], "B"))], "reader_add")
    for value, name in ((host, "q"), (base, "also_used"), (out, "out")):
        gb.output(value, name, F32, [1, S, D])
    model = gb.model()
    detection = detect(model)
    assert detection.widened == [] and len(detection.rejections) == 1
    assert "base projection output" in detection.rejections[0].reason and "also used" in detection.rejections[0].reason
    assert_exact_without_verification(model)


def zflora_cast_graph(cast_low: bool) -> ir.Model:
    """fp32 stream a; fp16 projection: a[:d] (optionally through a Cast) @ W16 + s * Cast(a[d:]) @ B16."""
    rng = np.random.default_rng(2)
    gb = GraphBuilder()
    a = gb.input("a", [1, S, D + R], F32)

    def part(start, end):
        return gb.op("Slice", [a, *(gb.initializer(f"{k}{start}", np.array([x], np.int64)) for k, x in (("st", start), ("en", end), ("ax", -1)))])

    low, high = part(0, D), part(D, np.iinfo(np.int64).max)
    if cast_low:
        low = gb.op("Cast", [low], to=ir.DataType.FLOAT16)
        high = gb.op("Cast", [high], to=ir.DataType.FLOAT16)
    dtype = np.float16 if cast_low else F32
    base = gb.op("MatMul", [low, const(gb, rng, "W", [D, D], dtype)])
    lanes = gb.op("MatMul", [high, const(gb, rng, "B", [R, D], dtype)])
    gb.output(gb.op("Add", [base, scaled(gb, lanes, dtype=dtype)]), "out", dtype, [1, S, D])
    return gb.model()


def test_zflora_read_through_a_cast_is_reported_not_fused():
    model = zflora_cast_graph(cast_low=True)
    detection = detect(model)
    assert detection.widened == [] and len(detection.rejections) == 1
    assert "Cast" in detection.rejections[0].reason
    assert_exact_without_verification(model)


def test_zflora_read_without_cast_is_fused():
    fused, report = assert_exact_without_verification(zflora_cast_graph(cast_low=False))
    assert [s["family"] for s in report["sites"]] == ["zflora"] and not any(n.op_type == "Slice" for n in fused.graph)


def test_lora_chain_gemm_is_never_a_lane_host():
    """The only GEMM reading the lane's input besides the LoRA base is the LoRA A: no host, reported."""
    rng = np.random.default_rng(3)
    gb = GraphBuilder()
    x, o = gb.input("x", [1, S, D], F32), gb.input("o", [1, S, D], F32)
    lora_z = gb.op("MatMul", [x, const(gb, rng, "Aq", [D, R])], "q_lora_A")
    q = gb.op("Add", [gb.op("MatMul", [x, const(gb, rng, "Wq", [D, D])], "q"), scaled(gb, gb.op("MatMul", [lora_z, const(gb, rng, "Bq", [R, D])], "q_lora_B"))], "q_add")
    z = gb.op("MatMul", [x, const(gb, rng, "A", [D, R])], "ffa_A")
    out = gb.op("Add", [gb.op("MatMul", [o, const(gb, rng, "Wo", [D, D])], "o_proj"), scaled(gb, gb.op("MatMul", [z, const(gb, rng, "B", [R, D])], "ffa_B"))], "o_add")
    gb.output(q, "q_final", F32, [1, S, D])
    gb.output(out, "out", F32, [1, S, D])
    model = gb.model()
    detection = detect(model)
    assert len(detection.sites) == 1 and detection.widened == []
    assert len(detection.rejections) == 1 and "no base projection with a constant weight reads 'x'" in detection.rejections[0].reason
    assert_exact_without_verification(model)
