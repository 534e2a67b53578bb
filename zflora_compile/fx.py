"""The torch.fx front-end: ``detect_adapters`` / ``fuse_adapters`` on ExportedProgram and GraphModule.

``torch.export.ExportedProgram`` in, ``ExportedProgram`` out; ``torch.fx.GraphModule`` in,
``GraphModule`` out (see :mod:`zflora_compile.fx_program`). The pipeline is the ONNX one
(:func:`zflora_compile.pipeline.compile_model`): the same families, planner and report; the
rewrite is verified in PyTorch eager (:mod:`zflora_compile.fx_verify`) with the ONNX path's
tolerances.
"""

from __future__ import annotations

from zflora_compile.fx_program import detect_fx, graph_stats, is_fx_model
from zflora_compile.fx_verify import verify_fx
from zflora_compile.graph.records import DEFAULT_MAX_RANK_RATIO
from zflora_compile.options import CompileOptions
from zflora_compile.pipeline import compile_model

__all__ = ["detect_fx", "fuse_fx", "fuse_fx_with_report", "is_fx_model", "linear_op_count", "verify_fx"]


def linear_op_count(model) -> int:
    """Number of GEMM-like aten nodes (linear, mm, addmm, matmul, bmm) in the graph."""
    return graph_stats(model).gemm_count


def fuse_fx_with_report(
    model,
    strategy: str = "fuse",
    *,
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    max_rank_ratio: float = DEFAULT_MAX_RANK_RATIO,
    seed: int = 0,
):
    """Rewrite ``model`` (ExportedProgram or GraphModule; not modified); return ``(result, report JSON)``."""
    options = CompileOptions(strategy=strategy, verify=verify, atol=atol, rtol=rtol, max_rank_ratio=max_rank_ratio, seed=seed)
    result, report = compile_model(model, options)
    return result, report.to_json()


def fuse_fx(model, strategy: str = "fuse", **options):
    """:func:`fuse_fx_with_report` without the report."""
    return fuse_fx_with_report(model, strategy, **options)[0]
