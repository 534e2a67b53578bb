"""Swap the adapter of a compiled model: new adapter weights into the fused / widened layout.

The compiled model's ``zflora.compiled`` record (:mod:`zflora_compile.metadata`) names, per fused
LoRA / DoRA / BD-LoRA group, the widened weight ``[in, D + R]`` (columns ``:D`` base lanes, ``D:``
rank lanes), the low-rank constant ``[R, D]``, the per-column scale and the bias; per GAWS group
its block constant; per widened FFA / FBA / FFBA / zFLoRA projection its widened weight and its
lane rows / columns. A swap rewrites only those constants; the base lanes and the graph stay::

      weight'  = [W | A'_1 .. A'_n | 0]          # R' = sum r'_i <= R lanes used, R - R' zero lanes
      lowrank' = [[blockdiag(s'_1 B'_1, ..)],     # [R, D]: the zero lanes read zero rows
                  [0                       ]]
      c'       = m' / ||W_i + s'_i A'_i B'_i||    # DoRA only (per output column), else 1

Which lane belongs to which site is free (the lanes are private to the group), so a group's
capacity is its ``R`` (``--max-rank`` pads groups at compile time). Lane projections keep their
per-lane blocks: lane ``j``'s ``r'_j`` new columns (A) / rows (s B) go first in its compiled block,
the rest are zero (a zFLoRA lane must keep its rank: the RMSNorms are rescaled for ``d + r``).

The new adapter (:mod:`.swap_sources`) is a PEFT LoRA / DoRA directory, an ONNX model with the same
base (detected, planned with ``fuse`` as a compile would, its base lanes compared with the compiled
ones) or a saved FFA / FBA / FFBA / zFLoRA adapter of :mod:`zflora_compile.adapters`. Every
mismatch is an :class:`~zflora_compile.errors.InputError` (exit 2) before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx_ir as ir

from zflora_compile import metadata
from zflora_compile.swap_adapter import Adapter, product, refuse

MODEL_NAME = "model.onnx"




def load_adapter(path: Path) -> Adapter:
    """A PEFT directory, a saved zflora adapter directory or an ONNX model."""
    path = Path(path)
    if path.is_dir():
        config = path / "adapter_config.json"
        if not config.is_file():
            if (path / MODEL_NAME).is_file():
                return load_adapter(path / MODEL_NAME)
            refuse(f"--adapter {path}: no adapter_config.json (a PEFT or zflora adapter directory) and no {MODEL_NAME}")
        from zflora_compile.peft_format import read_config

        meta = read_config(path)
        if meta.get("format") == "zflora-compile-adapter":
            from zflora_compile.swap_sources import ZfloraAdapter

            return ZfloraAdapter(path, meta)
        from zflora_compile.swap_sources import PeftAdapter

        return PeftAdapter(path, meta)
    if path.is_file() and path.suffix == ".onnx":
        from zflora_compile.swap_sources import OnnxAdapter

        return OnnxAdapter(path)
    refuse(f"--adapter {path}: not a PEFT / zflora adapter directory or an ONNX model")


# ---------------------------------------------------------------- the compiled model


def compiled_path(path: Path) -> Path:
    """COMPILED is a model file or an output directory of ``zcompile`` (its ``model.onnx``)."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_NAME
    if not path.is_file():
        refuse(f"{path}: no such compiled model")
    return path


def live_record(model: ir.Model, shown) -> tuple[dict, list[dict]]:
    """The record and its active compilations; merged / run-time / unrecorded forms are refused."""
    record = metadata.read(model)
    live = metadata.active(record)
    if not live:
        refuse(f"{shown} carries no active '{metadata.KEY}' record: it was not compiled (fused) by zflora-compile, or was stripped")
    for entry in live:
        if entry.get("merged"):
            first = entry["merged"][0]
            refuse(
                f"{shown}: the adapter was merged into the weights ({len(entry['merged'])} merged site(s), e.g. "
                f"'{first.get('label') or first.get('site')}'); a merged adapter is not separable, so it cannot be swapped (compile with --strategy fuse)"
            )
        for group in entry.get("runtime_groups", []):
            refuse(f"{shown}: group '{group.get('name')}' reads its adapter weights from graph inputs at run time; feed the new weights there instead")
        for step in entry.get("unrecorded", []):
            refuse(f"{shown}: the {', '.join(step['families'])} sites {', '.join(step['sites'])} carry no record of their adapter lanes")
    return record, live


def capacity(group: dict) -> int:
    return int(group["rank_width"])


# ---------------------------------------------------------------- planning the swap


