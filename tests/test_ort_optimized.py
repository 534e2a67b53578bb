"""Models saved by ONNX Runtime's offline optimizer (``optimized_model_filepath``).

At ``ORT_ENABLE_EXTENDED`` ORT rewrites LoRA's ``s * (z @ B)`` into
``com.microsoft::FusedMatMul(z, B, alpha=s)`` and attention's ``(Q @ K^T) * scale`` into
``FusedMatMul(Q, K, alpha=0.25, transB=1)``. The ONNX view reads a FusedMatMul with a constant
second operand as ``x @ (alpha * W)`` (``transB=1``: W stored ``[out, in]``); the one reading an
activation (attention) is no projection and stays as it is. ``ORT_ENABLE_BASIC`` (no FusedMatMul)
is the contrast. Checked: sites found as on the unoptimised export, the tool's own verification,
merge / strip against eager torch (adapted / base model), GEMM counts, and hand-built FusedMatMul
layouts that are not ``x @ W`` left alone with a reason.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from conftest import token_feeds  # noqa: E402

from zflora_compile import zoo  # noqa: E402
from zflora_compile.graph.onnx_ir import OnnxGraph  # noqa: E402
from zflora_compile.options import CompileOptions  # noqa: E402
from zflora_compile.pipeline import compile_model, detect  # noqa: E402

ARCH, LAYERS, SEED = "llama", 2, 0
SITES = 7 * LAYERS
LEVELS = {"extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}
STRATEGIES = ("fuse", "merge", "strip")
MS = "com.microsoft"


def _optimise(src, dst, level) -> onnx.ModelProto:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = level
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(dst))


def _session(model):
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _eager(model, feeds) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(feeds["input_ids"]), attention_mask=torch.from_numpy(feeds["attention_mask"]), use_cache=False)
    return out.logits.float().numpy()


def _fused(proto: onnx.ModelProto, *, constant: bool):
    """The FusedMatMul nodes whose second operand is (``constant``) or is not an initializer."""
    inits = {i.name for i in proto.graph.initializer}
    return [n for n in proto.graph.node if n.domain == MS and n.op_type == "FusedMatMul" and (n.input[1] in inits) == constant]


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("ort_optimized")
    lora = zoo.build_lora_model(ARCH, num_hidden_layers=LAYERS, seed=SEED)
    base = zoo.build_base_model(ARCH, seed=SEED, num_hidden_layers=LAYERS)
    paths = {"lora": zoo.export_onnx(lora, root / "lora.onnx", exporter="dynamo"), "base": zoo.export_onnx(base, root / "base.onnx", exporter="dynamo")}
    for level, value in LEVELS.items():
        for kind in ("lora", "base"):
            _optimise(paths[kind], root / f"{kind}_{level}.onnx", value)
            paths[f"{kind}_{level}"] = root / f"{kind}_{level}.onnx"
    feeds = token_feeds(7)
    return {"paths": paths, "adapted": _eager(lora, feeds), "base": _eager(base, feeds), "feeds": feeds}


def test_extended_writes_fused_matmul(exported):
    """The premise: the LoRA ``s * (z @ B)`` of every site became a FusedMatMul with alpha = s."""
    proto = onnx.load(str(exported["paths"]["lora_extended"]))
    lowrank = _fused(proto, constant=True)
    assert len(lowrank) == SITES
    assert all(_attrs(n)["alpha"] == pytest.approx(2.0) and not any(_attrs(n).get(k, 0) for k in ("transA", "transBatchA", "transBatchB")) for n in lowrank)
    attention = _fused(proto, constant=False)
    assert len(attention) == LAYERS and all(_attrs(n)["alpha"] == pytest.approx(0.25) and _attrs(n)["transB"] == 1 for n in attention)
    assert not _fused(onnx.load(str(exported["paths"]["lora_basic"])), constant=True)


@pytest.mark.parametrize("level", list(LEVELS))
def test_sites_found_as_unoptimised(exported, level):
    plain = detect(ir.load(str(exported["paths"]["lora"])))
    optimised = detect(ir.load(str(exported["paths"][f"lora_{level}"])))
    assert len(plain.sites) == SITES
    assert len(optimised.sites) == len(plain.sites)
    assert not optimised.rejections and not optimised.unrecognized
    assert sorted((s.in_features, s.out_features, s.rank) for s in optimised.sites) == sorted((s.in_features, s.out_features, s.rank) for s in plain.sites)
    if level == "extended":  # alpha is part of the weight the view hands out (alpha * B), counted once
        assert all(s.scale == 1.0 for s in optimised.sites)
        by_shape = {}
        for site in plain.sites:
            by_shape.setdefault((site.in_features, site.out_features), []).append(site.scale * site.lora_b())
        for site in optimised.sites:
            assert any(np.allclose(site.lora_b(), b, rtol=0, atol=1e-7) for b in by_shape[(site.in_features, site.out_features)])


@pytest.mark.parametrize("level", list(LEVELS))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_compile_exact(exported, level, strategy):
    paths = exported["paths"]
    source = onnx.load(str(paths[f"lora_{level}"]))
    out, report = compile_model(source, CompileOptions(strategy=strategy))
    data = report.to_json()
    assert data["status"] == "ok" and data["exit_code"] == 0, data["message"]
    assert len(data["sites"]) == SITES and not data["rejected"] and not data["unrecognized"]
    assert all(site["family"] == "lora" for site in data["sites"])  # read as LoRA, not measured as a generic branch
    assert data["verification"]["passed"], data["verification"]["worst"]
    proto = ir.to_proto(out)
    base_gemms = OnnxGraph(ir.load(str(paths[f"base_{level}"]))).gemm_count()
    gemms = data["output"]["gemm_count"]
    assert gemms == OnnxGraph(ir.from_proto(proto)).gemm_count()
    if strategy == "fuse":
        assert gemms < data["input"]["gemm_count"]
    else:
        assert gemms == base_gemms
    # the attention FusedMatMul (alpha 0.25, transB=1, an activation as B) is untouched
    before = sorted((list(n.input), sorted(_attrs(n).items())) for n in _fused(source, constant=False))
    after = sorted((list(n.input), sorted(_attrs(n).items())) for n in _fused(proto, constant=False))
    assert before == after and len(after) == (LAYERS if level == "extended" else 0)
    # no FusedMatMul keeps a scale the rewrite already put into a weight
    assert all(_attrs(n).get("alpha", 1.0) == 1.0 for n in _fused(proto, constant=True))
    if strategy != "fuse":
        want = exported["adapted"] if strategy == "merge" else exported["base"]
        got = _session(proto).run(["logits"], exported["feeds"])[0]
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)


# ---------------------------------------------------------------- hand-built FusedMatMul layouts

IN, OUT, RANK, S = 16, 16, 4, 4


def _lora_graph(*, base_alpha=1.0, base_trans_b=0, b_attrs=None, b_shape=(RANK, OUT), seed=0) -> onnx.ModelProto:
    """``y = FusedMatMul(x, W) + FusedMatMul(x @ A, B, **b_attrs)`` on ``x [1, S, IN]`` (S == RANK, so
    a transposed operand still has shapes that line up; ``b_shape``: B's stored shape when it is not
    ``[RANK, OUT]`` or its transpose, for the transBatch layouts ORT runs only on rank >= 3)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((IN, OUT)) * 0.3).astype(np.float32)
    a = (rng.standard_normal((IN, RANK)) * 0.3).astype(np.float32)
    b = (rng.standard_normal((RANK, OUT)) * 0.3).astype(np.float32)
    b_attrs = dict(b_attrs or {})
    inits = [
        numpy_helper.from_array(np.ascontiguousarray(w.T) if base_trans_b else w, "W"),
        numpy_helper.from_array(a, "A"),
        numpy_helper.from_array(np.ascontiguousarray(b.T) if b_attrs.get("transB") else b.reshape(b_shape), "B"),
    ]
    nodes = [
        helper.make_node("FusedMatMul", ["x", "W"], ["base"], "base_proj", domain=MS, alpha=base_alpha, transB=base_trans_b),
        helper.make_node("MatMul", ["x", "A"], ["z"], "lora_A"),
        helper.make_node("FusedMatMul", ["z", "B"], ["delta"], "lora_B", domain=MS, **b_attrs),
        helper.make_node("Add", ["base", "delta"], ["y"], "lora_add"),
    ]
    graph = helper.make_graph(
        nodes, "fused_lora",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, S, IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(MS, 1)])
    model.ir_version = 10
    return model


