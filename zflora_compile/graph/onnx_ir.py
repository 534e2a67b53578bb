"""The graph view and emitter over onnx-ir (transitional wrapper; being rewritten)."""

from __future__ import annotations

import collections

import onnx_ir as ir

GEMM_OPS = ("MatMul", "Gemm")


class OnnxGraph:
    """An onnx-ir model seen by the families (detect) and rewritten by them (emit)."""

    ir = "onnx"

    def __init__(self, model: ir.Model):
        self.model = model

    def op_counts(self) -> dict[str, int]:
        return dict(sorted(collections.Counter(n.op_type for n in self.model.graph.all_nodes()).items()))

    def gemm_count(self) -> int:
        counts = self.op_counts()
        return sum(counts.get(op, 0) for op in GEMM_OPS)
