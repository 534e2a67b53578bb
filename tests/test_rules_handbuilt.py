"""The LoRA rule on hand-built graphs: what it must rewrite, what it must leave alone.

In the manner of onnxscript's rewriter tests and TVM's Relax pass tests: for each spelling of
the pattern a "before" graph (``tests/graphs.py``), the number of sites found, the rewrite
checked numerically against ONNX Runtime on seeded inputs at several sequence lengths (the
references are built here, independently of the package), the GEMM count before and after, and
idempotence; then the near-misses, each of which must be left alone with one rejection saying why.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import zflora_compile
from zflora_compile import cli, detect_adapters, fuse_adapters
from zflora_compile.compile import CompileOptions, compile_in_memory
from zflora_compile.families import lora

try:
    from graphs import Proj, gemm_count, lora_projection_graph, qkv
except ImportError:  # tests/ became a package
    from tests.graphs import Proj, gemm_count, lora_projection_graph, qkv

SEQ_LENS = (1, 5, 13)
STRATEGIES = ("fuse", "merge", "strip")
FP32_TOL = (1e-5, 1e-5)
FP16_TOL = (1e-2, 1e-2)
_NP_OF_ELEM = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}


# ----------------------------------------------------------------------------- helpers


def _proto(model) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)


def _session(model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])


def _feeds(model, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in _proto(model).graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else seq for d in value.type.tensor_type.shape.dim]
        dtype = _NP_OF_ELEM[value.type.tensor_type.elem_type]
        feeds[value.name] = (rng.standard_normal(dims) * 0.5).astype(dtype)
    return feeds


def assert_outputs_match(candidate, reference, tol=FP32_TOL, seqs=SEQ_LENS) -> None:
    """Same inputs, same outputs (by name and order), every output close, at several lengths."""
    cand, ref = _session(candidate), _session(reference)
    assert sorted(i.name for i in cand.get_inputs()) == sorted(i.name for i in ref.get_inputs())
    names = [o.name for o in ref.get_outputs()]
    assert [o.name for o in cand.get_outputs()] == names
    atol, rtol = tol
    for i, seq in enumerate(seqs):
        feeds = _feeds(reference, seq, seed=100 + i)
        expected = ref.run(names, feeds)
        actual = cand.run(names, feeds)
        for name, want, got in zip(names, expected, actual):
            assert got.shape == want.shape, (name, seq)
            assert got.dtype == want.dtype, (name, seq)
            np.testing.assert_allclose(
                got.astype(np.float64), want.astype(np.float64), atol=atol, rtol=rtol, err_msg=f"output {name!r}, seq={seq}"
            )


def _serialized(model) -> bytes:
    return _proto(model).SerializeToString()


# ----------------------------------------------------------------------------- positive cases

POSITIVE = {
    "matmul_3d": dict(),
    "matmul_2d": dict(activation_rank=2),
    "gemm_base_transB": dict(base_op="Gemm", activation_rank=2),
    "gemm_lowrank_transB": dict(lowrank_op="Gemm", activation_rank=2),
    "gemm_everywhere": dict(base_op="Gemm", lowrank_op="Gemm", activation_rank=2),
    "bias_add": dict(projections=[Proj(bias="add")]),
    "bias_add_bias_first": dict(projections=[Proj(bias="add_rev")]),
    "bias_gemm_input": dict(base_op="Gemm", activation_rank=2, projections=[Proj(bias="gemm")]),
    "scale_div": dict(scale_op="Div", projections=[Proj(scale=4.0)]),
    "scale_between_a_and_b": dict(scale_pos="between", projections=[Proj(scale=1.7)]),
    "scale_div_between": dict(scale_op="Div", scale_pos="between", projections=[Proj(scale=0.25)]),
    "scale_const_first": dict(scale_const_first=True, projections=[Proj(scale=1.7)]),
    "no_scale": dict(scale_op=None),
    "chain_first": dict(chain_first=True),
    "fp16_chain_on_fp32_base": dict(chain_dtype="float16"),
    "fp16_model": dict(dtype="float16"),
    "fp32_chain_in_fp16_model": dict(dtype="float16", chain_dtype="float32"),
    "weights_behind_transpose": dict(weight_form="transpose"),
    "weights_behind_transpose_gemm": dict(weight_form="transpose", base_op="Gemm", lowrank_op="Gemm", activation_rank=2),
    "lowrank_weights_constant_nodes": dict(weight_form="constant", base_weight_form="initializer"),
    "all_weights_constant_nodes": dict(weight_form="constant"),
    "site_not_a_graph_output": dict(site_outputs=False),
    "qkv_group": dict(projections=qkv()),
    "qkv_group_mixed_bias": dict(projections=qkv(biases=("add", None, "add_rev"))),
    "qkv_only_q_and_v_adapted": dict(projections=qkv(ranks=(2, None, 4))),
    "two_groups": dict(projections=[*qkv(), Proj("o_proj", out=16, rank=3, scale=0.5, reads="other")]),
    "kitchen_sink": dict(
        base_op="Gemm",
        activation_rank=2,
        weight_form="transpose",
        scale_op="Div",
        scale_pos="between",
        chain_first=True,
        chain_dtype="float16",
        site_outputs=False,
        projections=qkv(scales=(2.0, 0.5, 4.0), biases=("gemm", "add_rev", None)),
    ),
}


def _tol(kwargs: dict) -> tuple[float, float]:
    if kwargs.get("dtype") == "float16":
        return FP16_TOL
    if kwargs.get("chain_dtype") == "float16":
        return (2e-3, 2e-3)  # the original may round the chain to fp16; the rewrite keeps it in fp32
    return FP32_TOL


def _expected_counts(graph) -> tuple[int, int, int]:
    """(plain projections, adapted projections, groups = distinct inputs of adapted projections)."""
    plain = sum(1 for p in graph.projections if p.A is None and p.W is not None)
    adapted = graph.adapted
    return plain, len(adapted), len({p.spec.reads for p in adapted})


@pytest.mark.parametrize("variant", POSITIVE)
def test_detect_finds_every_site(variant):
    kwargs = POSITIVE[variant]
    graph = lora_projection_graph(**kwargs)
    detection = detect_adapters(graph.proto())
    assert detection.rejections == []
    adapted = graph.adapted
    assert len(detection.sites) == len(adapted)
    by_label = {s.label: s for s in detection.sites}
    assert sorted(by_label) == sorted(f"layers.0.self_attn.{p.name}" for p in adapted)
    scale_rel = 1e-3 if kwargs.get("chain_dtype", kwargs.get("dtype")) == "float16" else 1e-6
    for p in adapted:
        site = by_label[f"layers.0.self_attn.{p.name}"]
        assert site.family == "lora"
        assert (site.in_features, site.out_features, site.rank) == (16, p.spec.out, p.spec.rank)
        assert site.scale == pytest.approx(p.scale, rel=scale_rel)
        assert site.has_bias == (p.bias is not None)
        assert site.dtype == kwargs.get("dtype", "float32")
        # the weights the site exposes are [in, out], whatever the graph's layout
        np.testing.assert_array_equal(site.weight(), p.W)
        np.testing.assert_array_equal(site.lora_a(), p.A)
        np.testing.assert_array_equal(site.lora_b(), p.B)
        if p.bias is not None:
            np.testing.assert_array_equal(site.bias(), p.bias)
    # one group per input tensor; sites reading the same tensor share it
    for p in adapted:
        for q in adapted:
            same = by_label[f"layers.0.self_attn.{p.name}"].group == by_label[f"layers.0.self_attn.{q.name}"].group
            assert same == (p.spec.reads == q.spec.reads), (p.name, q.name)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("variant", POSITIVE)
def test_rewrite_is_exact_and_idempotent(variant, strategy):
    kwargs = POSITIVE[variant]
    graph = lora_projection_graph(**kwargs)
    proto = graph.proto()
    before = proto.SerializeToString()
    plain, adapted, groups = _expected_counts(graph)
    assert gemm_count(proto) == plain + 3 * adapted

    out = fuse_adapters(proto, strategy=strategy)

    assert isinstance(out, onnx.ModelProto)
    assert proto.SerializeToString() == before, "fuse_adapters modified its input"
    onnx.checker.check_model(out, full_check=True)
    if strategy == "strip":  # reference: the same graph and weights with every B = 0
        reference = lora_projection_graph(**kwargs, zero_b=True).proto()
    else:
        reference = proto
    assert_outputs_match(out, reference, _tol(kwargs))
    expected_gemms = plain + (2 * groups if strategy == "fuse" else adapted)
    assert gemm_count(out) == expected_gemms

    # idempotence: nothing left to find, and a second pass changes nothing
    assert detect_adapters(out).sites == []
    again = fuse_adapters(out, strategy=strategy)
    assert gemm_count(again) == expected_gemms
    assert_outputs_match(again, out, FP32_TOL if kwargs.get("dtype") != "float16" else FP16_TOL)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_onnx_ir_model_in_onnx_ir_model_out_input_untouched(strategy):
    graph = lora_projection_graph(projections=qkv(biases=("add", None, None)))
    model = graph.model
    before = _serialized(model)
    nodes_before = list(model.graph)
    initializers_before = dict(model.graph.initializers)

    out = fuse_adapters(model, strategy=strategy)

    assert isinstance(out, ir.Model)
    assert out is not model
    assert list(model.graph) == nodes_before
    assert dict(model.graph.initializers) == initializers_before
    assert _serialized(model) == before, "fuse_adapters modified its onnx_ir.Model input"
    reference = lora_projection_graph(projections=qkv(biases=("add", None, None)), zero_b=strategy == "strip").model
    assert_outputs_match(out, reference)
    assert gemm_count(out) == (2 if strategy == "fuse" else 3)


def test_fused_group_layout():
    """fuse: ONE wide GEMM [in, D + R] and ONE block-diagonal [R, D] GEMM for Q, K, V together."""
    graph = lora_projection_graph(projections=qkv())
    out = fuse_adapters(graph.proto(), strategy="fuse")
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    matmuls = [n for n in out.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 2
    shapes = sorted(weights[n.input[1]].shape for n in matmuls)
    assert shapes == sorted([(16, 16 + 8 + 24 + 2 + 3 + 4), (2 + 3 + 4, 16 + 8 + 24)])
    lowrank = next(weights[n.input[1]] for n in matmuls if weights[n.input[1]].shape == (9, 48))
    expected = np.zeros((9, 48), np.float32)
    rows = cols = 0
    for p in graph.adapted:
        expected[rows : rows + p.A.shape[1], cols : cols + p.W.shape[1]] = p.B * np.float32(p.scale)
        rows, cols = rows + p.A.shape[1], cols + p.W.shape[1]
    np.testing.assert_allclose(lowrank, expected, rtol=1e-6, atol=0)


def test_fused_output_reports_no_spurious_rejection():
    """The compiler's own fused form (MatMul -> Split -> MatMul) is not an adapter 'with a nonlinearity'."""
    out = fuse_adapters(lora_projection_graph(projections=qkv()).proto(), strategy="fuse")
    detection = detect_adapters(out)
    assert detection.sites == []
    assert [r.reason for r in detection.rejections] == []


