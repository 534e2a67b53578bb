"""The compile pipeline: load, detect, plan, rewrite, check, verify, build the target, write.

Nothing reaches the output directory until every step has passed: the model is written into a
temporary sibling directory that is renamed into place at the end.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from zflora_compile import __version__
from zflora_compile.errors import InputError, LatencyGateError, VerificationError, ZcompileError
from zflora_compile.gate import LatencyOptions, gate_failure_message, phase_shapes, run_gate
from zflora_compile.model_io import has_external_data, load_model, save_model, to_ir
from zflora_compile import families
from zflora_compile.graph.onnx_ir import OnnxGraph
from zflora_compile.graph.records import DEFAULT_MAX_RANK_RATIO, Detection
from zflora_compile.planner import STRATEGIES, plan
from zflora_compile.progress import NullProgress
from zflora_compile.targets import Shape, Target, TargetOptions, get_target
from zflora_compile.verify import compare, input_specs, make_feeds, session, verification_failure_message, verify_models, vocab_size

REPORT_SCHEMA_VERSION = "1.2"
GEMM_OPS = ("MatMul", "Gemm")

@dataclasses.dataclass
class CompileOptions:
    strategy: str = "fuse"
    target: str = "ort"
    verify: bool = True
    atol: float | None = None
    rtol: float | None = None
    max_rank_ratio: float = DEFAULT_MAX_RANK_RATIO
    seed: int = 0
    force: bool = False
    target_options: TargetOptions = dataclasses.field(default_factory=TargetOptions)
    #: shapes the target builds for (prefill, past) and, with check_latency, the gate's settings
    latency: LatencyOptions = dataclasses.field(default_factory=LatencyOptions)
    check_latency: bool = False

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise InputError(f"unknown strategy '{self.strategy}' (choose from {', '.join(STRATEGIES)})")


def default_output_dir(model_path: Path, strategy: str) -> Path:
    """``<stem>_<strategy>`` beside the model: deterministic, so pipelines can find it."""
    return model_path.with_name(f"{model_path.stem}_{strategy}")


def op_counts(model: ir.Model) -> dict[str, int]:
    return dict(sorted(collections.Counter(n.op_type for n in model.graph.all_nodes()).items()))


def gemm_count(counts: dict[str, int]) -> int:
    return sum(counts.get(op, 0) for op in GEMM_OPS)


def detect(model: ir.Model, max_rank_ratio: float = DEFAULT_MAX_RANK_RATIO) -> Detection:
    """Every adapter site in the model: LoRA, then FFA / FBA / FFBA / zFLoRA lanes."""
    return families.detect(OnnxGraph(model), max_rank_ratio=max_rank_ratio)


def infer_shapes(model: ir.Model) -> None:
    """ONNX shape inference over the rewritten graph; a model it cannot handle keeps its shapes."""
    try:
        common_passes.ShapeInferencePass()(model)
    except Exception:  # noqa: BLE001 - custom-domain ops the inference does not know
        pass


class _Timer:
    def __init__(self, progress):
        self.progress = progress or NullProgress()
        self.timings: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        with self.progress.step(name):
            yield
        self.timings[name] = round(time.perf_counter() - start, 4)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def base_report(input_path: Path | None, options: CompileOptions) -> dict:
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "tool": {"name": "zflora-compile", "version": __version__},
        "input": {"path": str(input_path) if input_path else None},
        "options": dataclasses.asdict(options),
        "status": "error",
        "exit_code": 2,
        "message": "",
    }


def _fill_detection(report: dict, model: ir.Model, detection: Detection) -> None:
    counts = op_counts(model)
    report["input"].update(
        {
            "opset": model.opset_imports.get("", None),
            "nodes": sum(counts.values()),
            "op_counts": counts,
            "gemm_count": gemm_count(counts),
        }
    )
    report["sites"] = [s.to_json() for s in detection.all_sites]
    report["rejected"] = [r.to_json() for r in detection.rejections]
    report["groups"] = _groups_json(detection)


def _groups_json(detection: Detection) -> list[dict]:
    groups: dict[str, list] = {}
    for site in detection.sites:
        groups.setdefault(site.group, []).append(site)
    return [
        {"group": key, "input": members[0].input_name, "sites": [s.site_id for s in members], "labels": [s.label for s in members]}
        for key, members in groups.items()
    ]


def compile_file(
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    options: CompileOptions | None = None,
    *,
    progress=None,
) -> dict:
    """Compile ``input_path`` into ``output_dir`` (``model.onnx`` + ``report.json``).

    Returns the report. Raises :class:`ZcompileError` subclasses for bad input or a missing
    target runtime (exit 2), failed verification and a failed latency gate (exit 1), with the
    report attached as ``error.report``. A failed gate still writes the complete output
    directory (its report says ``latency_gate_failed``); every other failure writes nothing.
    """
    options = options or CompileOptions()
    input_path, output_dir = Path(input_path), Path(output_dir)
    report = base_report(input_path, options)
    timer = _Timer(progress)
    started = time.perf_counter()
    try:
        _check_output_dir(output_dir, input_path, options.force)
        target = get_target(options.target, options.target_options)
        with timer.step("load"):
            model = load_model(input_path)
            report["input"]["sha256"] = _file_digest(input_path)
            report["input"]["external_data"] = has_external_data(model)
            vocab = vocab_size(model, next((v.name for v in model.graph.inputs if "input_ids" in (v.name or "")), ""))
        with timer.step("detect"):
            detection = detect(model, options.max_rank_ratio)
            _fill_detection(report, model, detection)
        with timer.step("rewrite"):
            the_plan = plan(detection, options.strategy)
            if the_plan.rewrites:
                families.rewrite(OnnxGraph(model), the_plan)
                infer_shapes(model)
            counts = op_counts(model)
            report["plan"] = the_plan.to_json()
            report["output"] = {"op_counts": counts, "gemm_count": gemm_count(counts), "nodes": sum(counts.values())}
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".tmp", dir=output_dir.parent))
        try:
            _write_and_check(model, staging, report, options, timer, input_path, vocab, target)
            report["status"], report["exit_code"] = "ok", 0
            report["message"] = _summary(report)
            if options.check_latency:
                _latency_gate(report, staging, input_path, target, options, vocab, timer)
            report["timings_s"] = {**timer.timings, "total": round(time.perf_counter() - started, 4)}
            report["output"]["dir"] = str(output_dir)
            _write_report(staging / "report.json", report)
            _move_into_place(staging, output_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if report["status"] == "latency_gate_failed":
            error = LatencyGateError(report["message"])
            error.report = report
            raise error
        return report
    except ZcompileError as error:
        report["exit_code"] = error.exit_code
        report["status"] = "verification_failed" if isinstance(error, VerificationError) else report["status"] if isinstance(error, LatencyGateError) else "error"
        if not isinstance(error, LatencyGateError):  # a failed gate's report is already written as is
            report["message"] = str(error)
            report["timings_s"] = {**timer.timings, "total": round(time.perf_counter() - started, 4)}
        error.report = report
        raise


def _write_and_check(model, staging: Path, report: dict, options: CompileOptions, timer: _Timer, input_path: Path, vocab, target: Target) -> None:
    model_path = staging / "model.onnx"
    with timer.step("write"):
        external = True if report["input"].get("external_data") else None
        written = save_model(model, model_path, external=external)
        report["output"]["files"] = [p.name for p in written] + ["report.json"]
    with timer.step("check"):
        try:
            onnx.checker.check_model(str(model_path), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
            raise VerificationError(f"rewritten model fails onnx.checker: {str(error).splitlines()[0]}") from None
        report["output"]["checker"] = "onnx.checker.check_model(full_check=True) passed"
    if options.verify:
        with timer.step("verify"):
            with _reference(input_path, options) as (reference, meaning):
                result = verify_models(reference, model_path, vocab, atol=options.atol, rtol=options.rtol, seed=options.seed)
            result["reference"] = meaning
            report["verification"] = result
            if not result["passed"]:
                raise VerificationError(verification_failure_message(result))
    else:
        report["verification"] = {"passed": None, "skipped": "--no-verify"}
    shapes = phase_shapes(model_path, options.latency)
    with timer.step(f"build target {target.name}"):
        report["target"] = target.build(model_path, staging, shapes)
    report["output"]["files"] += report["target"]["artifacts"]
    if options.verify:
        with timer.step(f"check the {target.name} artifact against the model"):
            check = check_artifact(target, staging, model_path, shapes, vocab, options.seed)
            report["target"]["check"] = check
            if not check["passed"]:
                raise VerificationError(f"the {target.name} artifact does not match model.onnx: {check['failure']}")


def check_artifact(target: Target, artifact_dir: Path, model_path: Path, shapes: list[Shape], vocab, seed: int) -> dict:
    """Run the target's artifact and ONNX Runtime CPU on the same inputs, for every shape it serves."""
    atol, rtol = target.artifact_tolerance
    reference = session(model_path)
    names = [o.name for o in reference.get_outputs()]
    specs = input_specs(model_path)
    cases, failure, worst = [], None, 0.0
    for shape in shapes:
        feeds = make_feeds(specs, vocab, seq=None if shape.name == "static" else shape.seq, past=shape.past, seed=seed)
        loaded = target.load(artifact_dir, model_path, shape)
        got = dict(zip(loaded.output_names, loaded.run(feeds)))
        outputs = {}
        for name, expected in zip(names, reference.run(names, feeds)):
            if name not in got:
                outputs[name] = {"passed": False, "reason": "missing from the artifact's outputs"}
            else:
                outputs[name] = compare(expected, np.asarray(got[name]).astype(expected.dtype, copy=False), atol, rtol)
                worst = max(worst, outputs[name].get("max_abs_diff", 0.0))
            if not outputs[name]["passed"] and failure is None:
                detail = outputs[name].get("reason") or f"max abs diff {outputs[name]['max_abs_diff']:.3g} > atol {atol:g} + rtol {rtol:g} * |ref|"
                failure = f"output '{name}' ({shape.describe()}): {detail}"
        cases.append({"shape": shape.name, "seq": shape.seq, "past": shape.past, "runs_on": loaded.description, "outputs": outputs})
    return {
        "passed": failure is None,
        "reference": "model.onnx on onnxruntime CPUExecutionProvider, same seeded inputs",
        "atol": atol,
        "rtol": rtol,
        "max_abs_diff": worst,
        "failure": failure,
        "cases": cases,
    }


