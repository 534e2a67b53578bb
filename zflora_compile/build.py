"""The file pipeline: load, compile in memory, write, build and check the target artifact, gate.

Nothing reaches the output directory until every step has passed: the model is written into a
temporary sibling directory that is renamed into place at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import onnx_ir as ir

from zflora_compile.errors import InputError, LatencyGateError, VerificationError, ZcompileError
from zflora_compile.gate import Variant, gate_failure_message, phase_shapes, run_gate
from zflora_compile.model_io import has_external_data, load_model, resolve_model_path, save_model
from zflora_compile.options import CompileOptions
from zflora_compile.pipeline import compile_model, compile_onnx
from zflora_compile.progress import TimedSteps
from zflora_compile.report import InputInfo, Report, file_digest
from zflora_compile.targets import Shape, Target, get_target
from zflora_compile.targets.check import check_artifact
from zflora_compile.verify import token_vocab

MODEL_NAME = "model.onnx"


def default_output_dir(model_path: Path, strategy: str) -> Path:
    """``<stem>_<strategy>`` beside the model: deterministic, so pipelines can find it."""
    return model_path.with_name(f"{model_path.stem}_{strategy}")


def compile_file(
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    options: CompileOptions | None = None,
    *,
    progress=None,
) -> dict:
    """Compile ``input_path`` into ``output_dir`` (``model.onnx``, the target's artifact, ``report.json``).

    Returns the report (JSON). Raises :class:`ZcompileError` subclasses for bad input or a
    missing target runtime (exit 2), failed verification and a failed latency gate (exit 1), with
    the report attached as ``error.report``. A failed gate still writes the complete output
    directory (its report says ``latency_gate_failed``); every other failure writes nothing.
    """
    options = options or CompileOptions()
    input_path, output_dir = Path(input_path), Path(output_dir)
    report = Report(options.to_json(), InputInfo(path=str(input_path)))
    steps = TimedSteps(progress, report.timings_s)
    try:
        _check_output_dir(output_dir, input_path, options.force)
        target = get_target(options.target, options.target_options)
        if "onnx" not in target.accepts:
            raise InputError(f"target '{target.name}' does not build from an ONNX file")
        with steps.step("load"):
            model = load_model(input_path)
            source = resolve_model_path(input_path)
            report.input.sha256 = file_digest(source)
            report.input.external_data = has_external_data(model)
        vocab = token_vocab(model)
        model = compile_onnx(report, model, options, steps, source=source if source.suffix == ".onnx" else None)
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".tmp", dir=output_dir.parent))
        try:
            shapes = _write_and_build(model, staging, report, options, steps, target, vocab)
            report.succeed()
            if options.check_latency:
                _latency_gate(report, staging, input_path, target, shapes, options, vocab, steps)
            report.output.dir = str(output_dir)
            report.stop_clock()
            (staging / "report.json").write_text(json.dumps(report.to_json(), indent=2, sort_keys=False) + "\n")
            _move_into_place(staging, output_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if report.status == "latency_gate_failed":
            raise LatencyGateError(report.message)
        return report.to_json()
    except ZcompileError as error:
        report.fail(error)
        error.report = report.to_json()
        raise


def _write_and_build(model: ir.Model, staging: Path, report: Report, options: CompileOptions, steps: TimedSteps, target: Target, vocab) -> list[Shape]:
    """Write ``model.onnx``, build the target's artifact beside it and check it; returns the shapes built."""
    model_path = staging / MODEL_NAME
    with steps.step("write"):
        written = save_model(model, model_path, external=True if report.input.external_data else None)
        report.output.files = [p.name for p in written] + ["report.json"]
    shapes = phase_shapes(model_path, options.latency)
    with steps.step(f"build target {target.name}"):
        report.target = target.build(model_path, staging, shapes)
    report.output.files += report.target["artifacts"]
    if options.verify:
        with steps.step(f"check the {target.name} artifact against the model"):
            check = check_artifact(target, staging, model_path, shapes, vocab, options.seed)
            report.target["check"] = check
            if not check["passed"]:
                raise VerificationError(f"the {target.name} artifact does not match model.onnx: {check['failure']}")
    return shapes


def _latency_gate(report: Report, staging: Path, input_path: Path, target: Target, shapes: list[Shape], options: CompileOptions, vocab, steps: TimedSteps) -> None:
    from zflora_compile.plot import latency_chart

    with steps.step("latency gate"), tempfile.TemporaryDirectory(prefix="zflora-gate-") as tmp:
        variants = _gate_variants(input_path, Path(tmp), target, shapes, options, steps.progress)
        variants["fused"] = Variant(staging, staging / MODEL_NAME)
        latency = run_gate(target, variants, shapes, options.latency, vocab, seed=options.seed, progress=steps.progress)
    latency_chart(latency, staging / "latency.png")
    report.output.files.append("latency.png")
    report.record_gate(latency, None if latency["passed"] else gate_failure_message(latency))


def _gate_variants(input_path: Path, tmp: Path, target: Target, shapes: list[Shape], options: CompileOptions, progress) -> dict[str, Variant]:
    """``base`` (the input with every adapter stripped, verified) and ``unfused`` (the input), built for ``target``."""
    original = load_model(input_path)
    unfused = _write_variant(original, tmp / "unfused")  # before the strip rewrites `original` in place
    with progress.step(f"latency gate: base model (strip) for {target.name}"):
        try:
            stripped, _ = compile_model(original, dataclasses.replace(options, strategy="strip", check_latency=False))
        except InputError as error:  # zFLoRA: the base model cannot be derived from the adapted one
            raise InputError(f"--check-latency needs the base model, derived by stripping the adapters: {error}") from None
        base = _write_variant(stripped, tmp / "base")
        target.build(base.model, base.dir, shapes)
    with progress.step(f"latency gate: unfused model for {target.name}"):
        target.build(unfused.model, unfused.dir, shapes)
    return {"base": base, "unfused": unfused}


def _write_variant(model: ir.Model, directory: Path) -> Variant:
    directory.mkdir()
    save_model(model, directory / MODEL_NAME, external=True if has_external_data(model) else None)
    return Variant(directory, directory / MODEL_NAME)


def _check_output_dir(output_dir: Path, input_path: Path, force: bool) -> None:
    if output_dir.resolve() == input_path.resolve().parent:
        raise InputError(f"{output_dir}: output directory is the input's own directory; choose another")
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"{output_dir}: exists and is not a directory")
    if output_dir.exists() and any(output_dir.iterdir()) and not force:
        raise InputError(f"{output_dir}: output directory exists and is not empty (use --force to replace it)")


def _move_into_place(staging: Path, output_dir: Path) -> None:
    """Swap the finished staging directory in (the old one, if any, is removed only after)."""
    old = None
    if output_dir.exists():
        old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
        os.replace(output_dir, old)
    os.replace(staging, output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