# ----------------------------------------------------------------------------- must not fire

NEGATIVE = {
    "relu_between_a_and_b": (dict(projections=[Proj(between="Relu")]), ["Relu", "not linear"]),
    "tanh_between_a_and_b": (dict(projections=[Proj(between="Tanh")]), ["Tanh", "not linear"]),
    "W_is_a_graph_input": (dict(projections=[Proj(graph_input="W")]), ["base weight", "not constant", "graph input"]),
    "chain_reads_another_tensor": (dict(projections=[Proj(chain_reads="other")]), ["reads 'other'", "reads 'hidden'"]),
    "chain_added_to_raw_input": (dict(projections=[Proj(out=16, add_to_input=True)]), ["not to a projection"]),
    "chain_added_to_raw_input_gemm": (
        dict(base_op="Gemm", lowrank_op="Gemm", activation_rank=2, projections=[Proj(out=16, add_to_input=True)]),
        ["not to a projection"],
    ),
    "rank_not_small": (dict(projections=[Proj(out=8, rank=6)]), ["rank 6", "not small"]),
    "B_narrower_than_W": (dict(projections=[Proj(out=8, b_out=1)]), ["shapes do not line up", "B [2, 1]"]),
    "lowrank_intermediate_also_used": (dict(projections=[Proj(z_extra_use=True)]), ["low-rank intermediate", "also used"]),
    "base_output_also_used": (dict(projections=[Proj(base_extra_use=True)]), ["base projection output", "also used"]),
}
#: what the accounting makes of each LoRA near-miss once the LoRA family has rejected it:
#: "unrecognized" (adapter-shaped structure left in the model: reported, and strip refuses),
#: "linear" (a linear branch the generic family merges and strips), "linear-kept" (linear; merge
#: keeps it, as its projection's output has another reader; strip strips it). An adapter whose own
#: intermediate is read elsewhere is unrecognised: without it, that reader has no defined input
ACCOUNTED = {
    "relu_between_a_and_b": "unrecognized",
    "tanh_between_a_and_b": "unrecognized",
    "W_is_a_graph_input": "unrecognized",
    "chain_reads_another_tensor": "unrecognized",
    "chain_added_to_raw_input": "unrecognized",
    "chain_added_to_raw_input_gemm": "unrecognized",
    "rank_not_small": "linear",
    "B_narrower_than_W": "unrecognized",
    "lowrank_intermediate_also_used": "unrecognized",
    "base_output_also_used": "linear-kept",
}


