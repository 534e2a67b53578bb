"""Non-finite weights are refused (``InputError``, exit 2, naming the site and tensor) before they
can surface as a meaningless "max abs diff nan" in verification, or as NaN on both sides.

Two places check. Before the rewrite, :func:`check_finite_weights` reads what the write will not
compute from: every site's A, B and bias, the computed ``s·B`` (fuse; fp16 can overflow), and W
where the plan computes from it but is not plain LoRA (strip copies W untouched and never reads
it: a non-finite W is the base model's own, written as it is). The write checks the rest as it
computes it: plain LoRA's fused weight ``[W | A]`` and merged weight ``W + s·A@B`` are tested once,
in fp32 before the cast (:func:`refuse_non_finite`); only when one is not finite are its operands
read again to name the culprit. Checking W before the write read every projection weight twice
(measured at 8B fp16: 28 s for fuse and 95 s for merge, of 405 s and 485 s).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from zflora_compile.errors import InputError
from zflora_compile.graph.records import AdapterSite, numpy_dtype
from zflora_compile.model_io import release_weights

_EXPONENT_BITS = {"float16": 0x7C00, "bfloat16": 0x7F80}


def as_float32(array) -> np.ndarray:
    return np.asarray(array).astype(np.float32, copy=False)


def non_finite(array: np.ndarray) -> str | None:
    """"NaN", "Inf" or None: what an array holds that is not a finite number."""
    array = np.asarray(array)
    if array.dtype.kind == "V" or array.dtype.name == "bfloat16":
        array = as_float32(array)
    if not np.issubdtype(array.dtype, np.floating):
        return None
    with np.errstate(all="ignore"):
        if np.isnan(array).any():
            return "NaN"
        if np.isinf(array).any():
            return "Inf"
    return None


def all_finite(array: np.ndarray) -> bool:
    """True when every element is a finite number: the exponent bits of a 16-bit float (all ones
    is Inf or NaN), ``isfinite`` otherwise; one pass, no fp32 copy."""
    mask = _EXPONENT_BITS.get(array.dtype.name)
    if mask is not None:
        return not np.any((array.view(np.uint16) & mask) == mask)
    return non_finite(array) is None


def fits(fp32: np.ndarray, dtype: np.dtype) -> bool:
    """True when ``fp32`` is finite and casts to ``dtype`` without overflowing (``|x| <= max``
    rounds to at most ``max``)."""
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":
        import ml_dtypes

        limit = float(ml_dtypes.finfo(dtype).max)
    else:
        limit = float(np.finfo(dtype).max) if dtype.kind == "f" and dtype.itemsize < 4 else np.inf
    with np.errstate(all="ignore"):
        if not np.isfinite(fp32).all():
            return False
        return fp32.size == 0 or (float(fp32.max()) <= limit and float(fp32.min()) >= -limit)


def _walk_to_constant(frontier: list) -> str | None:
    """The name of the first non-finite constant on ``frontier`` or up to four producers back."""
    seen = set()
    for _ in range(4):
        following = []
        for value in frontier:
            if value is None or id(value) in seen:
                continue
            seen.add(id(value))
            if getattr(value, "const_value", None) is not None:
                try:
                    array = np.asarray(value.const_value.numpy())
                except Exception:  # noqa: BLE001 - an unreadable constant is not this check's business
                    continue
                if non_finite(array):
                    return value.name
            elif callable(getattr(value, "producer", None)) and value.producer() is not None:
                following.extend(v for v in value.producer().inputs if v is not None)
        frontier = following
    return None


def non_finite_tensor(model, site) -> str | None:
    """The name of a non-finite constant read by the site's nodes (or one step before them)."""
    if model is None:
        return None
    nodes = {n.name: n for n in model.graph.all_nodes()}  # subgraph sites too (names may repeat across branches: best effort)
    return _walk_to_constant([v for name in site.nodes if name in nodes for v in nodes[name].inputs if v is not None])


def _refusal(site, strategy: str, tensor: str, what: str, *, name: str | None = None, computed: bool = False) -> InputError:
    if computed:
        how = f"{tensor} computed in {site.dtype} ({strategy}) overflows to {what}"
    else:
        how = f"{tensor}{f' (tensor {name!r})' if name else ''} holds {what}"
    return InputError(f"site {site.site_id} ({site.label}): {how}; non-finite adapter weights cannot be compiled")


def checked_at_write(site, strategy: str) -> bool:
    """True when the write computes the site's W into a new weight and checks it there."""
    return type(site) is AdapterSite and strategy in ("fuse", "merge") and site.weight is not None


def reads_w_first(site, strategy: str, deferred: bool = True) -> bool:
    """True when :func:`check_finite_weights` reads the site's W: the plan computes from it and the
    write does not check it (``deferred``: the file pipeline, which writes into a staging directory
    before anything else reads the rewritten model; a caller's in-memory model is checked before it
    is rewritten, so that a refusal leaves it as it was). Strip never reads W (its bytes are copied
    untouched): a non-finite W is the base model's own, and what the base computes is what strip writes."""
    return site.weight is not None and strategy != "strip" and not (deferred and checked_at_write(site, strategy))


