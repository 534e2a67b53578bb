"""The artifact check: a target's artifact must compute what the model it was built from computes.

Each output is compared with ``|artifact - reference| <= atol + rtol * |reference|`` at a
tolerance chosen per output (:func:`output_tolerances`):

* its element type: :data:`zflora_compile.verify.TOLERANCES` (fp32 1e-4, fp16 1e-2, ...): ONNX
  Runtime's full optimisation fuses ops whose fp16 intermediates the reference rounds, one ulp
  apart;
* a quantized model (QuantizeLinear / DequantizeLinear, QLinear*, MatMulInteger,
  DynamicQuantizeLinear, com.microsoft MatMulNBits...): ONNX Runtime's fused integer kernels
  round a requantized activation once where the reference rounds twice, so a value may land a
  step away at every quantized op. An output that a DequantizeLinear with a constant scale
  produces lies on that scale's grid: :data:`QUANT_STEPS` steps (``atol = QUANT_STEPS * scale``);
  an 8/16-bit integer output :data:`QUANT_STEPS` units; any other float output at least
  bfloat16's tolerance (an 8-bit integer carries what bfloat16's 8-bit significand carries);
* at least the target's own :attr:`Target.artifact_tolerance` (fp16 kernels of an NPU).
"""

from __future__ import annotations

import gc

from pathlib import Path

import numpy as np
import onnx_ir as ir

from zflora_compile.targets.base import Shape, Target
from zflora_compile.verify import TOLERANCES, compare, input_specs, make_feeds, tolerance_for, weight_precision

#: quantization steps a dequantized output (or an integer one) of a quantized model may differ
#: by: ONNX Runtime's QDQ fusions moved the logits of a tiny quantize_static Llama by at most 2
#: steps of their DequantizeLinear scale (10 seeds x 1..128 tokens); twice that is the margin
QUANT_STEPS = 4

