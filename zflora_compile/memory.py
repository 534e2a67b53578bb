"""The peak memory a compile will need, estimated before any work, against what the machine has.

Loading, detecting and rewriting hold the graph only: the weights stay memory-mapped on disk
(lazy external data), and writing streams them (``copy_file_range`` for untouched tensors, one
computed tensor at a time). What costs memory is ONNX Runtime. A CPU session holds every weight
once, as fp32 when the model is fp16 or bf16 (the CPU provider inserts casts and folds them into
fp32 copies), plus its buffers. So the estimate is a sum of sessions alive at the same time, per
step, from the weight bytes by dtype:

    session(w) = 1.25 x fp32-equivalent bytes of w

=====================  ====================================================================
step                   sessions alive at once
=====================  ====================================================================
compute (rewrite,      the largest computed tensor in fp32, three times (operands and
write)                 result); the graph
verify full            input and rewritten model
verify regions         one decoder layer's weights, twice (original and rewritten region)
target ort build       the model, not prepacked
artifact check         the model's reference session, then the artifact: one at a time;
                       with verify regions, an ONNX artifact (ort on CPU) region by region:
                       one layer's weights twice
latency gate           base, unfused and fused, all alive
=====================  ====================================================================

The factor was calibrated with ``benchmarks/compile_scale.py`` on Llama-3.2-1B shapes in fp16
(3.0 GB of weights, 5.6 GiB as fp32; measured peak RSS: ORT build without verification 7.8 GiB,
estimated 7.6; full verification 14.8 GiB, estimated 14.7). The limit is the memory available now (``MemAvailable`` and
the cgroup's ``memory.max`` less its current use, the smaller) or ``--memory-limit``; a compile
whose estimate exceeds it is refused before any work (exit 2) with the numbers and what would
fit, instead of being killed by the kernel halfway.
"""

from __future__ import annotations

import re
from pathlib import Path

import onnx_ir as ir

GIB = 1024**3
#: Python, numpy, onnx-ir and ONNX Runtime loaded, before any weights
BASELINE = int(0.6 * GIB)
#: a session's memory per fp32-equivalent weight byte (the weights, its buffers and arena)
SESSION_OVERHEAD = 1.25
_LAYER = re.compile(r"(?:layers|layer|h|blocks|block)[._/](\d+)(?=[._/:]|$)")
_HALF = {ir.DataType.FLOAT16, ir.DataType.BFLOAT16}


def _gib(value: float) -> float:
    return round(value / GIB, 2)


def weight_profile(model: ir.Model) -> dict:
    """Weight bytes as stored, as ONNX Runtime CPU holds them (fp16/bf16 become fp32), the
    largest tensor in fp32 and the heaviest decoder layer (initializers named ``layers.N`` and
    the like), in bytes; read from shapes and dtypes only (no weight is loaded)."""
    stored = fp32 = largest = 0
    layers: dict[int, int] = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        nbytes = tensor.nbytes
        as_fp32 = nbytes * 2 if tensor.dtype in _HALF else nbytes
        stored, fp32 = stored + nbytes, fp32 + as_fp32
        largest = max(largest, int(nbytes / tensor.dtype.itemsize) * 4)
        layer = _layer_of(value)
        if layer is not None:
            layers[layer] = layers.get(layer, 0) + as_fp32
    return {"stored": stored, "fp32": fp32, "largest_fp32": largest, "layer_fp32": max(layers.values(), default=0), "layers": len(layers)}


def _layer_of(value) -> int | None:
    """The decoder layer a weight belongs to: ``layers.N`` (``h.N``, ``blocks.N``) in its name, else
    in the name or the exporter's scope (``namespace`` metadata: torch.onnx's dynamo export) of a
    node that reads it; None when nothing says."""
    texts = [value.name or ""]
    for user, _ in value.uses():
        texts += [user.name or "", user.metadata_props.get("namespace", "")]
    for text in texts:
        found = _LAYER.findall(text)
        if found:
            return int(found[-1])
    return None