@dataclasses.dataclass
class Edit:
    """One initializer of the compiled model and its new value."""

    name: str
    array: np.ndarray


def _tensor(model: ir.Model, name: str | None, what: str, shape=None) -> ir.Value:
    value = model.graph.initializers.get(name) if name else None
    if value is None or value.const_value is None:
        refuse(f"the {what} '{name}' the metadata names is not in the compiled model; it was edited after zflora-compile wrote it")
    if shape is not None and tuple(value.const_value.shape) != tuple(shape):
        refuse(f"the {what} '{name}' has shape {list(value.const_value.shape)}, the metadata says {list(shape)}")
    return value


def _dtype(value: ir.Value) -> np.dtype:
    return value.const_value.dtype.numpy()


def _check_base(compiled: np.ndarray, new: np.ndarray, where: str, names: list[str] | None, source: str) -> None:
    """The new adapter's base weight must equal the compiled model's base lanes, bit for bit."""
    if compiled.shape != new.shape or not np.array_equal(compiled, new.astype(compiled.dtype)):
        diff = float(np.max(np.abs(compiled.astype(np.float32) - new.astype(np.float32)))) if compiled.shape == new.shape else float("nan")
        named = f" ('{', '.join(n for n in names if n)}')" if names and any(names) else ""
        refuse(f"the base weight{named} of {source} differs from the compiled model's base lanes {where} (max |diff| {diff:.3g}, shapes {list(new.shape)} / {list(compiled.shape)}): not the same base model")


def plan_group(model: ir.Model, group: dict, adapter: Adapter) -> list[Edit]:
    """New widened weight, low-rank constant (and DoRA scale / bias) of one fused group."""
    D, R, n_in, name = int(group["base_width"]), capacity(group), int(group["in_features"]), group["name"]
    weight = _tensor(model, group.get("weight"), f"widened weight of group '{name}'", (n_in, D + R))
    lowrank = _tensor(model, group.get("lowrank"), f"low-rank constant of group '{name}'", (R, D))
    dtype = _dtype(weight)
    base = weight.const_value.numpy()[:, :D]
    update = adapter.group(group, base)
    if update.base is not None:
        _check_base(base, update.base, f"(columns 0:{D} of '{weight.name}', group '{name}')", update.base_names, adapter.source)
    used = int(update.lanes.shape[1])
    if used > R:
        ranks = " + ".join(f"{label.rsplit('.', 1)[-1]} {r}" for label, r in zip(group["labels"], update.ranks))
        refuse(
            f"group '{name}' has {R} adapter lane(s) (compiled rank{'s' if len(group['labels']) > 1 else ''} plus --max-rank padding); "
            f"the new adapter needs {used} ({ranks}); compile with --max-rank {max(update.ranks)} or more"
        )
    new_weight = np.zeros((n_in, D + R), dtype=dtype)
    new_weight[:, :D] = base
    new_weight[:, D : D + used] = update.lanes.astype(dtype)
    new_low = np.zeros((R, D), dtype=np.float32)
    new_low[:used] = update.lowrank
    edits = [Edit(weight.name, new_weight), Edit(lowrank.name, new_low.astype(_dtype(lowrank)))]
    if group.get("column_scale"):
        scale = _tensor(model, group["column_scale"], f"per-column scale of group '{name}'", (D,))
        c = update.column_scale if update.column_scale is not None else np.ones(D, dtype=np.float32)
        edits.append(Edit(scale.name, c.astype(_dtype(scale))))
    elif update.column_scale is not None and not np.all(update.column_scale == 1):
        refuse(f"group '{name}' was compiled as LoRA (no per-column scale); the new adapter is DoRA there (a magnitude vector): family mismatch")
    if update.bias is None and group.get("bias") and group.get("adapter_bias"):
        # The fused bias is b + s * b_B: a PEFT adapter gives no bias (nor the base's b), so keeping the
        # compiled one would keep the old adapter's lora_bias. Records written before ``adapter_bias``
        # existed do not say; their fused bias is kept (right unless the compiled adapter had lora_bias).
        refuse(
            f"group '{name}' has a fused bias holding the compiled adapter's lora_bias (b + s * b_B); "
            f"{adapter.source} gives no bias (nor the base's b), so the old adapter's would stay; swap from an ONNX model instead"
        )
    if update.bias is not None:
        if group.get("bias"):
            bias = _tensor(model, group["bias"], f"bias of group '{name}'", (D,))
            edits.append(Edit(bias.name, update.bias.astype(_dtype(bias))))
        elif np.any(update.bias != 0):
            refuse(f"group '{name}' was compiled without a bias; the new adapter adds one there (lora_bias): layout mismatch")
    return edits