@pytest.mark.parametrize("variant", NEGATIVE)
def test_must_not_fire_detection(variant):
    """The LoRA family rejects each near-miss with its reason; the accounting then says what it is."""
    kwargs, reason_parts = NEGATIVE[variant]
    detection = detect_adapters(lora_projection_graph(**kwargs).proto())
    assert detection.sites == [] and detection.widened == []
    assert len(detection.rejections) == 1, detection.rejections
    reason = detection.rejections[0].reason
    for part in reason_parts:
        assert part in reason, f"{part!r} not in rejection reason {reason!r}"
    outcome = ACCOUNTED[variant]
    assert len(detection.linear) == outcome.startswith("linear")
    assert len(detection.unrecognized) == (outcome == "unrecognized")
    assert detection.accounting.branches_found == 1
    assert detection.accounting.branches_recognised == outcome.startswith("linear")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("variant", NEGATIVE)
def test_must_not_fire_leaves_graph_alone(variant, strategy):
    """fuse never touches a near-miss; merge folds only a linear one; strip removes a linear one
    and refuses (exit 2, nothing written) while an unrecognised one remains."""
    kwargs, _ = NEGATIVE[variant]
    graph = lora_projection_graph(**kwargs)
    proto = graph.proto()
    outcome = ACCOUNTED[variant]
    if strategy == "strip" and outcome == "unrecognized":
        with pytest.raises(zflora_compile.errors.UnrecognizedAdapterError, match="strip cannot derive the base model") as error:
            fuse_adapters(proto, strategy=strategy)
        assert error.value.exit_code == 2
        return
    out = fuse_adapters(proto, strategy=strategy)
    rewritten = (strategy == "merge" and outcome == "linear") or (strategy == "strip" and outcome.startswith("linear"))
    if not rewritten:
        assert gemm_count(out) == gemm_count(proto)
        assert sorted(n.op_type for n in out.graph.node) == sorted(n.op_type for n in proto.graph.node)
        assert_outputs_match(out, proto)
    elif strategy == "merge":
        assert gemm_count(out) == 1  # merged into W
        assert_outputs_match(out, proto)
    else:  # strip: the base model, built independently (same weights, B = 0)
        assert_outputs_match(out, lora_projection_graph(**kwargs, zero_b=True).proto())


