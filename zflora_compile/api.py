"""The Python API: ``detect_adapters`` and ``fuse_adapters`` (same type out as in)."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx_ir as ir

from zflora_compile.build import compile_file, default_output_dir
from zflora_compile.graph.records import DEFAULT_MAX_RANK_RATIO, Detection
from zflora_compile.model_io import load_model, to_ir
from zflora_compile.options import CompileOptions, check_max_rank_ratio
from zflora_compile.pipeline import compile_model, detect, is_fx_model


def detect_adapters(model, *, max_rank_ratio: float = DEFAULT_MAX_RANK_RATIO) -> Detection:
    """Adapter sites in ``model`` (``onnx.ModelProto``, ``onnx_ir.Model``, a path, a
    ``torch.export.ExportedProgram`` or a ``torch.fx.GraphModule``).

    The result iterates over every site: ``result.sites`` (LoRA,
    :class:`~zflora_compile.graph.records.AdapterSite`), then ``result.widened`` (FFA / FBA / FFBA / zFLoRA,
    :class:`~zflora_compile.graph.records.WidenedSite`, one per widened projection);
    ``result.rejections`` lists what looked like an adapter but was left alone, with the reason.
    """
    check_max_rank_ratio(max_rank_ratio)
    if is_fx_model(model):
        from zflora_compile.fx_program import detect_fx

        return detect_fx(model, max_rank_ratio=max_rank_ratio)
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    return detect(to_ir(model), max_rank_ratio)


def fuse_adapters(
    model,
    strategy: str = "fuse",
    *,
    verify: bool = True,
    verify_mode: str = "auto",
    atol: float | None = None,
    rtol: float | None = None,
    max_rank_ratio: float = DEFAULT_MAX_RANK_RATIO,
    output_dir: str | os.PathLike | None = None,
    force: bool = False,
    target: str = "ort",
    max_rank: int | None = None,
    adapter_inputs: bool = False,
):
    """Rewrite every adapter site of ``model`` with ``strategy`` (``fuse``, ``merge``, ``strip``).

    ``onnx.ModelProto`` in, ``onnx.ModelProto`` out; ``onnx_ir.Model`` in, ``onnx_ir.Model`` out
    (the input is not modified); a path in, the path of the written ``model.onnx`` out (into
    ``output_dir``, by default ``<stem>_<strategy>`` beside the input, with the ``target``'s
    artifact). The rewrite is verified in ONNX Runtime unless ``verify=False``; a mismatch
    raises ``VerificationError``. ``verify_mode``: "full" (both whole models), "regions" (each
    rewritten region against the original's, one at a time), "auto" (full below 2 GiB of weights).

    ``torch.export.ExportedProgram`` in, a new ``ExportedProgram`` out; ``torch.fx.GraphModule`` in,
    a new ``GraphModule`` out (see :mod:`zflora_compile.fx`). These are verified in PyTorch eager
    (same tolerances). ``output_dir``, ``force`` and ``target`` apply to paths only.

    ``max_rank`` (fuse): zero lanes up to that rank per adapted projection, so any adapter up to it
    swaps in with the same shapes (:mod:`zflora_compile.swap`); ``adapter_inputs`` (fuse, ONNX): the
    adapter-owned tensors become graph inputs with defaults, for ONNX Runtime's ``.onnx_adapter`` files.
    """
    options = CompileOptions(
        strategy=strategy, verify=verify, verify_mode=verify_mode, atol=atol, rtol=rtol, max_rank_ratio=max_rank_ratio, force=force, target=target,
        max_rank=max_rank, adapter_inputs=adapter_inputs,
    )
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        out = Path(output_dir) if output_dir is not None else default_output_dir(path, strategy)
        compile_file(path, out, options)
        return out / "model.onnx"
    if is_fx_model(model):
        return compile_model(model, options)[0]
    working = model.clone() if isinstance(model, ir.Model) else to_ir(model)
    compiled, _ = compile_model(working, options)
    return ir.to_proto(compiled) if isinstance(model, onnx.ModelProto) else compiled
