"""LoRA weights fed at run time (Olive's ExtractAdapters, ONNX Runtime's multi-LoRA): graph inputs with
empty default initializers and a symbolic rank axis. They are never constants: fuse keeps them
switchable (same input names, dtypes, shapes), merge refuses, strip removes the chains and keeps the
inputs. Every rewrite is compared in ONNX Runtime with adapters fed by the test itself (empty
defaults, random rank-3 and rank-5 adapters), tolerance 1e-5 (fp32; measured 0)."""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from zflora_compile.api import detect_adapters
from zflora_compile.errors import PlanError, UnrecognizedAdapterError
from zflora_compile.graph.onnx_constants import is_constant
from zflora_compile.options import CompileOptions
from zflora_compile.pipeline import compile_model

IN = 16
OUTS = {"q": 16, "k": 8, "v": 8}
ATOL = 1e-5
FIXTURE = Path(__file__).parent / "fixtures" / "exporters"


def _value(name, shape, array=None, dtype=ir.DataType.FLOAT):
    return ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype), const_value=None if array is None else ir.tensor(array))


def olive_model(*, defaults=True, symbolic=True, seed=0, chain_reads_other=False, relu_between=False, scale=2.0) -> onnx.ModelProto:
    """q/k/v projections of x, each ``x @ W + scale * ((x @ A) @ B)`` with A ``[16, lora_r]`` and B
    ``[lora_r, out]`` graph inputs (empty default initializers when ``defaults``), as Olive writes them."""
    rng = np.random.default_rng(seed)
    x = _value("x", ["batch", "seq", IN])
    other = _value("other", ["batch", "seq", IN])
    inputs, inits, nodes, outputs = [x] + ([other] if chain_reads_other else []), [], [], []
    rank = "lora_r" if symbolic else 4
    for n, out in OUTS.items():
        W = _value(f"W_{n}", [IN, out], rng.standard_normal((IN, out)).astype(np.float32))
        b_width = out
        A = _value(f"model.layers.0.self_attn.{n}_proj.lora_A.weight", [IN, rank], np.zeros((IN, 0 if symbolic else 4), np.float32) if defaults else None)
        B = _value(f"model.layers.0.self_attn.{n}_proj.lora_B.weight", [rank, b_width], np.zeros((0 if symbolic else 4, b_width), np.float32) if defaults else None)
        s = _value(f"scale_{n}", [], np.float32(scale))
        inits += [W, s] + ([A, B] if defaults else [])
        inputs += [A, B]
        base = ir.node("MatMul", [x, W], name=f"/model/layers.0/self_attn/{n}_proj/MatMul")
        za = ir.node("MatMul", [other if (chain_reads_other and n == "q") else x, A], name=f"/model/layers.0/self_attn/{n}_proj/lora_A/MatMul")
        lanes = za.outputs[0]
        if relu_between and n == "k":
            relu = ir.node("Relu", [lanes], name=f"/model/layers.0/self_attn/{n}_proj/lora/Relu")
            nodes.append(relu)
            lanes = relu.outputs[0]
        zb = ir.node("MatMul", [lanes, B], name=f"/model/layers.0/self_attn/{n}_proj/lora_B/MatMul")
        mul = ir.node("Mul", [zb.outputs[0], s], name=f"/model/layers.0/self_attn/{n}_proj/lora/Mul")
        add = ir.node("Add", [base.outputs[0], mul.outputs[0]], name=f"/model/layers.0/self_attn/{n}_proj/lora/Add")
        add.outputs[0].name = f"{n}_out"
        nodes += [base, za, zb, mul, add]
        outputs.append(add.outputs[0])
    graph = ir.Graph(inputs, outputs, nodes=nodes, initializers=inits, opset_imports={"": 18})
    return ir.to_proto(ir.Model(graph, ir_version=9))