#: op types (any domain) that make a model quantized, besides every ``QLinear*`` op
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "ConvInteger",
        "MatMulNBits",
        "MatMulBnb4",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "DynamicQuantizeLSTM",
        "GatherBlockQuantized",
        "QAttention",
        "QGemm",
        "QOrderedMatMul",
        "QMoE",
        "DequantizeBFP",
        "QuantizeBFP",
    }
)
# ops that move or reshape values without changing them, between a DequantizeLinear and an output
_LAYOUT_OPS = frozenset({"Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})
_INTEGER_STEPS = frozenset({"int8", "uint8", "int16", "uint16", "int4", "uint4"})


def quantized_ops(model: ir.Model) -> list[str]:
    """The quantization op types of ``model`` (main graph and subgraphs), sorted."""
    return sorted({n.op_type for n in model.graph.all_nodes() if n.op_type in QUANTIZED_OPS or n.op_type.startswith("QLinear")})


def _dequantized_by(value: ir.Value) -> tuple[str, float] | None:
    """``(node name, largest |scale|)`` of the DequantizeLinear that produces ``value`` through
    layout-only ops, when its scale is a constant."""
    producer = value.producer()
    while producer is not None and producer.op_type in _LAYOUT_OPS and producer.inputs and producer.inputs[0] is not None:
        producer = producer.inputs[0].producer()
    if producer is None or producer.op_type != "DequantizeLinear" or len(producer.inputs) < 2 or producer.inputs[1] is None:
        return None
    scale = producer.inputs[1].const_value
    if scale is None:
        constant = producer.inputs[1].producer()
        if constant is None or constant.op_type != "Constant" or "value" not in constant.attributes:
            return None
        scale = constant.attributes["value"].value
    return producer.name or "", float(np.max(np.abs(np.asarray(scale.numpy(), dtype=np.float64))))


def output_tolerances(target: Target, model_path: Path, model: ir.Model | None = None) -> dict[str, dict]:
    """``{output: {"atol", "rtol", "why"}}``: each output's artifact-check tolerance (the rules
    of this module's docstring); ``model`` is the file as an ``onnx_ir.Model`` when the caller holds it."""
    model = model if model is not None else ir.load(str(model_path))  # external weights stay on disk
    quantized = quantized_ops(model)
    computed_in = weight_precision(model_path)
    floor_atol, floor_rtol = target.artifact_tolerance
    tolerances = {}
    for output in model.graph.outputs:
        try:
            dtype = np.dtype(output.dtype.numpy()) if output.dtype is not None else np.dtype("float32")
        except (TypeError, ValueError):  # strings and other types without a numpy dtype: exact
            dtype = np.dtype(object)
        judged = computed_in if dtype == np.float64 and computed_in is not None else dtype
        atol, rtol = tolerance_for(judged, None, None)
        floating = dtype.kind == "f" or dtype.name == "bfloat16"
        why = [f"{dtype.name} output" + (f" of {judged.name} weights" if judged != dtype else "") + f": {judged.name} tolerance" if floating else f"{dtype.name} output: exact"]
        if quantized:
            names = ", ".join(quantized[:4]) + (", ..." if len(quantized) > 4 else "")
            source = _dequantized_by(output) if floating else None
            if source is not None:
                atol = max(atol, QUANT_STEPS * source[1])
                why.append(f"quantized model ({names}), output dequantized by '{source[0]}' (scale {source[1]:.3g}): {QUANT_STEPS} quantization steps")
            elif floating:
                q_atol, q_rtol = TOLERANCES["bfloat16"]
                atol, rtol = max(atol, q_atol), max(rtol, q_rtol)
                why.append(f"quantized model ({names}): at least bfloat16's tolerance (8-bit integers carry bfloat16's 8 significant bits)")
            elif dtype.name in _INTEGER_STEPS:
                atol = max(atol, float(QUANT_STEPS))
                why.append(f"quantized model ({names}): {QUANT_STEPS} quantization steps of the integer output")
        if floor_atol > atol or floor_rtol > rtol:
            atol, rtol = max(atol, floor_atol), max(rtol, floor_rtol)
            why.append(f"target {target.name}: at least atol {floor_atol:g}, rtol {floor_rtol:g} ({target.artifact_tolerance_why or 'its kernels'})")
        tolerances[output.name] = {"atol": float(atol), "rtol": float(rtol), "why": "; ".join(why)}
    return tolerances


def check_artifact(
    target: Target, artifact_dir: Path, model_path: Path, shapes: list[Shape], vocab: int | None, seed: int, model: ir.Model | None = None, *, mode: str = "full", mode_reason: str = ""
) -> dict:
    """Run the target's artifact and ONNX Runtime CPU on the same inputs, for every shape it serves;
    returns the report's ``target.check`` section (with the tolerance of every output and why).

    One session is alive at a time: the reference (``model.onnx``, weights not prepacked) runs
    every shape first and is released, then the artifact is loaded once per shape and released
    before the next (a model's weights are held once, not three times). ``mode`` "regions"
    (``--verify regions``, or auto on a large model) checks an artifact the target offers as an
    ONNX model (:meth:`Target.regional_artifact`) region by region instead (:func:`check_regions`);
    one that cannot be is checked whole, and ``mode_reason`` says why."""
    if not target.builds_artifact:
        return {"passed": True, "skipped": f"target {target.name} builds no artifact: model.onnx, verified against the input, is the output", "cases": []}
    if mode == "regions":
        section, why = check_regions(target, artifact_dir, model_path, vocab, seed, model)
        if section is not None:
            return {**section, "mode_reason": mode_reason}
        mode_reason = f"{mode_reason}; {why}: checked whole instead"
    return {**_check_whole(target, artifact_dir, model_path, shapes, vocab, seed, model), "mode": "full", "mode_reason": mode_reason or "--verify full"}


#: an artifact region holding more than this share of the weights is checked whole instead (ONNX
#: Runtime's CPU provider wraps every fp16 operator it has no fp16 kernel for in inserted casts,
#: so an fp16 model's artifact differs from model.onnx nearly everywhere)
MAX_REGION_SHARE = 0.5


def _half_precision_tolerance(model: ir.Model) -> tuple[float | None, float | None]:
    """fp16's (or bf16's) tolerance for every value of a model whose float weights are mostly
    16-bit (by bytes), else None (each value's dtype decides): the artifact may compute in fp32
    what ``model.onnx`` rounds to 16 bits between ops (ORT's inserted casts), and an fp32 value
    downstream carries that rounding. One fp16 constant in an fp32 model changes nothing."""
    by_dtype: dict[str, int] = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and tensor.dtype.is_floating_point():
            by_dtype[tensor.dtype.numpy().name] = by_dtype.get(tensor.dtype.numpy().name, 0) + tensor.nbytes
    total = sum(by_dtype.values())
    for half in ("bfloat16", "float16"):
        if total and by_dtype.get(half, 0) * 2 > total:
            return TOLERANCES[half]
    return None, None


def check_regions(target: Target, artifact_dir: Path, model_path: Path, vocab: int | None, seed: int, model: ir.Model | None = None) -> tuple[dict | None, str]:
    """``(section, "")``: the artifact's regions against ``model.onnx``'s nodes computing the same
    values (:func:`zflora_compile.regions.verify_regions`: nodes the optimiser left identical are
    skipped, every fused or rewritten group runs on seeded activations, one region's two sessions at
    a time); ``(None, why)`` when the artifact cannot be checked that way."""
    from zflora_compile.model_io import load_model
    from zflora_compile.regions import CannotIsolate, failure_message, verify_regions

    artifact = target.regional_artifact(artifact_dir)
    if artifact is None:
        return None, f"target {target.name}'s artifact is no ONNX model ONNX Runtime CPU runs as the target does"
    reference = load_model(model_path)  # the written file: external weights stay on disk
    quantized = quantized_ops(model if model is not None else reference)
    if quantized:
        return None, f"a quantized model ({', '.join(quantized[:3])}): ONNX Runtime's fused quantized kernels are judged per output"
    atol, rtol = _half_precision_tolerance(reference)
    try:
        section = verify_regions(reference, load_model(artifact), model_path, artifact, vocab, seed=seed, atol=atol, rtol=rtol, max_region_share=MAX_REGION_SHARE)
    except CannotIsolate as cannot:
        return None, f"the artifact cannot be checked region by region ({cannot})"
    worst = section["worst"]
    compared = [o for case in section["cases"] for o in case["outputs"].values() if "atol" in o] or [{"atol": 0.0, "rtol": 0.0}]
    return {
        "passed": section["passed"],
        "mode": "regions",
        "reference": "model.onnx's nodes computing the same values, on onnxruntime CPUExecutionProvider, region by region on seeded activations",
        "rule": "|artifact - reference| <= atol + rtol * |reference|, elementwise, every value an artifact region hands on",
        "atol": max(o["atol"] for o in compared),  # of the values compared (tolerances: by dtype)
        "rtol": max(o["rtol"] for o in compared),
        "tolerances": section["tolerances"],
        "max_abs_diff": max(float(worst.get("max_abs_diff", 0.0)), 0.0),
        "failure": None if section["passed"] else failure_message(section).replace("verification failed in region", "region", 1),
        "cases": [],
        "regions": section["regions"],
        "region_cases": section["cases"],
    }, ""


def _check_whole(target: Target, artifact_dir: Path, model_path: Path, shapes: list[Shape], vocab: int | None, seed: int, model: ir.Model | None = None) -> dict:
    tolerances = output_tolerances(target, model_path, model)
    specs = input_specs(model_path)
    feeds_of = [make_feeds(specs, vocab, seq=None if shape.name == "static" else shape.seq, past=shape.past, seed=seed) for shape in shapes]
    reference = _reference_session(model_path)
    names = [o.name for o in reference.get_outputs()]
    expected_of = [reference.run(names, feeds) for feeds in feeds_of]
    del reference
    gc.collect()
    cases, failure, worst = [], None, 0.0
    for shape, feeds, expected_outputs in zip(shapes, feeds_of, expected_of):
        loaded = target.load(artifact_dir, model_path, shape, for_check=True)
        got = dict(zip(loaded.output_names, loaded.run(feeds)))
        description = loaded.description
        del loaded
        gc.collect()
        outputs = {}
        for name, expected in zip(names, expected_outputs):
            atol, rtol = tolerances[name]["atol"], tolerances[name]["rtol"]
            if name not in got:
                outputs[name] = {"passed": False, "reason": "missing from the artifact's outputs"}
            else:
                outputs[name] = compare(expected, np.asarray(got[name]).astype(expected.dtype, copy=False), atol, rtol)
                worst = max(worst, outputs[name].get("max_abs_diff", 0.0))
            if not outputs[name]["passed"] and failure is None:
                detail = outputs[name].get("reason") or f"max abs diff {outputs[name]['max_abs_diff']:.3g} > atol {atol:g} + rtol {rtol:g} * |ref|"
                failure = f"output '{name}' ({shape.describe()}): {detail}"
        case = {"shape": shape.name, "seq": shape.seq, "past": shape.past, "runs_on": description, "outputs": outputs}
        if shape.clamped:
            case["clamped"] = shape.clamped
        cases.append(case)
    return {
        "passed": failure is None,
        "reference": "model.onnx on onnxruntime CPUExecutionProvider, same seeded inputs",
        "rule": "|artifact - reference| <= atol + rtol * |reference|, elementwise, at each output's tolerance",
        "atol": max((t["atol"] for t in tolerances.values()), default=0.0),
        "rtol": max((t["rtol"] for t in tolerances.values()), default=0.0),
        "tolerances": tolerances,
        "max_abs_diff": worst,
        "failure": failure,
        "cases": cases,
    }


def _reference_session(model_path: Path):
    """ONNX Runtime CPU on ``model_path`` as verification runs it (basic graph optimisations only),
    weights not prepacked (prepacking copies every MatMul weight once more; it speeds up repeated
    runs, not the few of a check)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