def test_div_with_constant_numerator_is_not_a_scale():
    """``c / chain`` is not ``s * chain``: no site, graph unchanged."""
    proto = lora_projection_graph(scale_op="Div", scale_const_first=True, projections=[Proj(scale=0.5)]).proto()
    assert detect_adapters(proto).sites == []
    out = fuse_adapters(proto, strategy="merge")
    assert gemm_count(out) == gemm_count(proto) == 3
    assert_outputs_match(out, proto)


def test_rank_limit_is_the_max_rank_ratio_option():
    proto = lora_projection_graph(projections=[Proj(out=8, rank=6)]).proto()
    assert detect_adapters(proto).sites == []
    assert [s.rank for s in detect_adapters(proto, max_rank_ratio=0.8).sites] == [6]
    out = fuse_adapters(proto, strategy="merge", max_rank_ratio=0.8)
    assert gemm_count(out) == 1
    assert_outputs_match(out, proto)


def test_rejected_site_next_to_good_ones():
    """K has a Relu in its chain: Q and V are fused as a group of two, K is left as it was."""
    projections = qkv()
    projections[1].between = "Relu"
    graph = lora_projection_graph(projections=projections)
    proto = graph.proto()
    detection = detect_adapters(proto)
    assert sorted(s.label for s in detection.sites) == ["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj"]
    assert len(detection.rejections) == 1 and "Relu" in detection.rejections[0].reason
    out = fuse_adapters(proto, strategy="fuse")
    assert gemm_count(out) == 2 + 3
    assert_outputs_match(out, proto)


# ----------------------------------------------------------------------------- verification


def _drop_scale(site):
    return site.lora_b().astype(np.float32)  # the planner's job is B * s


@pytest.mark.parametrize("verify_mode", ["full", "regions"])
@pytest.mark.parametrize("strategy", ["fuse", "merge"])
def test_verification_catches_a_wrong_rewrite(monkeypatch, strategy, verify_mode):
    proto = lora_projection_graph(projections=qkv()).proto()
    fuse_adapters(proto, strategy=strategy, verify_mode=verify_mode)  # control: passes as it is
    monkeypatch.setattr(lora, "scaled_b_fp32", _drop_scale)
    with pytest.raises(zflora_compile.VerificationError, match="verification failed") as caught:
        fuse_adapters(proto, strategy=strategy, verify_mode=verify_mode)
    assert caught.value.report["verification"]["mode"] == verify_mode