def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _adapter_feeds(rank: int, seed: int, *, b_out=None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for n, out in OUTS.items():
        feeds[f"model.layers.0.self_attn.{n}_proj.lora_A.weight"] = rng.standard_normal((IN, rank)).astype(np.float32)
        feeds[f"model.layers.0.self_attn.{n}_proj.lora_B.weight"] = rng.standard_normal((rank, out)).astype(np.float32)
    return feeds


def _run(session, feeds):
    x = np.random.default_rng(7).standard_normal((2, 5, IN)).astype(np.float32)
    return session.run(None, {"x": x, **feeds})


def _compile(proto, strategy, verify=False):
    model, report = compile_model(ir.from_proto(proto), CompileOptions(strategy=strategy, verify=verify))
    return ir.to_proto(model), report.to_json()


def _gemms(proto) -> int:
    return sum(n.op_type in ("MatMul", "Gemm") for n in proto.graph.node)


def _signature(proto):
    """Graph inputs (names, dtypes, shapes with their symbolic axes) and which of them have defaults."""
    names = {i.name for i in proto.graph.input}
    return [(i.name, str(i.type)) for i in proto.graph.input], sorted(i.name for i in proto.graph.initializer if i.name in names)


def test_graph_input_with_initializer_is_not_constant():
    """The bug: an input with an initializer of its name was folded as a constant (rank 0, sites fused
    as constants, fed adapters silently ignored)."""
    model = ir.from_proto(olive_model())
    a = next(v for v in model.graph.inputs if "q_proj.lora_A" in v.name)
    assert a.const_value is not None and a.is_graph_input()
    assert not is_constant(a)
    assert is_constant(model.graph.initializers["W_q"])


@pytest.mark.parametrize("defaults,symbolic", [(True, True), (False, True), (True, False)])
def test_detected_as_switchable(defaults, symbolic):
    detection = detect_adapters(olive_model(defaults=defaults, symbolic=symbolic))
    sites = [s.to_json() for s in detection]
    assert len(sites) == 3 and detection.rejections == [] and detection.unrecognized == []
    for site in sites:
        assert site["family"] == "lora" and site["switchable"] is True and site["base"] == "float"
        assert site["weights"] == {"A": "graph input", "B": "graph input"}
        assert site["rank"] == ("lora_r" if symbolic else 4) and site["scale"] == 2.0
        assert "adapter weights are graph inputs" in site["kind"]
    assert len({s["group"] for s in sites}) == 1
    assert detection.accounting.branches_found == detection.accounting.branches_recognised == 3


def test_fuse_stays_switchable_and_exact():
    original = olive_model()
    fused, report = _compile(original, "fuse")
    assert _gemms(original) == 9 and _gemms(fused) == 3  # base [Wq|Wk|Wv], x @ [Aq|Ak|Av], z @ blockdiag
    assert _signature(fused) == _signature(original)  # same inputs: names, dtypes, shapes (lora_r kept)
    group = report["plan"]["fused_groups"][0]
    assert group["runtime"] == {"base": "widened", "A": "run-time concat", "B": "run-time", "switchable": True}
    ops = collections.Counter(n.op_type for n in fused.graph.node)
    assert ops["Pad"] == 3 and ops["Concat"] == 2 and ops["Split"] == 1
    s0, s1 = _session(original), _session(fused)
    assert [(i.name, i.shape) for i in s1.get_overridable_initializers()] == [(i.name, i.shape) for i in s0.get_overridable_initializers()]
    base = _run(s0, {})
    for rank, seed in ((0, 0), (3, 1), (5, 2)):
        feeds = _adapter_feeds(rank, seed) if rank else {}
        want, got = _run(s0, feeds), _run(s1, feeds)
        for w, g in zip(want, got):
            np.testing.assert_allclose(g, w, atol=ATOL, rtol=0)
        if rank:  # the fed adapter changes the output: a frozen adapter would fail the line above
            assert max(float(np.abs(w - b).max()) for w, b in zip(want, base)) > 1.0


def test_fuse_verified_by_the_pipeline():
    """The tool's own verification passes (the verifier also feeds overridable inputs itself)."""
    _, report = _compile(olive_model(), "fuse", verify=True)
    assert report["verification"]["passed"] is True and report["exit_code"] == 0


def test_strip_removes_chains_keeps_inputs():
    original = olive_model()
    stripped, report = _compile(original, "strip", verify=True)
    assert report["plan"]["stripped_sites"] == ["lora_rt0", "lora_rt1", "lora_rt2"]
    assert _gemms(stripped) == 3 and _signature(stripped) == _signature(original)
    s0, s1 = _session(original), _session(stripped)
    base = _run(s0, {})
    feeds = _adapter_feeds(3, 4)
    for b, g in zip(base, _run(s1, feeds)):  # a fed adapter is accepted and has no effect
        np.testing.assert_allclose(g, b, atol=ATOL, rtol=0)
    assert max(float(np.abs(a - b).max()) for a, b in zip(_run(s0, feeds), base)) > 1.0


def test_merge_refuses_with_reason():
    """Exit 2 (PlanError), nothing written: merging would freeze one adapter into the weights."""
    with pytest.raises(PlanError, match=r"site lora_rt0 .*graph inputs .*freeze") as caught:
        _compile(olive_model(), "merge")
    assert caught.value.exit_code == 2


def test_fuse_is_idempotent():
    fused, _ = _compile(olive_model(), "fuse")
    again, report = _compile(fused, "fuse")
    assert report["sites"] == [] and _gemms(again) == _gemms(fused)


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        (dict(chain_reads_other=True), "low-rank chain reads 'other'"),
        (dict(relu_between=True), "low-rank read (z @ B)"),
    ],
)
def test_near_misses_left_alone(kwargs, reason):
    """A chain reading another tensor, a Relu between A and B: not fused, reported, strip refuses."""
    proto = olive_model(**kwargs)
    detection = detect_adapters(proto)
    assert len(detection.sites) == 2  # the other two projections are fine
    listed = [r for r in (*detection.rejections, *detection.unrecognized) if reason in r.reason]
    assert len(listed) >= 1, (detection.rejections, detection.unrecognized)
    assert len(detection.unrecognized) == 1
    fused, _ = _compile(proto, "fuse")
    names = {n.name for n in fused.graph.node}
    assert listed[0].node in names  # its add is untouched
    with pytest.raises(UnrecognizedAdapterError):
        _compile(proto, "strip")


