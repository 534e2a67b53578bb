"""The families this compiler did not know before (DoRA, GAWS, GAWS-D, factored low-rank, any linear
branch) and the accounting that keeps strip honest, on hand-built graphs (tests/branch_graphs.py).

References are numpy, from the weights the builders drew, never from the package: merge must
compute ``x @ (W + dW) + b`` with the dW the builder *meant*; strip must compute ``x @ W + b``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from zflora_compile import cli, errors
from zflora_compile.families import gaws, lowrank
from zflora_compile.options import CompileOptions
from zflora_compile.pipeline import compile_model, detect

try:
    import branch_graphs as bg
except ImportError:  # pragma: no cover - run from the repository root
    from tests import branch_graphs as bg

#: the family each linear builder's branch must be recognised as
FAMILY = {
    "gaws": "gaws",
    "gaws_d": "gaws_d",
    "lokr": "linear",
    "loha": "linear",
    "vera": "lowrank",
    "two_loras": "linear",
    "dora": "dora",
    "head_mixing": "lowrank",
}
#: GEMMs of the fused form (2: one widened / grouped pair; unchanged where a family has no fused form)
FUSED_GEMMS = {"gaws": 2, "gaws_d": 2, "lokr": 2, "loha": 4, "vera": 2, "two_loras": 5, "dora": 2, "head_mixing": 2}
TOL = 2e-5


def _run(model, x: np.ndarray, name: str = "hidden") -> np.ndarray:
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {name: x})[0]


def _x(seed: int = 3, batch: int = 2, seq: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, seq, bg.IN)).astype(np.float32)


def _gemms(model) -> int:
    graph = model.graph if isinstance(model, onnx.ModelProto) else ir.to_proto(model).graph
    return sum(n.op_type in ("MatMul", "Gemm") for n in graph.node)


@pytest.mark.parametrize("case", sorted(bg.LINEAR))
def test_each_family_is_recognised_and_accounted(case):
    model, _ = bg.LINEAR[case]()
    detection = detect(ir.from_proto(model))
    assert [s.family for s in detection.all_sites] == [FAMILY[case]]
    tally = detection.accounting
    assert tally.branches_found == tally.branches_recognised == (2 if case == "two_loras" else 1)
    assert not detection.unrecognized


@pytest.mark.parametrize("case", sorted(bg.LINEAR))
def test_merge_and_strip_equal_the_independent_references(case):
    model, numbers = bg.LINEAR[case]()
    x = _x()
    bias = numbers.bias if numbers.bias is not None else 0.0
    merged, report = compile_model(model, CompileOptions(strategy="merge"))
    np.testing.assert_allclose(_run(merged, x), x @ (numbers.W + numbers.delta) + bias, atol=TOL, rtol=1e-5)
    assert _gemms(merged) == 1 and report.verification["passed"]
    stripped, report = compile_model(model, CompileOptions(strategy="strip"))
    np.testing.assert_allclose(_run(stripped, x), x @ numbers.W + bias, atol=TOL, rtol=1e-5)
    assert _gemms(stripped) == 1 and report.verification["passed"]


@pytest.mark.parametrize("case", sorted(bg.LINEAR))
def test_fuse_is_exact_and_never_costs_a_gemm(case):
    model, numbers = bg.LINEAR[case]()
    x = _x()
    fused, report = compile_model(model, CompileOptions(strategy="fuse"))
    bias = numbers.bias if numbers.bias is not None else 0.0
    np.testing.assert_allclose(_run(fused, x), x @ (numbers.W + numbers.delta) + bias, atol=TOL, rtol=1e-5)
    assert _gemms(fused) == FUSED_GEMMS[case] <= _gemms(model)
    if FAMILY[case] in ("linear", "gaws", "gaws_d"):  # no separable fused form / a lone GAWS projection: kept, and the plan says why
        assert report.plan.to_json()["unfused_sites"]


@pytest.mark.parametrize("case", ["dora", "vera", "head_mixing"])
def test_fusing_the_fused_form_again_changes_nothing(case):
    model, _ = bg.LINEAR[case]()
    once, _ = compile_model(model, CompileOptions(strategy="fuse"))
    detection = detect(ir.from_proto(ir.to_proto(once)))
    assert not detection.all_sites
    twice, report = compile_model(ir.to_proto(once), CompileOptions(strategy="fuse"))
    assert len(report.plan) == 0 and _gemms(twice) == _gemms(once)


def test_embedding_lora_merges_into_the_table_and_strips_to_it():
    model, numbers = bg.embedding_lora()
    ids = np.array([[0, 3, 9, 3], [1, 1, 7, 2]], dtype=np.int64)
    detection = detect(ir.from_proto(model))
    assert [(s.family, s.kind) for s in detection.linear] == [("linear", "embedding")]
    merged, _ = compile_model(model, CompileOptions(strategy="merge"))
    np.testing.assert_allclose(_run(merged, ids, "ids"), (numbers.table + numbers.delta)[ids], atol=TOL)
    stripped, _ = compile_model(model, CompileOptions(strategy="strip"))
    np.testing.assert_allclose(_run(stripped, ids, "ids"), numbers.table[ids], atol=0)


@pytest.mark.parametrize("case", sorted(bg.NOT_LINEAR))
def test_a_branch_that_is_not_linear_is_reported_and_strip_refuses(case, tmp_path):
    model, _ = bg.NOT_LINEAR[case]()
    detection = detect(ir.from_proto(model))
    assert not detection.all_sites
    assert [u.kind for u in detection.unrecognized] == ["branch"]
    assert detection.accounting.branches_found == 1 and detection.accounting.branches_recognised == 0
    x = _x(seq=4)
    for strategy in ("fuse", "merge"):  # left as it was, reported (token_pairs only runs on an even sequence)
        out, report = compile_model(model, CompileOptions(strategy=strategy, verify=case != "token_pairs"))
        assert len(report.plan) == 0 and report.to_json()["unrecognized"]
        np.testing.assert_array_equal(_run(out, x), _run(model, x))
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    code = cli.main([str(path), "-o", str(tmp_path / "out"), "--strategy", "strip", "-q"])
    assert code == 2 and not (tmp_path / "out").exists()


def test_not_linear_reasons_name_what_is_wrong():
    reasons = {case: detect(ir.from_proto(build()[0])).unrecognized[0].reason for case, build in bg.NOT_LINEAR.items()}
    assert "not linear token by token" in reasons["relu_between"]
    assert "not linear token by token" in reasons["constant_term"]
    assert "one row per token" in reasons["token_mixing"]
    assert "not linear token by token" in reasons["token_pairs"]


def test_layer_scale_is_reported_not_rewritten_and_strip_needs_keep_scales():
    """A base model's LayerScale and an IA3 adapter look the same: never rewritten; strip refuses
    unless the user declares per-column scales part of the base (then it keeps them)."""
    model, _ = bg.layer_scale()
    detection = detect(ir.from_proto(model))
    assert not detection.all_sites and [u.kind for u in detection.unrecognized] == ["scale"]
    assert detection.accounting.scales_found == 1 and detection.accounting.scales_recognised == 0
    with pytest.raises(errors.UnrecognizedAdapterError, match="--keep-scales"):
        compile_model(model, CompileOptions(strategy="strip"))
    kept, _ = compile_model(model, CompileOptions(strategy="strip", keep_scales=True))
    np.testing.assert_array_equal(_run(kept, _x()), _run(model, _x()))


def test_g_equal_one_is_no_gaws():
    """A dense update has no Kronecker structure: gaws must not fire (the generic family decides)."""
    rng = np.random.default_rng(0)
    assert gaws.kron_groups(rng.standard_normal((8, 12))) is None
    assert gaws.kron_identity(rng.standard_normal((8, 12))) is None
    block = rng.standard_normal((2, 3))
    assert gaws.kron_groups(np.kron(np.eye(4), block))[0] == 4
    assert gaws.kron_identity(np.kron(block, np.eye(4)))[0] == 4
    assert gaws.kron_groups(np.kron(np.eye(4), block) + 1e-3 * rng.standard_normal((8, 12))) is None


def test_block_diagonal_factors_are_read_from_the_numbers():
    rng = np.random.default_rng(1)
    assert lowrank.block_count(np.kron(np.eye(2), rng.standard_normal((2, 16)))) == 2
    assert lowrank.block_count(rng.standard_normal((4, 32))) == 1


def test_two_adapters_at_once_are_both_stripped():
    """Strip used to keep the second of two active adapters; now both are one linear site."""
    model, numbers = bg.two_loras()
    stripped, report = compile_model(model, CompileOptions(strategy="strip"))
    x = _x()
    np.testing.assert_allclose(_run(stripped, x), x @ numbers.W + numbers.bias, atol=TOL)
    assert report.detection.linear[0].branches == 2