def plan_grouped(model: ir.Model, group: dict, adapter: Adapter) -> list[Edit]:
    blocks = _tensor(model, group.get("blocks"), f"grouped block constant of group '{group['name']}'", tuple(group["blocks_shape"]))
    new = adapter.grouped(group)
    if tuple(new.shape) != tuple(group["blocks_shape"]):
        refuse(f"GAWS group '{group['name']}' has blocks {group['blocks_shape']}; the new adapter's are {list(new.shape)} (groups and block sizes must match)")
    return [Edit(blocks.name, new.astype(_dtype(blocks)))]


def plan_widened(model: ir.Model, site: dict, adapter: Adapter) -> list[Edit]:
    """A widened projection's weight with the new lanes in the compiled lane blocks (rest zero)."""
    n_in, n_out = int(site["in_features"]), int(site["out_features"])
    shape = tuple(int(v) for v in site["widened_shape"])
    label = site.get("label") or site["site"]
    weight = _tensor(model, site.get("weight"), f"widened weight of '{label}'", shape)
    compiled = weight.const_value.numpy()
    new = adapter.widened(site)
    rows = n_in if not site.get("embedding") else shape[0]
    _check_base(compiled[:rows, :n_out], new.weight[:rows, :n_out], f"(block [:{rows}, :{n_out}] of '{weight.name}')", [new.base_name], adapter.source)
    writes, reads = [int(v) for v in site["out_splits"][1:]], [int(v) for v in site.get("read_ranks", [])]
    new_writes, new_reads = new.out_splits[1:], new.read_ranks
    if len(new_writes) != len(writes) or len(new_reads) != len(reads) or (site.get("embedding") and new.weight.shape[0] != shape[0]):
        refuse(f"'{label}' carries {len(reads)} read and {len(writes)} written lane(s) ({site.get('family')}); the new adapter's has {len(new_reads)} and {len(new_writes)} ({new.family}): family mismatch")
    zflora = "zflora" in site.get("family", "") or "zflora" in new.family
    for what, have, want in (("written", writes, new_writes), ("read", reads, new_reads)):
        for j, (c, r) in enumerate(zip(have, want)):
            if r > c:
                refuse(f"'{label}' has {c} {what} lane(s) in lane block {j}; the new adapter needs {r}: compile with --max-rank {r} or more")
            if zflora and r != c:
                refuse(f"'{label}' (zFLoRA) has rank {c} in lane block {j}, the new adapter {r}: a zFLoRA swap keeps the rank (the RMSNorms are rescaled for d + r)")
    out = np.zeros(shape, dtype=np.float32)
    out[:rows, :n_out] = compiled[:rows, :n_out]
    col, new_col = n_out, n_out
    for c, r in zip(writes, new_writes):
        out[:rows, col : col + r] = new.weight[:rows, new_col : new_col + r]
        col, new_col = col + c, new_col + r
    if not site.get("embedding"):
        row, new_row = n_in, n_in
        for c, r in zip(reads, new_reads):
            out[row : row + r, :n_out] = new.weight[new_row : new_row + r, :n_out]
            row, new_row = row + c, new_row + r
    return [Edit(weight.name, out.astype(_dtype(weight)))]


def plan_swap(model: ir.Model, live: list[dict], adapter: Adapter) -> list[Edit]:
    """Every edit of the swap, every check done first (nothing is changed here)."""
    edits: list[Edit] = []
    for entry in live:
        for group in entry.get("groups", []):
            edits += plan_group(model, group, adapter)
        for group in entry.get("grouped", []):
            edits += plan_grouped(model, group, adapter)
        for site in entry.get("widened", []):
            edits += plan_widened(model, site, adapter)
    left = adapter.unused()
    if left:
        refuse(f"module '{left[0]}' of {adapter.source} has no site in the compiled model ({len(left)} unmapped module(s)); compile a model adapted there first")
    if not edits:
        refuse("the compiled model records no fused group or widened projection to swap into")
    return edits


def apply(model: ir.Model, edits: list[Edit]) -> None:
    for edit in edits:
        value = model.graph.initializers[edit.name]
        value.const_value = ir.tensor(np.ascontiguousarray(edit.array), name=edit.name)


def swap_entry(adapter: Adapter, live: list[dict], edits: list[Edit]) -> dict:
    """The swap's own compilation record (the fused layout stays the earlier compilation's)."""
    from zflora_compile._version import __version__

    return {
        "tool": metadata.TOOL,
        "version": __version__,
        "strategy": "swap",
        "adapter": {"source": adapter.source, "kind": adapter.kind},
        "families": sorted({f for e in live for f in e.get("families", [])}),
        "sites": [],
        "groups": [],
        "widened": [],
        "merged": [],
        "swapped": [e.name for e in edits],
    }