def _latency_gate(report: dict, staging: Path, input_path: Path, target: Target, options: CompileOptions, vocab, timer: _Timer) -> None:
    from zflora_compile.plot import latency_chart

    with timer.step("latency gate"):
        latency = run_gate(input_path, staging, target, options.latency, options, vocab, progress=timer.progress)
    report["latency"] = latency
    latency_chart(latency, staging / "latency.png")
    report["output"]["files"].append("latency.png")
    if not latency["passed"]:
        report["status"], report["exit_code"] = "latency_gate_failed", 1
        report["message"] = gate_failure_message(latency)
    else:
        report["message"] += f"; latency gate passed (worst fused overhead {latency['worst_overhead_pct']:+.1f}% <= {latency['max_overhead_pct']:g}%)"


@contextmanager
def _reference(input_path: Path, options: CompileOptions) -> Iterator[tuple[Path, str]]:
    """What the rewritten model must equal: the input, or for ``strip`` the input with B = 0."""
    if options.strategy != "strip":
        yield input_path, "the input model"
        return
    with tempfile.TemporaryDirectory(prefix="zflora-ref-") as tmp:
        model = load_model(input_path)
        detection = detect(model, options.max_rank_ratio)
        families.disable_adapters(OnnxGraph(model), detection)
        path = Path(tmp) / "reference.onnx"
        save_model(model, path, external=True)
        yield path, "the input model with every detected adapter's B set to zero (graph otherwise unchanged)"


