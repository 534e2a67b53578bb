"""``FuseAdaptersPass``: the compiler as an onnx-ir pass, for onnx-ir / onnxscript / Olive pass managers."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes

from zflora_compile.options import CompileOptions
from zflora_compile.pipeline import compile_model


class FuseAdaptersPass(onnx_ir.passes.InPlacePass):
    """Rewrite every adapter site with ``strategy`` (fuse, merge or strip), in place, verified.

    ``options`` are :class:`~zflora_compile.options.CompileOptions` fields (``verify``, ``atol``,
    ``rtol``, ``max_rank_ratio``, ``seed``). Verification runs both models in ONNX Runtime (the
    compiler's tolerances unless ``atol`` / ``rtol`` are given) and raises ``VerificationError``
    on a mismatch. ``modified`` is False when nothing was rewritten (no adapter site, or a model
    already fused). The last run's report is on ``self.report``.
    """

    def __init__(self, strategy: str = "fuse", **options):
        super().__init__()
        self.options = CompileOptions(strategy=strategy, **options)
        self.report = None

    def call(self, model: ir.Model) -> onnx_ir.passes.PassResult:
        model, self.report = compile_model(model, self.options)
        return onnx_ir.passes.PassResult(model, modified=len(self.report.plan) > 0)
