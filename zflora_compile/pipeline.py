"""The compile pipeline, in memory: detect, plan, rewrite, verify; ONNX and torch.fx alike.

``compile_model(model, options) -> (model, Report)``. An ``onnx_ir.Model`` is rewritten in place
(an ``onnx.ModelProto`` is converted first) and verified in ONNX Runtime through temporary
files; an ``ExportedProgram`` / ``GraphModule`` gives a new program, verified in PyTorch eager.
Files, targets and the latency gate are :mod:`zflora_compile.build`'s.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Callable


import onnx_ir as ir
import onnx_ir.passes.common as common_passes

import zflora_compile.families as families
from zflora_compile import metadata, subgraphs
from zflora_compile.checker import input_checker, output_checker
from zflora_compile.errors import InputError, UnrecognizedAdapterError, VerificationError, ZcompileError
from zflora_compile.graph.onnx_ir import OnnxGraph
from zflora_compile.graph.records import DEFAULT_MAX_RANK_RATIO, Detection
from zflora_compile.model_io import has_external_data, initializer_bytes, load_model, release_weights, save_model, to_ir
from zflora_compile.options import CompileOptions
from zflora_compile.planner import plan
from zflora_compile.progress import TimedSteps
from zflora_compile.report import NO_VERIFY, GraphStats, InputInfo, OutputInfo, Report, file_digest
from zflora_compile.regions import CannotIsolate, verify_regions
from zflora_compile.regions import failure_message as regions_failure_message
from zflora_compile.finite import check_finite_weights, refuse_unverifiable
from zflora_compile.verify import choose_mode, token_vocab, verification_failure_message, verify_models

STRIP_REFERENCE = "the input model with every detected adapter's B set to zero (a generic linear branch: multiplied by zero)"

COMPILED_STRIP_REFERENCE = (
    "the compiled input with the low-rank constants its metadata names set to zero (per-column scales to 1, widened B rows to zero)"
)


def is_fx_model(model) -> bool:
    """A ``torch.export.ExportedProgram`` or ``torch.fx.GraphModule`` (without importing torch)."""
    if "torch" not in sys.modules:
        return False
    from zflora_compile.fx_program import is_fx_model as is_program

    return is_program(model)


def detect(model: ir.Model, max_rank_ratio: float = DEFAULT_MAX_RANK_RATIO) -> Detection:
    """Every adapter site in an ONNX model: LoRA, then FFA / FBA / FFBA / zFLoRA lanes, in the main
    graph and in every subgraph (``If`` branches, ``Loop`` / ``Scan`` bodies; :mod:`.subgraphs`:
    a subgraph's sites and rejections are named by its path).

    ONNX shape inference runs first: a graph without recorded intermediate shapes would otherwise
    hide leading axes that differ between a lane and its reader (a Concat of tensors of two ranks)."""
    infer_shapes(model)
    return subgraphs.detect(model, max_rank_ratio)


def refuse_unaccounted(detection: Detection, options: CompileOptions) -> None:
    """``strip`` cannot derive the base model while an adapter-shaped structure is unrecognised
    (per-column scales pass with ``keep_scales``): :class:`UnrecognizedAdapterError` (exit 2)."""
    if options.strategy != "strip":
        return
    blocking = [u for u in detection.unrecognized if u.kind == "branch" or not options.keep_scales]
    if not blocking:
        return
    first = blocking[0]
    label = f" ({first.label})" if first.label else ""
    hint = " (--keep-scales declares per-column scales part of the base model)" if all(u.kind == "scale" for u in blocking) else ""
    raise UnrecognizedAdapterError(
        f"strip cannot derive the base model: {len(blocking)} adapter-shaped {'structure' if len(blocking) == 1 else 'structures'} "
        f"no family recognises; first, node '{first.node}'{label}: {first.reason}{hint}"
    )


def check_stripped(views, detection: Detection) -> None:
    """The stripped model, detected afresh, carries no adapter: no site, and no branch of a
    projection's own input through constant-parameter ops in any of its graphs (``views``:
    ``(path, view)`` pairs; a check that does not trust the detection strip was planned from; what
    removing an add exposes of the base model, such as a GEMM -> activation -> GEMM path, is no
    adapter and does not count)."""
    from zflora_compile.graph.branches import find_branches

    branches = [(path, view, b) for path, view in views for b in find_branches(view)]
    left = len(branches) + len(detection.all_sites)
    if left:
        where = next((f"{path}:{view.name(b.add)}" if path else view.name(b.add) for path, view, b in branches), None)
        where = where or next((s.site_id for s in detection.all_sites), "")
        raise VerificationError(f"the stripped model still carries {left} adapter-shaped branch(es) or site(s), e.g. '{where}'")


def onnx_stats(model: ir.Model) -> GraphStats:
    """Op and GEMM counts of the whole model, subgraphs included."""
    graph = OnnxGraph(model)
    return GraphStats(graph.op_counts(), graph.gemm_count())


def infer_shapes(model: ir.Model) -> None:
    """ONNX shape inference over the rewritten graph; a model it cannot handle keeps its shapes."""
    try:
        common_passes.ShapeInferencePass()(model)
    except Exception:  # noqa: BLE001 - custom-domain ops the inference does not know
        pass


def compile_model(model, options: CompileOptions | None = None, *, progress=None):
    """Rewrite every adapter site of ``model`` with ``options.strategy`` and verify the result.

    Returns ``(model, report)``: the rewritten ``onnx_ir.Model`` (the one given, rewritten in
    place) or a new ``ExportedProgram`` / ``GraphModule``, and its :class:`Report`. Raises
    :class:`ZcompileError` subclasses (``VerificationError`` on a mismatch) with the report as
    JSON on ``error.report``.
    """
    options = options or CompileOptions()
    fx = is_fx_model(model)
    model = model if fx else to_ir(model)
    report = Report(options.to_json(), InputInfo(ir="fx" if fx else "onnx"))
    steps = TimedSteps(progress, report.timings_s)
    try:
        result = compile_fx(report, model, options, steps) if fx else compile_onnx(report, model, options, steps)
    except ZcompileError as error:
        report.fail(error)
        error.report = report.to_json()
        raise
    report.succeed()
    report.stop_clock()
    return result, report


def compile_onnx(
    report: Report, model: ir.Model, options: CompileOptions, steps: TimedSteps, *, source: Path | None = None, write: Callable[[ir.Model], list[Path]] | None = None
) -> ir.Model:
    """Detect, rewrite in place, write, check and verify ``model``, filling ``report``.

    ``source`` is the unchanged file the model was loaded from: verification runs it as the
    reference; without it, the model is saved to a temporary file first. ``write`` writes the
    rewritten model where it belongs (``build``: the output's staging directory) and returns the
    files written, the model first; the checker and the verification read that file, so the
    rewritten model is written once. Without it, it goes to a temporary file.
    """
    vocab = token_vocab(model)
    weight_bytes = initializer_bytes(model)
    with tempfile.TemporaryDirectory(prefix="zflora-") as tmp:
        tmp = Path(tmp)
        if source is None:
            saved = save_model(model, tmp / "original.onnx", external=True)
            source = saved[0]
            report.input.sha256 = report.input.sha256 or file_digest(*saved)
        if report.input.external_data is None:
            report.input.external_data = has_external_data(model)
        report.input.opset = model.opset_imports.get("", None)
        if report.input.checker is None:
            report.input.checker = input_checker(source)
        compiled = metadata.read(model) if options.strategy == "strip" else None
        with steps.step("detect"):
            input_graph = onnx_stats(model)
            removed = metadata.strip_compiled(model, compiled) if metadata.active(compiled) else None  # a model this tool compiled
            detection = detect(model, options.max_rank_ratio)
            report.detection, report.input.graph, report.removed = detection, input_graph, removed
            refuse_unaccounted(detection, options)
            check_finite_weights(detection, options.strategy, model, steps.progress, deferred=write is not None)
        with steps.step("rewrite"):
            the_plan = subgraphs.plan(detection, options.strategy)
            if options.max_rank is not None:
                the_plan = pad_model_plan(the_plan, options.max_rank)
            if len(the_plan):
                subgraphs.rewrite(model, the_plan)
            if len(the_plan) or removed:
                infer_shapes(model)
                entry = metadata.compilation(options.strategy, detection, the_plan, removed)
                if options.adapter_inputs:
                    from zflora_compile.deploy.onnx_adapter import expose_inputs

                    entry["adapter_inputs"] = expose_inputs(model, entry)
                metadata.write(model, entry)
            report.plan, report.output = the_plan, OutputInfo(onnx_stats(model))
            if options.strategy == "strip":
                check_stripped(subgraphs.views(model), subgraphs.detect(model, options.max_rank_ratio))
        rewritten = (write(model) if write is not None else save_model(model, tmp / "model.onnx", external=True))[0]
        release_weights(model)  # what detection and the write mapped: verification reads the files afresh
        with steps.step("check"):
            report.output.checker = output_checker(rewritten, report.input.checker)
        if not options.verify:
            report.verification = dict(NO_VERIFY)
            return model
        mode, why = choose_mode(options.verify_mode, weight_bytes)
        with steps.step("verify"):
            reference = StripReference(source, options, len(detection), compiled if removed else None)
            result = None
            if mode == "regions":
                try:
                    result = verify_regions(reference.model(), load_model(rewritten), source, rewritten, vocab, atol=options.atol, rtol=options.rtol, seed=options.seed, progress=steps.progress)
                    message = regions_failure_message
                except CannotIsolate as cannot:
                    why += f"; the model cannot be checked region by region ({cannot}): checked in full instead"
                    mode = "full"
            if result is None:
                result = verify_models(reference.path(tmp), rewritten, vocab, atol=options.atol, rtol=options.rtol, seed=options.seed)
                message = verification_failure_message
            result["reference"] = reference.meaning
            report.verification = {"mode": mode, "mode_reason": why, **result}
            if not result["passed"]:
                refuse_unverifiable(result, source)
                raise VerificationError(message(result))
    return model


def pad_model_plan(the_plan, max_rank: int):
    """``--max-rank``: every graph's fused groups and lane projections padded with zero lanes
    (:mod:`zflora_compile.padding`); the joined plan rebuilt from the padded parts."""
    from zflora_compile.padding import pad_plan

    for _, part in the_plan.parts:
        part.rewrites = pad_plan(part.rewrites, max_rank)
    the_plan.rewrites = [step for _, part in the_plan.parts for step in part.rewrites]
    return the_plan


class StripReference:
    """What the rewritten model must equal: the input, or for ``strip`` the input with B = 0
    (detected afresh from the file: it must find the ``sites`` the compile found); a model this tool
    compiled (``compiled``: its record) has its compiled-in low-rank constants zeroed first. Loaded
    lazily (external data stays on disk); written to a file only for the full check."""

    def __init__(self, source: Path, options: CompileOptions, sites: int, compiled: dict | None = None):
        self.source, self.options, self.sites, self.compiled = source, options, sites, compiled
        self.stripped = options.strategy == "strip"
        prefix = COMPILED_STRIP_REFERENCE + "; then " if compiled is not None else ""
        self.meaning = f"{prefix}{STRIP_REFERENCE} (graph otherwise unchanged)" if self.stripped else "the input model"

    def model(self) -> ir.Model:
        model = load_model(self.source)
        if not self.stripped:
            return model
        if self.compiled is not None:
            metadata.disable_compiled(model, self.compiled)
        again = detect(model, self.options.max_rank_ratio)
        if len(again) != self.sites:
            raise VerificationError(f"the strip reference, detected afresh from the saved input, has {len(again)} adapter site(s), the compile {self.sites}")
        subgraphs.disable_adapters(model, again)
        return model

    def path(self, tmp: Path) -> Path:
        if not self.stripped:
            return self.source
        path = tmp / "reference.onnx"
        save_model(self.model(), path, external=True)
        return path


def compile_fx(report: Report, model, options: CompileOptions, steps: TimedSteps):
    """Detect, rewrite and verify an ExportedProgram or GraphModule (not modified); returns a new one."""
    from zflora_compile.fx_program import edit, graph_stats, program_digest, strip_reference
    from zflora_compile.fx_verify import verify_fx
    from zflora_compile.graph.torch_fx import FxGraph

    program = edit(model)
    report.input.sha256 = program_digest(model)
    with steps.step("detect"):
        detection = families.detect(FxGraph(program.gm, program.constants), max_rank_ratio=options.max_rank_ratio)
        report.detection, report.input.graph = detection, graph_stats(program.gm)
        refuse_unaccounted(detection, options)
        check_finite_weights(detection, options.strategy)
    with steps.step("rewrite"):
        the_plan = plan(detection, options.strategy)
        if options.max_rank is not None:
            from zflora_compile.padding import pad_plan

            the_plan.rewrites = pad_plan(the_plan.rewrites, options.max_rank)
        if options.adapter_inputs:
            raise InputError("--adapter-inputs writes ONNX graph inputs; a torch.fx program has none (compile the ONNX export)")
        if len(the_plan):
            families.rewrite(FxGraph(program.gm, program.constants, program.add_constant), the_plan)
        result = program.finish()
        report.plan, report.output = the_plan, OutputInfo(graph_stats(result))
        if options.strategy == "strip":
            after = edit(result)
            view = FxGraph(after.gm, after.constants)
            check_stripped([("", view)], families.detect(view, max_rank_ratio=options.max_rank_ratio))
    if not options.verify:
        report.verification = dict(NO_VERIFY)
        return result
    with steps.step("verify"):
        stripped = options.strategy == "strip" and bool(detection.all_sites)
        reference = strip_reference(model, options.max_rank_ratio) if stripped else model
        outcome = verify_fx(reference, result, atol=options.atol, rtol=options.rtol, seed=options.seed)
        outcome["reference"] = STRIP_REFERENCE if stripped else "the input model"
        why = "a torch.fx program is verified whole, in PyTorch eager" + ("" if options.verify_mode in ("auto", "full") else f" (--verify {options.verify_mode} applies to ONNX models)")
        report.verification = {"mode": "full", "mode_reason": why, **outcome}
        if not outcome["passed"]:
            raise VerificationError(verification_failure_message(outcome))
    return result
