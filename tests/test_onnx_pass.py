"""``FuseAdaptersPass``: the compiler as an onnx-ir pass (in place, verified, idempotent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from zflora_compile import FuseAdaptersPass, VerificationError

try:
    from graphs import Proj, gemm_count, lora_projection_graph, qkv
except ImportError:  # tests/ became a package
    from tests.graphs import Proj, gemm_count, lora_projection_graph, qkv

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_llama_lora.onnx"


def run_ort(model, feeds: dict) -> list[np.ndarray]:
    proto = model if not isinstance(model, ir.Model) else ir.to_proto(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize(("strategy", "rewrites", "gemms"), [("fuse", 1, 2), ("merge", 3, 3)])
def test_pass_rewrites_in_place_and_matches_onnx_runtime(strategy, rewrites, gemms):
    proto = lora_projection_graph(projections=qkv()).proto()
    model = ir.serde.deserialize_model(proto)
    assert gemm_count(model) == 9
    fuse = FuseAdaptersPass(strategy)
    result = fuse(model)
    assert result.modified and result.model is model
    assert len(fuse.report.plan) == rewrites and gemm_count(model) == gemms
    assert fuse.report.verification["passed"] is True
    feeds = {"hidden": np.random.default_rng(3).standard_normal((1, 11, 16)).astype(np.float32)}
    for expected, got in zip(run_ort(proto, feeds), run_ort(model, feeds)):
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_pass_does_not_fire_without_adapters():
    model = ir.serde.deserialize_model(lora_projection_graph(projections=[Proj(rank=None), Proj("k_proj", rank=None)]).proto())
    before = [n.op_type for n in model.graph]
    result = FuseAdaptersPass()(model)
    assert not result.modified and [n.op_type for n in model.graph] == before


def test_pass_is_idempotent_on_a_real_export_and_runs_in_a_pass_manager():
    model = ir.load(EXAMPLE)
    manager = ir.passes.PassManager([FuseAdaptersPass("fuse")])
    assert manager(model).modified and gemm_count(model) == 21
    again = FuseAdaptersPass("fuse")
    assert not again(model).modified and gemm_count(model) == 21
    assert again.report.to_json()["sites"] == []


@pytest.mark.parametrize("verify_mode", ["full", "regions"])
def test_pass_raises_on_a_mismatch(verify_mode):
    model = ir.serde.deserialize_model(lora_projection_graph(projections=qkv()).proto())
    with pytest.raises(VerificationError, match="verification failed") as caught:
        FuseAdaptersPass("fuse", atol=-1.0, rtol=0.0, verify_mode=verify_mode)(model)  # no difference is below a negative bound
    assert caught.value.report["verification"]["mode"] == verify_mode
    assert caught.value.report["verification"]["passed"] is False and caught.value.report["status"] == "verification_failed"