# ---------------------------------------------------------------- the Olive fixture


def _olive_folder():
    if not FIXTURE.is_dir():
        return None
    for folder in sorted(FIXTURE.iterdir()):
        if folder.is_dir() and "olive" in folder.name and any(folder.rglob("*.onnx_adapter")):
            return folder
    return None


@pytest.mark.skipif(_olive_folder() is None, reason="no Olive ExtractAdapters fixture under tests/fixtures/exporters yet")
def test_olive_fixture_fused_switchable_and_exact():
    folder = _olive_folder()
    model_path = next(p for p in sorted(folder.rglob("*.onnx")) if not p.name.endswith(".onnx_adapter"))
    original = onnx.load(str(model_path))
    fused, report = _compile(original, "fuse")
    sites = report["sites"]
    assert sites and all(s["switchable"] for s in sites if s["family"] == "lora")
    assert _gemms(fused) < _gemms(original)
    assert _signature(fused) == _signature(original)
    s0, s1 = _session(original), _session(fused)
    feeds = {}
    rng = np.random.default_rng(5)
    for info in s0.get_inputs():
        dims = [d if isinstance(d, int) else (1 if "batch" in str(d) else 4) for d in info.shape]
        if "int64" in info.type:
            feeds[info.name] = rng.integers(0, 16, size=dims).astype(np.int64)
        elif "int32" in info.type:
            feeds[info.name] = rng.integers(0, 16, size=dims).astype(np.int32)
        elif "bool" in info.type:
            feeds[info.name] = np.ones(dims, dtype=bool)
        else:
            feeds[info.name] = rng.standard_normal(dims).astype(np.float16 if "float16" in info.type else np.float32)
    rank = 8  # the rank Olive's kept value_info fixes for the LoRA intermediates (README.txt)
    adapter = {}
    for info in s0.get_overridable_initializers():
        if "lora" not in info.name:
            continue
        dims = [d if isinstance(d, int) else rank for d in info.shape]
        adapter[info.name] = (rng.standard_normal(dims) * 0.1).astype(np.float16 if "float16" in info.type else np.float32)
    for fed in (adapter,):  # (the empty defaults fail in ORT as Olive wrote the model: README.txt)
        want, got = s0.run(None, {**feeds, **fed}), s1.run(None, {**feeds, **fed})
        for w, g in zip(want, got):
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=1e-3, rtol=1e-3)
    files = list(folder.rglob("*.onnx_adapter"))
    options = ort.RunOptions()
    for path in files:
        adapter_file = ort.LoraAdapter()
        adapter_file.Load(str(path))
        options.add_active_adapter(adapter_file)
    want, got = s0.run(None, feeds, options), s1.run(None, feeds, options)
    for w, g in zip(want, got):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=1e-3, rtol=1e-3)
    cleared = onnx.ModelProto()
    cleared.CopyFrom(original)
    del cleared.graph.value_info[:]  # the empty defaults run once Olive's stale r = 8 value_info is gone
    for w, g in zip(_session(cleared).run(None, feeds), s1.run(None, feeds)):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=1e-5, rtol=0)
    assert json.dumps(report)  # strict JSON
    assert os.path.exists(model_path)