def swap_model(model: ir.Model, adapter: Adapter, shown="the compiled model") -> list[Edit]:
    """Swap ``adapter`` into ``model`` in place; returns the edits made."""
    _, live = live_record(model, shown)
    edits = plan_swap(model, live, adapter)
    apply(model, edits)
    metadata.write(model, swap_entry(adapter, live, edits))
    return edits


# ---------------------------------------------------------------- the merged reference


def merged_reference(model: ir.Model, live: list[dict], adapter: Adapter) -> None:
    """In place: each fused group's adapter merged into its base lanes, ``W_i + s_i A_i B_i`` (numpy,
    fp32), lanes and low-rank constant zero, DoRA's ``c'`` as the column scale -- computed from the
    new adapter's factors per site, not from the swapped lane layout."""
    for entry in live:
        for group in entry.get("groups", []):
            D = int(group["base_width"])
            weight = model.graph.initializers[group["weight"]]
            base = weight.const_value.numpy()[:, :D]
            update = adapter.group(group, base)
            merged = base.astype(np.float32).copy()
            row = col = 0
            for rank, out in zip(update.ranks, group["out_splits"]):
                a = update.lanes[:, row : row + rank]
                b = update.lowrank[row : row + rank, col : col + out]
                merged[:, col : col + out] += product(a, b)
                row, col = row + rank, col + out
            array = np.zeros(weight.const_value.shape, dtype=_dtype(weight))
            array[:, :D] = merged.astype(array.dtype)
            weight.const_value = ir.tensor(array, name=weight.name)
            low = model.graph.initializers[group["lowrank"]]
            low.const_value = ir.tensor(np.zeros(low.const_value.shape, dtype=_dtype(low)), name=low.name)
            if group.get("column_scale") and update.column_scale is not None:
                scale = model.graph.initializers[group["column_scale"]]
                scale.const_value = ir.tensor(update.column_scale.astype(_dtype(scale)), name=scale.name)
            if update.bias is not None and group.get("bias"):
                bias = model.graph.initializers[group["bias"]]
                bias.const_value = ir.tensor(update.bias.astype(_dtype(bias)), name=bias.name)


# ---------------------------------------------------------------- the file command


FORMATS = ("onnx", "onnx_adapter", "trt")

PEFT_REFERENCE = (
    "the compiled model with each fused group's new adapter merged into its base lanes in numpy "
    "(W_i + s_i A_i @ B_i in fp32, rank lanes and low-rank constants zero, DoRA's column scale m / ||W + sAB||)"
)


def _verify(adapter: Adapter, model: ir.Model, swapped: Path, live: list[dict], tmp: Path, vocab, options: dict) -> dict:
    """The swapped model (saved at ``swapped``) against an independent reference: the new adapter's
    own ONNX model run unfused, or (PEFT) ``model`` turned in place into the merged reference (the
    base lanes are the compiled ones: the swap copies them)."""
    from zflora_compile.model_io import save_model
    from zflora_compile.verify import verify_models

    if adapter.reference is not None:
        reference, meaning = adapter.reference, f"the new adapter's ONNX model {adapter.source}, unfused"
    elif hasattr(adapter, "modules"):
        merged_reference(model, live, adapter)
        reference = tmp / "reference.onnx"
        save_model(model, reference, external=True)
        meaning = PEFT_REFERENCE
    else:
        return {"skipped": True, "passed": None, "reason": f"no independent reference for a {adapter.kind} adapter without its base model (its lanes were read from an unfused export on a random base)"}
    result = verify_models(reference, swapped, vocab, atol=options.get("atol"), rtol=options.get("rtol"), seed=options.get("seed", 0))
    result["reference"] = meaning
    return result


def _staging(output: Path, force: bool) -> Path:
    import tempfile

    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not force:
        refuse(f"output directory {output} exists and is not empty (--force replaces it)")
    output.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))


def _commit(staging: Path, output: Path) -> None:
    import os
    import shutil

    if output.exists():
        shutil.rmtree(output) if output.is_dir() and not output.is_symlink() else output.unlink()
    os.replace(staging, output)


def _trt_plan(source: Path) -> Path:
    """``--format trt``: the compiled output directory's refittable ``model.plan`` (TensorRT present)."""
    from zflora_compile.errors import DependencyError
    from zflora_compile.targets.trt import PLAN_NAME, TrtTarget

    plan = source.parent / PLAN_NAME
    if not plan.is_file():
        refuse(f"--format trt: no {PLAN_NAME} beside {source} (compile with --target trt --refit)")
    missing = TrtTarget.missing_dependency()
    if missing:
        raise DependencyError(f"swap --format trt: TensorRT is not available: {missing}")
    return plan


