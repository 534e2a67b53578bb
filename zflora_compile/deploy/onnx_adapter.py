"""ONNX Runtime adapter files (``.onnx_adapter``) for a fused model compiled with ``--adapter-inputs``.

Layout (chosen to keep the fused speed): every adapter-owned tensor of the fused layout the record
names -- each group's widened weight ``[in, D + R]`` whole, its low-rank constant ``blockdiag(s B)``
``[R, D]``, DoRA's per-column scale, a fused bias, GAWS blocks, each widened lane projection's
weight -- stays an initializer (its default: the compiled adapter) and also becomes a graph input of
the same name. ONNX Runtime binds an adapter's parameters by name to such inputs
(``RunOptions.add_active_adapter(LoraAdapter)``), so a session switches adapters per run without
reloading, and the graph still runs one packed GEMM per group: ``x @ [W | A]``. The price is that
the adapter file carries the base columns ``W`` of each widened weight (``in * (D + R)`` values per
group, not ``in * R``): splitting ``W`` off would cost a ``Concat`` of the whole weight per run, or a
second GEMM, which is what fusing removed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from zflora_compile.errors import InputError

FILE_NAME = "adapter.onnx_adapter"


def owned_names(entry: dict) -> list[str]:
    """The adapter-owned tensors one compilation record names (the tensors a swap may change)."""
    names = []
    for group in entry.get("groups", []):
        names += [group.get(k) for k in ("weight", "lowrank", "column_scale", "bias") if group.get(k)]
    names += [g["blocks"] for g in entry.get("grouped", []) if g.get("blocks")]
    names += [w["weight"] for w in entry.get("widened", []) if w.get("weight")]
    return names


def expose_inputs(model: ir.Model, entry: dict) -> list[str]:
    """Make each adapter-owned initializer of the main graph a graph input too (its value the
    default); returns their names. A name in a subgraph only is left alone (not bindable)."""
    graph, exposed = model.graph, []
    present = {v.name for v in graph.inputs}
    for name in owned_names(entry):
        value = graph.initializers.get(name)
        if value is None or name in present:
            continue
        graph.inputs.append(value)
        present.add(name)
        exposed.append(name)
    return exposed


def adapter_inputs(live: list[dict]) -> list[str]:
    return [n for e in live for n in e.get("adapter_inputs", [])]


def check_inputs(model: ir.Model, edits, live: list[dict], source) -> None:
    """``swap --format onnx_adapter`` needs every swapped tensor to be a bindable graph input."""
    bound = set(adapter_inputs(live))
    for edit in edits:
        if edit.name not in bound:
            raise InputError(
                f"swap --format onnx_adapter: tensor '{edit.name}' of {source} is no graph input (compile with --adapter-inputs), so an adapter file cannot bind it"
            )


def write_adapter(model: ir.Model, names: list[str], path: Path) -> Path:
    """The current values of ``names`` as an ONNX Runtime adapter file at ``path``."""
    import onnxruntime as ort

    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    values = {}
    for name in names:
        tensor = model.graph.initializers[name].const_value
        values[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(tensor.numpy()))
    adapter.set_parameters(values)
    adapter.export_adapter(str(Path(path).resolve()))
    return Path(path)


def write_compiled_adapter(model: ir.Model, directory: Path) -> list[str]:
    """At compile time (``--adapter-inputs``): the compiled adapter's own file beside the model."""
    from zflora_compile import metadata

    names = adapter_inputs(metadata.active(metadata.read(model)))
    if not names:
        return []
    write_adapter(model, names, Path(directory) / FILE_NAME)
    return [FILE_NAME]
