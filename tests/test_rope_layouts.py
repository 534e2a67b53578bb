"""RoPE-aware index handling (ADAPTERS.md section 5): hand-built attention front-ends in every
rotary and packed-QKV layout, each with a LoRA adapter on its QKV projection(s) and with an FFA
lane hosted by it, fused and proven exact with ONNX Runtime.

The fused forms never let adapter lanes reach an index consumer: a LoRA group and an FFA host are
cut by one ``Split`` right after their widened GEMM, so the open-ended ``Slice`` of a fused
``qkv_proj`` (Phi-3), the per-head ``[.., H, 3*hd]`` reshape (GPT-NeoX), partial and interleaved
rotary, and the ``com.microsoft`` RotaryEmbedding / GroupQueryAttention (packed QKV) ops all see
exactly the base lanes. Stream consumers that zFLoRA cannot read as "base lanes, then lanes" are
left alone and reported.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest
from graphs import GraphBuilder

from zflora_compile.compile import CompileOptions, compile_in_memory, detect

D, H, HD, S, R = 32, 2, 16, 5, 2  # hidden, heads, head dim (GroupQueryAttention: a multiple of 16), sequence, rank
SCALE = 2.0
F32 = np.float32
INT64_MAX = np.iinfo(np.int64).max
LAYOUTS = ("llama_rotate_half", "phi3_open_slice", "neox_partial_rotary", "gptj_interleaved", "ms_rotary_embedding", "ms_gqa_packed_qkv")


class Rope:
    def __init__(self, gb: GraphBuilder, rng):
        self.gb, self.rng = gb, rng
        self.count = 0
        positions = np.arange(64, dtype=F32)[:, None] / (10000 ** (np.arange(0, HD, 2, dtype=F32) / HD))
        self.cos_cache, self.sin_cache = np.cos(positions).astype(F32), np.sin(positions).astype(F32)  # [64, HD/2]

    def c(self, array, dtype=None) -> ir.Value:
        self.count += 1
        return self.gb.initializer(f"const_{self.count}", np.asarray(array, dtype=dtype))

    def op(self, op, *inputs, **attrs) -> ir.Value:
        return self.gb.op(op, list(inputs), **attrs)

    def slice(self, t, start, end, axis=-1):
        return self.op("Slice", t, self.c([start], np.int64), self.c([end], np.int64), self.c([axis], np.int64))

    def heads(self, t, width=HD):  # [1, S, H*width] -> [1, S, H, width]
        return self.op("Reshape", t, self.c([1, S, H, width], np.int64))

    def flat(self, t):  # [1, S, H, HD] -> [1, S, D]
        return self.op("Reshape", t, self.c([1, S, D], np.int64))

    def tables(self, dim):  # cos/sin [S, dim] laid out for rotate-half over `dim` lanes, broadcast over heads
        cos = np.concatenate([self.cos_cache[:S, : dim // 2]] * 2, axis=-1)[:, None, :]
        sin = np.concatenate([self.sin_cache[:S, : dim // 2]] * 2, axis=-1)[:, None, :]
        return self.c(cos[None].astype(F32)), self.c(sin[None].astype(F32))

    def rotate_half(self, t, dim=HD):  # t: [1, S, H, dim]; second half opened with INT64_MAX
        x1, x2 = self.slice(t, 0, dim // 2), self.slice(t, dim // 2, INT64_MAX)
        rotated = self.op("Concat", self.op("Neg", x2), x1, axis=-1)
        cos, sin = self.tables(dim)
        return self.op("Add", self.op("Mul", t, cos), self.op("Mul", rotated, sin))

    def partial(self, t, dim=HD // 2):  # NeoX / Phi partial rotary: rotate the first `dim` lanes only
        rot, rest = self.slice(t, 0, dim), self.slice(t, dim, INT64_MAX)
        return self.op("Concat", self.rotate_half(rot, dim), rest, axis=-1)

    def interleaved(self, t):  # GPT-J: pairs (2i, 2i+1) rotate together
        pairs = self.op("Reshape", t, self.c([1, S, H, HD // 2, 2], np.int64))
        even = self.op("Gather", pairs, self.c(0, np.int64), axis=-1)
        odd = self.op("Gather", pairs, self.c(1, np.int64), axis=-1)
        cos, sin = self.c(self.cos_cache[None, :S, None, :]), self.c(self.sin_cache[None, :S, None, :])
        new_even = self.op("Sub", self.op("Mul", even, cos), self.op("Mul", odd, sin))
        new_odd = self.op("Add", self.op("Mul", odd, cos), self.op("Mul", even, sin))
        axis = self.c([-1], np.int64)
        stacked = self.op("Concat", self.op("Unsqueeze", new_even, axis), self.op("Unsqueeze", new_odd, axis), axis=-1)
        return self.op("Reshape", stacked, self.c([1, S, H, HD], np.int64))

    def ms_rotary(self, t):  # com.microsoft RotaryEmbedding on [1, S, D]
        node = ir.node(
            "RotaryEmbedding",
            [t, self.c(np.arange(S, dtype=np.int64)[None]), self.c(self.cos_cache), self.c(self.sin_cache)],
            domain="com.microsoft",
            attributes={"num_heads": H},
            name=f"RotaryEmbedding_{self.count}",
        )
        node.outputs[0].name = f"{node.name}_out"
        self.gb.nodes.append(node)
        return node.outputs[0]

    def core(self, q, k, v):  # a cheap stand-in for attention that still mixes all three: q * k + v
        return self.op("Add", self.op("Mul", q, k), v)


def build(layout: str, adapter: str, seed: int = 0) -> ir.Model:
    """``hidden -> QKV projection(s) -> layout -> o_proj``, with ``adapter`` in {"lora", "ffa", "none"}."""
    rng = np.random.default_rng(seed)
    gb = GraphBuilder()
    rope = Rope(gb, rng)

    def weight(name, shape):
        return gb.initializer(name, (rng.standard_normal(shape) * 0.3).astype(F32))

    def projection(name, x, out):
        y = gb.op("MatMul", [x, weight(f"{name}.weight", [D, out])], f"{name}/MatMul")
        if adapter == "lora":
            z = gb.op("MatMul", [x, weight(f"{name}.lora_A", [D, R])], f"{name}/lora_A")
            delta = gb.op("MatMul", [z, weight(f"{name}.lora_B", [R, out])], f"{name}/lora_B")
            y = gb.op("Add", [y, gb.op("Mul", [delta, rope.c(np.float32(SCALE))])], f"{name}/AddLora")
        return y

    x = gb.input("hidden", [1, S, D], F32)
    ffa_z = gb.op("MatMul", [x, weight("ffa_A", [D, R])], "ffa_A/MatMul") if adapter == "ffa" else None
    if layout in ("phi3_open_slice", "neox_partial_rotary", "ms_gqa_packed_qkv"):
        qkv = projection("qkv_proj", x, 3 * D)
        if layout == "phi3_open_slice":
            q, k, v = rope.slice(qkv, 0, D), rope.slice(qkv, D, 2 * D), rope.slice(qkv, 2 * D, INT64_MAX)
            o = rope.flat(rope.core(rope.rotate_half(rope.heads(q)), rope.rotate_half(rope.heads(k)), rope.heads(v)))
        elif layout == "neox_partial_rotary":
            per_head = rope.heads(qkv, 3 * HD)  # [1, S, H, 3*hd]: q, k, v interleaved per head
            q, k, v = rope.slice(per_head, 0, HD), rope.slice(per_head, HD, 2 * HD), rope.slice(per_head, 2 * HD, INT64_MAX)
            o = rope.flat(rope.core(rope.partial(q), rope.partial(k), v))
        else:
            node = ir.node(
                "GroupQueryAttention",
                [qkv, None, None, None, None, rope.c([S - 1], np.int32), rope.c(S, np.int32), rope.c(rope.cos_cache), rope.c(rope.sin_cache)],
                domain="com.microsoft",
                attributes={"num_heads": H, "kv_num_heads": H, "do_rotary": 1},
                num_outputs=3,
                name="GroupQueryAttention",
            )
            for i, output in enumerate(node.outputs):
                output.name = f"gqa_out{i}"
            gb.nodes.append(node)
            o = node.outputs[0]
    else:
        q, k, v = projection("q_proj", x, D), projection("k_proj", x, D), projection("v_proj", x, D)
        if layout == "llama_rotate_half":
            o = rope.flat(rope.core(rope.rotate_half(rope.heads(q)), rope.rotate_half(rope.heads(k)), rope.heads(v)))
        elif layout == "gptj_interleaved":
            o = rope.flat(rope.core(rope.interleaved(rope.heads(q)), rope.interleaved(rope.heads(k)), rope.heads(v)))
        else:
            o = rope.core(rope.ms_rotary(q), rope.ms_rotary(k), v)
    y = gb.op("MatMul", [o, weight("o_proj.weight", [D, D])], "o_proj/MatMul")
    if ffa_z is not None:
        delta = gb.op("MatMul", [ffa_z, weight("ffa_B", [R, D])], "ffa_B/MatMul")
        y = gb.op("Add", [y, gb.op("Mul", [delta, rope.c(np.float32(SCALE))])], "o_proj/AddFfa")
    gb.output(y, "out", F32, [1, S, D])
    model = gb.model(layout)
    model.graph.opset_imports["com.microsoft"] = 1
    return model


def run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"hidden": x})[0]


def gemms(model: ir.Model) -> int:
    return sum(n.op_type in ("MatMul", "Gemm") for n in model.graph)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_base_graph_runs(layout):
    """The graphs are real: ONNX Runtime runs every layout, contrib ops included."""
    out = run(build(layout, "none"), np.ones((1, S, D), F32))
    assert out.shape == (1, S, D) and np.isfinite(out).all()


@pytest.mark.parametrize("adapter", ["lora", "ffa"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_lanes_never_reach_index_consumers(layout, adapter):
    model = build(layout, adapter)
    detection = detect(model)
    assert detection.rejections == []
    assert len(detection.sites) == (0 if adapter == "ffa" else 1 if layout in ("phi3_open_slice", "neox_partial_rotary", "ms_gqa_packed_qkv") else 3)
    assert len(detection.widened) == (2 if adapter == "ffa" else 0)  # the host (QKV) and the reader (o_proj)
    fused, report = compile_in_memory(model, CompileOptions())
    assert report["verification"]["passed"]
    if adapter == "ffa":  # zero extra GEMMs: exactly the base graph's
        assert gemms(fused) == gemms(build(layout, "none"))
    x = np.random.default_rng(1).standard_normal((1, S, D)).astype(F32)
    np.testing.assert_allclose(run(fused, x), run(model, x), atol=1e-5, rtol=0)
    # the cut sits right after the widened GEMM: every index consumer reads the Split's base lanes
    for node in fused.graph:
        if node.op_type in ("Slice", "Reshape", "Gather", "RotaryEmbedding", "GroupQueryAttention"):
            producer = node.inputs[0].producer()
            assert producer is None or producer.op_type != "MatMul" or producer.inputs[1].shape[-1] in (D, 3 * D)


def test_fused_is_idempotent():
    fused, _ = compile_in_memory(build("phi3_open_slice", "ffa"), CompileOptions())
    again, report = compile_in_memory(fused, CompileOptions())
    assert report["sites"] == [] and collections.Counter(n.op_type for n in again.graph) == collections.Counter(n.op_type for n in fused.graph)


# ---------------------------------------------------------------- must not fire


def zflora_stream_graph(hi_start: int, lo_end: int) -> ir.Model:
    """A d+r stream read as ``a[:lo_end] @ W + s * a[hi_start:] @ B``: complementary only when equal."""
    rng = np.random.default_rng(0)
    gb = GraphBuilder()
    rope = Rope(gb, rng)
    a = gb.input("hidden", [1, S, D + R], F32)
    base = gb.op("MatMul", [rope.slice(a, 0, lo_end), gb.initializer("W", rng.standard_normal((lo_end, D)).astype(F32))])
    lanes = rope.slice(a, hi_start, INT64_MAX)
    delta = gb.op("MatMul", [lanes, gb.initializer("B", rng.standard_normal((D + R - hi_start, D)).astype(F32))])
    gb.output(gb.op("Add", [base, gb.op("Mul", [delta, rope.c(np.float32(SCALE))])]), "out", F32, [1, S, D])
    return gb.model("zflora_stream")


def test_zflora_read_of_the_stream_is_fused():
    model = zflora_stream_graph(D, D)
    fused, report = compile_in_memory(model, CompileOptions())
    assert [s["family"] for s in report["sites"]] == ["zflora"] and gemms(fused) == 1
    assert not any(n.op_type == "Slice" for n in fused.graph)
    x = np.random.default_rng(2).standard_normal((1, S, D + R)).astype(F32)
    np.testing.assert_allclose(run(fused, x), run(model, x), atol=1e-5, rtol=0)


def test_zflora_overlapping_slices_are_left_alone_and_reported():
    model = zflora_stream_graph(D - 1, D)  # the lanes overlap the base lanes: not "base, then lanes"
    detection = detect(model)
    assert detection.widened == [] and detection.sites == []
    assert len(detection.rejections) == 1 and "does not read the complementary slice [0, 31)" in detection.rejections[0].reason
    fused, report = compile_in_memory(model, CompileOptions())
    assert gemms(fused) == 2 and report["rejected"]


def test_cross_lane_without_a_host_is_left_alone_and_reported():
    """A reads a tensor no base projection reads: there is nowhere to put A's columns."""
    rng = np.random.default_rng(0)
    gb = GraphBuilder()
    x = gb.input("hidden", [1, S, D], F32)
    other = gb.input("other", [1, S, D], F32)
    z = gb.op("MatMul", [other, gb.initializer("A", rng.standard_normal((D, R)).astype(F32))])
    y = gb.op("MatMul", [x, gb.initializer("W", rng.standard_normal((D, D)).astype(F32))])
    delta = gb.op("MatMul", [z, gb.initializer("B", rng.standard_normal((R, D)).astype(F32))])
    gb.output(gb.op("Add", [y, delta]), "out", F32, [1, S, D])
    detection = detect(gb.model())
    assert detection.widened == [] and detection.sites == []
    assert len(detection.rejections) == 1 and "no base projection with a constant weight reads 'other'" in detection.rejections[0].reason
