"""The Python API: ``detect_adapters`` and ``fuse_adapters`` (same type out as in)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import onnx
import onnx_ir as ir

from zflora_compile.compile import CompileOptions, compile_file, compile_in_memory, default_output_dir, detect
from zflora_compile.model_io import load_model, to_ir
from zflora_compile.graph.records import DEFAULT_MAX_RANK_RATIO, Detection


def _is_fx(model) -> bool:
    """A ``torch.export.ExportedProgram`` or ``torch.fx.GraphModule`` (without importing torch)."""
    if "torch" not in sys.modules:
        return False
    from zflora_compile.fx import is_fx_model

    return is_fx_model(model)


def detect_adapters(model, *, max_rank_ratio: float = DEFAULT_MAX_RANK_RATIO) -> Detection:
    """Adapter sites in ``model`` (``onnx.ModelProto``, ``onnx_ir.Model``, a path, a
    ``torch.export.ExportedProgram`` or a ``torch.fx.GraphModule``).

    The result iterates over every site: ``result.sites`` (LoRA,
    :class:`~zflora_compile.graph.records.AdapterSite`), then ``result.widened`` (FFA / FBA / FFBA / zFLoRA,
    :class:`~zflora_compile.graph.records.WidenedSite`, one per widened projection);
    ``result.rejections`` lists what looked like an adapter but was left alone, with the reason.
    """
    if _is_fx(model):
        from zflora_compile.fx import detect_fx

        return detect_fx(model, max_rank_ratio=max_rank_ratio)
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    return detect(to_ir(model), max_rank_ratio)


def fuse_adapters(
    model,
    strategy: str = "fuse",
    *,
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    max_rank_ratio: float = DEFAULT_MAX_RANK_RATIO,
    output_dir: str | os.PathLike | None = None,
    force: bool = False,
    target: str = "ort",
):
    """Rewrite every adapter site of ``model`` with ``strategy`` (``fuse``, ``merge``, ``strip``).

    ``onnx.ModelProto`` in, ``onnx.ModelProto`` out; ``onnx_ir.Model`` in, ``onnx_ir.Model`` out
    (the input is not modified); a path in, the path of the written ``model.onnx`` out (into
    ``output_dir``, by default ``<stem>_<strategy>`` beside the input). The rewrite is verified
    in ONNX Runtime unless ``verify=False``; a mismatch raises ``VerificationError``.

    ``torch.export.ExportedProgram`` in, a new ``ExportedProgram`` out; ``torch.fx.GraphModule`` in,
    a new ``GraphModule`` out (see :mod:`zflora_compile.fx`). These are verified in PyTorch eager
    (same tolerances); ``output_dir``, ``force`` and ``target`` do not apply to them.
    """
    if _is_fx(model):
        from zflora_compile.fx import fuse_fx

        return fuse_fx(model, strategy, verify=verify, atol=atol, rtol=rtol, max_rank_ratio=max_rank_ratio)
    options = CompileOptions(strategy=strategy, verify=verify, atol=atol, rtol=rtol, max_rank_ratio=max_rank_ratio, force=force, target=target)
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        out = Path(output_dir) if output_dir is not None else default_output_dir(path, strategy)
        compile_file(path, out, options)
        return out / "model.onnx"
    compiled, _ = compile_in_memory(model, options)
    if isinstance(model, onnx.ModelProto):
        return ir.to_proto(compiled)
    return compiled