def refit_arrays(model: ir.Model, live: list[dict], edits: list[Edit]) -> dict:
    """Every adapter-owned tensor's swapped value for a TensorRT refit: the edits, and the owned tensors the
    swap left as they were (a kept fused bias): TensorRT combines a GEMM's weight with its bias, and a
    refit that sets only one of them reports the other missing."""
    from zflora_compile.deploy.onnx_adapter import owned_names

    arrays = {e.name: e.array for e in edits}
    for name in (n for entry in live for n in owned_names(entry)):
        value = model.graph.initializers.get(name)
        if name not in arrays and value is not None and value.const_value is not None:
            arrays[name] = value.const_value.numpy()
    return arrays


def swap_file(compiled, adapter_path, output, *, fmt: str = "onnx", verify: bool = True, atol=None, rtol=None, seed: int = 0, force: bool = False) -> dict:
    """``zcompile swap``: write ``output/model.onnx`` (``fmt`` ``onnx``) or ``output/adapter.onnx_adapter``
    (``onnx_adapter``: the new adapter's tensors only, for a model compiled with ``--adapter-inputs``)
    and ``output/report.json``; returns the report. Nothing is written on any error."""
    import shutil
    import tempfile
    import time

    from zflora_compile.errors import VerificationError
    from zflora_compile.model_io import has_external_data, load_model, save_model
    from zflora_compile.verify import token_vocab, verification_failure_message

    if fmt not in FORMATS:
        refuse(f"--format {fmt}: choose from {', '.join(FORMATS)}")
    clock, timings = time.perf_counter(), {}
    source, output = compiled_path(Path(compiled)), Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not force:
        refuse(f"output directory {output} exists and is not empty (--force replaces it)")
    model = load_model(source)
    _, live = live_record(model, source)
    adapter = load_adapter(Path(adapter_path))
    timings["load"] = time.perf_counter() - clock
    start = time.perf_counter()
    edits = plan_swap(model, live, adapter)
    apply(model, edits)
    if fmt == "onnx_adapter":
        from zflora_compile.deploy.onnx_adapter import adapter_inputs, check_inputs

        check_inputs(model, edits, live, source)
    if fmt == "trt":
        plan = _trt_plan(source)
    metadata.write(model, swap_entry(adapter, live, edits))
    timings["swap"] = time.perf_counter() - start
    report = {
        "command": "swap",
        "compiled": str(source),
        "adapter": {"source": adapter.source, "kind": adapter.kind},
        "format": fmt,
        "swapped": [{"name": e.name, "shape": list(e.array.shape)} for e in edits],
        "capacity": [{"group": g["name"], "lanes": capacity(g)} for e in live for g in e.get("groups", [])],
    }
    staging = _staging(output, force)
    try:
        with tempfile.TemporaryDirectory(prefix="zflora-swap-") as tmp:
            tmp = Path(tmp)
            vocab = token_vocab(model)
            swapped = save_model(model, (tmp if fmt == "onnx_adapter" else staging) / MODEL_NAME, external=True if has_external_data(model) else None)[0]
            if fmt == "onnx_adapter":
                from zflora_compile.deploy.onnx_adapter import write_adapter

                write_adapter(model, adapter_inputs(live), staging / "adapter.onnx_adapter")
            if fmt == "trt":
                from zflora_compile.targets.trt import PLAN_NAME, refit_plan

                start = time.perf_counter()
                report["refitted"] = refit_plan(plan, refit_arrays(model, live, edits), staging / PLAN_NAME)
                timings["refit"] = time.perf_counter() - start
            if verify:  # last: a PEFT reference is made from the in-memory model
                start = time.perf_counter()
                report["verification"] = _verify(adapter, model, swapped, live, tmp, vocab, {"atol": atol, "rtol": rtol, "seed": seed})
                timings["verify"] = time.perf_counter() - start
                if report["verification"].get("passed") is False:
                    raise VerificationError(verification_failure_message(report["verification"]))
            else:
                report["verification"] = {"skipped": True, "passed": None, "reason": "--no-verify"}
        report["files"] = sorted(p.name for p in staging.iterdir()) + ["report.json"]
        timings["total"] = time.perf_counter() - clock
        report["timings_s"] = timings
        report["status"], report["exit_code"] = "ok", 0
        report["message"] = f"swapped {len(edits)} tensor(s) from {adapter.source}"
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        _commit(staging, output)
        staging = None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return report
