"""Former home of the pipeline; these names stay importable from here.

Canonical: :class:`zflora_compile.options.CompileOptions`, :func:`zflora_compile.pipeline.compile_model`
(in memory, ONNX and torch.fx), :func:`zflora_compile.pipeline.detect`,
:func:`zflora_compile.build.compile_file` (files, target, latency gate).
"""

from __future__ import annotations

import onnx_ir as ir

from zflora_compile.build import compile_file
from zflora_compile.options import CompileOptions
from zflora_compile.pipeline import compile_model, detect

__all__ = ["CompileOptions", "compile_file", "compile_in_memory", "detect"]


def compile_in_memory(model, options: CompileOptions) -> tuple[ir.Model, dict]:
    """:func:`compile_model` on a copy of an ``onnx.ModelProto`` / ``onnx_ir.Model``; the report as JSON."""
    compiled, report = compile_model(model.clone() if isinstance(model, ir.Model) else model, options)
    return compiled, report.to_json()