def refuse_non_finite(site, strategy: str, tensor: str, result: np.ndarray | None = None, *, fp32: np.ndarray | None = None) -> None:
    """Raise when a weight the write computed for ``site`` is not finite (``result`` in the site's
    dtype, or ``fp32`` before its cast): naming W when W holds it, else the computed ``tensor``'s
    overflow. Costs one pass over the result when it is finite."""
    dtype = numpy_dtype(site.dtype)
    if fp32 is not None and not fits(fp32, dtype):
        with np.errstate(all="ignore"):
            result = fp32.astype(dtype)  # above the largest finite value may still round to it
    elif fp32 is not None:
        return
    if all_finite(result):
        return
    what = non_finite(site.weight())
    if what:
        gemm = getattr(site.binding, "gemm", None)
        raise _refusal(site, strategy, "W", what, name=_walk_to_constant([getattr(gemm, "weight", None)]))
    what = non_finite(result) or "Inf"
    raise _refusal(site, strategy, tensor, what, computed=True)


def check_finite_weights(detection, strategy: str, model=None, progress=None, *, deferred: bool = False) -> None:
    """Refuse non-finite weights the plan touches and the write does not check (module doc):
    every site's bias, A and B, the ``s·B`` a fuse computes, and W with ``W + s·A@B`` where
    :func:`reads_w_first`. ``model`` (an ``onnx_ir.Model``), when given, lets the
    message name the initializer; ``progress`` shows a bar per site when W is read here;
    ``deferred``: plain LoRA's W is left to the write (:func:`reads_w_first`)."""
    from zflora_compile.progress import NullProgress

    reads_w = [s for s in detection.sites if reads_w_first(s, strategy, deferred)] + [s for s in detection.widened if strategy != "strip"]
    shown = progress if reads_w and progress is not None else NullProgress()
    with shown.bar(f"checking {len(reads_w)} projection weight(s) for NaN / Inf", len(detection.sites)) as advance:
        _check_sites(detection, strategy, model, advance, deferred)


def _check_sites(detection, strategy: str, model, advance, deferred: bool) -> None:
    """:func:`check_finite_weights` for every site, ``advance()`` after each."""

    def checked(site, tensor: str, getter):
        if getter is None:
            return None
        array = np.asarray(getter())
        what = non_finite(array)
        if what:
            raise _refusal(site, strategy, tensor, what, name=non_finite_tensor(model, site))
        return array

    def computed(site, tensor: str, value: np.ndarray, dtype) -> None:
        with np.errstate(all="ignore"):
            what = non_finite(value.astype(dtype))
        if what:
            raise _refusal(site, strategy, tensor, what, computed=True)

    for site in detection.sites:
        dtype = numpy_dtype(site.dtype)
        weight = checked(site, "W", site.weight) if reads_w_first(site, strategy, deferred) else None
        checked(site, "bias", site.bias)
        if isinstance(site, AdapterSite) and getattr(site.binding, "adapter_bias", None) is not None:
            checked(site, "the bias on B", site.binding.adapter_bias)  # PEFT lora_bias: fused or merged into the bias
        a = checked(site, "A", site.lora_a)
        b = checked(site, "B", site.lora_b)
        if strategy == "fuse" and b is not None:
            with np.errstate(all="ignore"):
                computed(site, "s·B", np.float32(site.scale) * as_float32(b), dtype)
        elif strategy == "merge" and weight is not None and a is not None and b is not None:
            with np.errstate(all="ignore"):
                merged = as_float32(weight) + np.float32(site.scale) * (as_float32(a) @ as_float32(b))
            computed(site, "W + s·A@B", merged, dtype)
            del merged
        del weight, a, b
        if model is not None:
            release_weights(model)  # one site's weights resident at a time, not the model's
        advance()
    for site in detection.widened:
        dtype = numpy_dtype(site.dtype)
        if strategy != "strip":
            checked(site, "W", site.weight)
        for write in site.writes:
            checked(site, f"A (lane {write.lane})", write.lora_a)
        for read in site.reads:
            b = checked(site, f"B (lane {read.lane})", read.lora_b)
            if b is not None and strategy in ("fuse", "merge"):
                with np.errstate(all="ignore"):
                    computed(site, f"s·B (lane {read.lane})", np.float32(read.scale) * as_float32(b), dtype)


def refuse_unverifiable(result: dict, source) -> None:
    """Raise ``InputError`` (exit 2) when verification failed only because an output holds no
    finite value on either side and the input model itself holds a non-finite weight (a NaN in a
    base weight strip copied untouched, or in a weight no rewrite reads, spreads through the
    model): the input is at fault, not the rewrite; the tensor is named. Reads the input's
    weights, on this failure path only."""
    from zflora_compile.model_io import load_model

    hopeless = [(case.get("case"), name) for case in result.get("cases", []) for name, o in case.get("outputs", {}).items() if str(o.get("reason", "")).startswith("no finite value")]
    failing = [name for case in result.get("cases", []) for name, o in case.get("outputs", {}).items() if not o.get("passed", True)]
    if not hopeless or len(hopeless) != len(failing):
        return
    model = load_model(source)
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or not tensor.dtype.is_floating_point():
            continue
        what = non_finite(tensor.numpy())
        if isinstance(tensor, ir.ExternalTensor):
            tensor.release()  # this tensor's pages only (release_weights walks every initializer)
        if what:
            raise InputError(
                f"{source}: initializer '{value.name}' holds {what}: output '{hopeless[0][1]}' ({hopeless[0][0]}) has no finite value in the input model either, "
                "so the rewrite cannot be verified; non-finite weights cannot be compiled"
            )