@pytest.mark.parametrize("verify_mode", ["full", "regions"])
def test_strip_is_verified_against_the_zero_b_reference(monkeypatch, verify_mode):
    """A strip that forgets to strip is caught: the reference is the input with B = 0, not the input."""
    proto = lora_projection_graph(projections=qkv()).proto()
    monkeypatch.setattr(lora.StripSite, "emit", lambda self, graph, state: None)
    with pytest.raises(zflora_compile.VerificationError, match="still carries"):  # the fresh detection catches it first
        fuse_adapters(proto, strategy="strip", verify_mode=verify_mode)


@pytest.mark.parametrize("verify_mode", ["full", "regions"])
def test_cli_wrong_rewrite_exits_1_and_writes_nothing(tmp_path, monkeypatch, capsys, verify_mode):
    source = tmp_path / "in" / "model.onnx"
    source.parent.mkdir()
    onnx.save(lora_projection_graph(projections=qkv()).proto(), source)
    assert cli.main([str(source), "-o", str(tmp_path / "ok"), "-q", "--verify", verify_mode]) == 0  # control
    assert (tmp_path / "ok" / "model.onnx").is_file()
    capsys.readouterr()

    monkeypatch.setattr(lora, "scaled_b_fp32", _drop_scale)
    out = tmp_path / "out"
    assert cli.main([str(source), "-o", str(out), "-q", "--verify", verify_mode]) == 1
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "ok"], "staging directory left behind"
    assert "verification failed" in capsys.readouterr().err


def test_verifier_feeds_the_sequence_lengths_it_reports():
    """A dynamic ``seq`` axis on a float input must be exercised at the lengths the report names."""
    _, report = compile_in_memory(lora_projection_graph().proto(), CompileOptions())
    cases = report["verification"]["cases"]
    assert len(cases) > 1
    for case in cases:
        seq = int(re.search(r"seq=(\d+)", case["case"]).group(1))
        assert case["inputs"]["hidden"] == [1, seq, 16], case


# ----------------------------------------------------------------------------- fp16


def _fp16_graph():
    return lora_projection_graph(dtype="float16", projections=[Proj(out=24, rank=4, scale=1.75)], seed=3)


def test_fp16_model_verifies_with_fp16_tolerance():
    proto = _fp16_graph().proto()
    for strategy in STRATEGIES:
        _, report = compile_in_memory(proto, CompileOptions(strategy=strategy))
        verification = report["verification"]
        assert verification["passed"] is True
        for case in verification["cases"]:
            for outcome in case["outputs"].values():
                assert outcome["dtype"] == "float16"
                assert (outcome["atol"], outcome["rtol"]) == FP16_TOL


def test_fp16_merged_weight_is_accumulated_in_fp32():
    graph = _fp16_graph()
    (p,) = graph.adapted
    out = fuse_adapters(graph.proto(), strategy="merge")
    (node,) = [n for n in out.graph.node if n.op_type in ("MatMul", "Gemm")]
    merged = next(onnx.numpy_helper.to_array(i) for i in out.graph.initializer if i.name == node.input[1])
    assert merged.dtype == np.float16 and merged.shape == (16, 24)

    W, A, B = (m.astype(np.float32) for m in (p.W, p.A, p.B))
    s = np.float32(p.scale)
    fp32_ways = [(W + A @ (B * s)).astype(np.float16), (W + (A @ B) * s).astype(np.float16)]
    in_fp16 = p.W + (p.A @ p.B) * np.float16(p.scale)
    assert not np.array_equal(in_fp16, fp32_ways[0]), "test cannot tell fp16 from fp32 accumulation"
    assert np.all((merged == fp32_ways[0]) | (merged == fp32_ways[1]))


def test_fp16_fused_lowrank_block_is_scaled_in_fp32():
    graph = _fp16_graph()
    (p,) = graph.adapted
    out = fuse_adapters(graph.proto(), strategy="fuse")
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    lowrank = [weights[n.input[1]] for n in out.graph.node if n.op_type == "MatMul" and weights.get(n.input[1], np.empty(0)).shape == (4, 24)]
    assert len(lowrank) == 1 and lowrank[0].dtype == np.float16
    np.testing.assert_array_equal(lowrank[0], (p.B.astype(np.float32) * np.float32(p.scale)).astype(np.float16))