def test_strip_of_the_fused_model_refuses():
    """The fused model records its run-time groups: strip of it refuses (exit 2) rather than writing
    the fused model (the adapter GEMMs still in it) as the base."""
    from zflora_compile.errors import InputError

    fused, _ = _compile(olive_model(), "fuse")
    with pytest.raises(InputError, match="fed at run time or a quantized base") as error:
        _compile(fused, "strip")
    assert error.value.exit_code == 2


# ---------------------------------------------------------------- found by review


def _fed_adapters(*, scale_input: bool = False, fp16_inputs: bool = False) -> onnx.ModelProto:
    """Two q/k-like projections of ``x`` with Olive-style fed A / B (``lora_r`` axis); the scale
    a fed scalar with a default (``scale_input``), or A / B fed in fp16 and cast to fp32
    (``fp16_inputs``)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    d, fed = 16, TensorProto.FLOAT16 if fp16_inputs else TensorProto.FLOAT
    inputs, inits, nodes, outputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d])], [], [], []
    for i, out in enumerate((16, 8)):
        inits.append(numpy_helper.from_array(rng.standard_normal((d, out)).astype(np.float32), f"W{i}"))
        inputs += [helper.make_tensor_value_info(f"A{i}", fed, [d, "lora_r"]), helper.make_tensor_value_info(f"B{i}", fed, ["lora_r", out])]
        a, b = f"A{i}", f"B{i}"
        if fp16_inputs:
            nodes += [helper.make_node("Cast", [a], [a + "f"], to=TensorProto.FLOAT), helper.make_node("Cast", [b], [b + "f"], to=TensorProto.FLOAT)]
            a, b = a + "f", b + "f"
        nodes += [helper.make_node("MatMul", ["x", f"W{i}"], [f"p{i}"]), helper.make_node("MatMul", ["x", a], [f"za{i}"]), helper.make_node("MatMul", [f"za{i}", b], [f"zb{i}"])]
        low = f"zb{i}"
        if scale_input:
            inputs.append(helper.make_tensor_value_info(f"s{i}", TensorProto.FLOAT, []))
            inits.append(numpy_helper.from_array(np.array(2.0, np.float32), f"s{i}"))
            nodes.append(helper.make_node("Mul", [low, f"s{i}"], [f"zs{i}"]))
            low = f"zs{i}"
        nodes.append(helper.make_node("Add", [f"p{i}", low], [f"y{i}"], name=f"p{i}/add"))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["batch", out]))
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def test_a_scale_fed_at_run_time_is_reported_and_strip_refuses():
    """It was silent: 0 branches found, strip wrote the adapted model as the base (exit 0)."""
    found = detect_adapters(_fed_adapters(scale_input=True))
    assert found.sites == [] and len(found.unrecognized) == 2
    assert all("is no constant" in u.reason for u in found.unrecognized)
    with pytest.raises(UnrecognizedAdapterError):
        _compile(_fed_adapters(scale_input=True), "strip")


def test_adapter_inputs_fed_in_fp16_and_cast_are_switchable():
    """Rejected before ('not constant (produced by node Cast)') and strip said nothing was found."""
    original = _fed_adapters(fp16_inputs=True)
    fused, report = _compile(original, "fuse", verify=True)
    assert len(report["sites"]) == 2 and all(s["switchable"] for s in report["sites"])
    assert _gemms(fused) < _gemms(original)
    rng = np.random.default_rng(4)
    feeds = {"x": rng.standard_normal((3, 16)).astype(np.float32)}
    for i, out in enumerate((16, 8)):
        feeds[f"A{i}"] = rng.standard_normal((16, 5)).astype(np.float16)
        feeds[f"B{i}"] = rng.standard_normal((5, out)).astype(np.float16)
    for want, got in zip(_session(original).run(None, feeds), _session(fused).run(None, feeds)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