def _summary(report: dict) -> str:
    sites = len(report.get("sites", []))
    if not sites:
        return "no adapter sites found; model written unchanged"
    plan_json = report["plan"]
    return (
        f"{sites} adapter site(s), strategy {plan_json['strategy']}: "
        f"GEMMs {report['input']['gemm_count']} -> {report['output']['gemm_count']}"
    )


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


def _write_report(path: Path, report: dict) -> None:
    import json

    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")


# ---------------------------------------------------------------- in-memory API


def compile_in_memory(model, options: CompileOptions) -> tuple[ir.Model, dict]:
    """Rewrite an ``onnx.ModelProto`` / ``onnx_ir.Model`` (not modified), verified through temp files."""
    source = to_ir(model)
    with tempfile.TemporaryDirectory(prefix="zflora-") as tmp:
        original_path = Path(tmp) / "original.onnx"
        save_model(source, original_path, external=True)
        report = compile_file(original_path, Path(tmp) / "out", options)
        compiled = load_model(Path(tmp) / "out" / "model.onnx")
        # materialise weights: the temp files disappear with the directory
        for value in compiled.graph.initializers.values():
            if value.const_value is not None:
                value.const_value = ir.tensor(value.const_value.numpy(), name=value.name)
    report["input"]["path"] = None
    report["output"].pop("dir", None)
    return compiled, report