def estimate(model: ir.Model, *, verify: str, target: str, check_latency: bool) -> dict:
    """Peak bytes per step and overall for compiling ``model`` with ``verify`` (full, regions or
    off), ``target`` (its name: ``onnx`` builds nothing) and the latency gate."""
    profile = weight_profile(model)
    weights = profile["fp32"]
    steps = {"compute and write": BASELINE + 3 * profile["largest_fp32"]}
    if verify == "full":
        steps["verify (full: two sessions)"] = BASELINE + 2 * SESSION_OVERHEAD * weights
    elif verify == "regions":
        region = profile["layer_fp32"] or weights
        steps["verify (regions: two sessions of one layer)"] = BASELINE + 2 * SESSION_OVERHEAD * region
    if target != "onnx":
        steps[f"target {target} build"] = BASELINE + SESSION_OVERHEAD * weights
        if verify == "regions" and target == "ort":  # targets.check.check_regions
            steps["artifact check (regions: two sessions of one layer)"] = BASELINE + 2 * SESSION_OVERHEAD * (profile["layer_fp32"] or weights)
        else:
            steps["artifact check (one session at a time)"] = BASELINE + SESSION_OVERHEAD * weights
    if check_latency:
        steps["latency gate (three sessions)"] = BASELINE + 3 * SESSION_OVERHEAD * weights
    peak_step = max(steps, key=steps.__getitem__)
    return {
        "weights_gib": _gib(profile["stored"]),
        "weights_fp32_gib": _gib(weights),
        "steps_gib": {name: _gib(value) for name, value in steps.items()},
        "peak_gib": _gib(steps[peak_step]),
        "peak_step": peak_step,
    }


def available_bytes() -> tuple[int | None, str]:
    """Memory this process can still use, and where the number comes from: the smaller of
    ``MemAvailable`` plus the pages being written back (/proc/meminfo) and the cgroup v2 limit
    less its current use; (None, why) where neither can be read."""
    found: list[tuple[int, str]] = []
    try:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines() if line.split()[1:2] and line.split()[1].isdigit()}
        if "MemAvailable" in info:
            # pages waiting to be written back (another job writing a large file) are not counted
            # available, but the kernel frees them as the writes complete: counted here
            pending = info.get("Dirty", 0) + info.get("Writeback", 0)
            found.append((min(info["MemAvailable"] + pending, info.get("MemTotal", 1 << 62)), "MemAvailable + Dirty + Writeback in /proc/meminfo"))
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            current = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            found.append((int(limit) - current, "the cgroup's memory.max less memory.current"))
    except (OSError, ValueError):
        pass
    if not found:
        return None, "no /proc/meminfo or cgroup limit to read"
    return min(found)


def check_fits(model: ir.Model, *, verify: str, target: str, check_latency: bool, limit_gib: float | None = None) -> dict:
    """The report's ``memory`` section; raises :class:`~zflora_compile.errors.EnvironmentProblem`
    (exit 2, nothing written) when the estimated peak exceeds ``limit_gib`` (``--memory-limit``)
    or, without it, the memory available now."""
    from zflora_compile.errors import EnvironmentProblem

    section = estimate(model, verify=verify, target=target, check_latency=check_latency)
    if limit_gib is not None:
        limit, source = int(limit_gib * GIB), "--memory-limit"
    else:
        limit, source = available_bytes()
    section["limit_gib"] = _gib(limit) if limit is not None else None
    section["limit_source"] = source
    section["fits"] = limit is None or section["peak_gib"] * GIB <= limit
    if not section["fits"]:
        raise EnvironmentProblem(
            f"this compile needs an estimated {section['peak_gib']:g} GiB at its peak ({section['peak_step']}; weights {section['weights_gib']:g} GiB, "
            f"{section['weights_fp32_gib']:g} GiB as ONNX Runtime CPU holds them) and {section['limit_gib']:g} GiB is available ({source}); "
            f"{_what_fits(model, verify=verify, target=target, check_latency=check_latency, limit=limit)}"
        )
    return section


def _what_fits(model: ir.Model, *, verify: str, target: str, check_latency: bool, limit: int) -> str:
    """The first of the lighter settings whose estimate fits, as advice."""
    lighter = [
        ("without --check-latency", dict(verify=verify, target=target, check_latency=False)),
        ("with --verify regions", dict(verify="regions" if verify == "full" else verify, target=target, check_latency=False)),
        ("with --target onnx (no engine build) and --verify regions", dict(verify="regions" if verify != "off" else verify, target="onnx", check_latency=False)),
    ]
    for advice, settings in lighter:
        if settings == dict(verify=verify, target=target, check_latency=check_latency):
            continue
        needed = estimate(model, **settings)["peak_gib"]
        if needed * GIB <= limit:
            return f"{advice} it needs about {needed:g} GiB"
    return "no lighter setting fits either: use a machine with more memory"