def _x(seed=1):
    return np.random.default_rng(seed).standard_normal((1, S, IN)).astype(np.float32)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_handbuilt_alpha_and_trans_b(strategy):
    """Both the base projection and B as FusedMatMul with alpha and transB=1: exact, alpha counted once."""
    model = _lora_graph(base_alpha=0.5, base_trans_b=1, b_attrs={"alpha": 3.0, "transB": 1})
    x = _x()
    want = _session(model).run(None, {"x": x})[0]
    out, report = compile_model(model, CompileOptions(strategy=strategy))
    data = report.to_json()
    assert data["status"] == "ok" and len(data["sites"]) == 1 and data["verification"]["passed"]
    got = _session(ir.to_proto(out)).run(None, {"x": x})[0]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    w, a, b = inits["W"].T, inits["A"], inits["B"].T
    expected = {"strip": x @ (0.5 * w), "merge": x @ (0.5 * w + 3.0 * a @ b), "fuse": want}[strategy]
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(want, x @ (0.5 * w) + 3.0 * (x @ a) @ b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("layout", "b_shape"), [("transA", (RANK, OUT)), ("transBatchA", (1, RANK, OUT)), ("transBatchB", (RANK, 1, OUT))])
def test_handbuilt_other_layouts_left_alone(layout, b_shape):
    """A FusedMatMul that is not ``x @ W`` on a LoRA-shaped chain: rejected with the reason, outputs
    unchanged. (transA: ``z^T @ B``, [1, RANK, OUT] since S == RANK; transBatchA: z read as
    [S, 1, RANK], the add broadcasts to [S, S, OUT]; transBatchB: B [RANK, 1, OUT] read as [1, RANK, OUT].)"""
    model = _lora_graph(b_attrs={"alpha": 2.0, layout: 1}, b_shape=b_shape)
    x = _x()
    want = _session(model).run(None, {"x": x})[0]
    detection = detect(ir.from_proto(model))
    assert not [s for s in detection.sites if s.family == "lora"]
    assert any(layout in r.reason and "lora_B" in r.reason for r in detection.rejections), [r.reason for r in detection.rejections]
    # the generic linear family may still take the branch when it is linear token by token (it is
    # measured, not read off the attributes: transBatchB on B [RANK, 1, OUT]); then exactly
    for strategy in ("fuse", "merge"):
        out, report = compile_model(model, CompileOptions(strategy=strategy))
        data = report.to_json()
        assert data["status"] == "ok" and data["rejected"]
        assert all(site["family"] != "lora" for site in data["sites"])
        got = _session(ir.to_proto(out)).run(None, {"x": x})[0]
        assert got.shape == want.shape
        if data["sites"]:
            assert layout == "transBatchB"
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
        else:
            np.testing.assert_array_equal(got, want)
