"""What a compiled model says about itself: the ``zflora.compiled`` record in ``metadata_props``.

Every rewrite's ``emit`` notes a small JSON-able record of what it created (:func:`note`): a fused
LoRA / DoRA group its widened weight ``[in, D + R]`` (columns ``:D`` the base lanes, ``D:`` the
rank lanes), its low-rank constant ``blockdiag(s_i B_i)`` ``[R, D]``, its per-column scale and its
bias; a merge the weights it replaced; a widened lane projection (FFA / FBA / FFBA / zFLoRA) its
widened weight and how many rows / columns are lanes. :func:`write` stores them, with the tool
version, strategy and sites, in the model's ``metadata_props`` under :data:`KEY`; a model compiled
twice keeps every compilation, in order (``compilations``).

A run-time fused group (:mod:`~zflora_compile.families.runtime`: adapter weights fed as graph inputs,
quantized bases) is recorded under ``runtime_groups``; strip of a compiled model refuses it.

``strip`` of a compiled model (:func:`strip_compiled`) uses the record, not the families: each
fused group's add of ``rank_lanes @ lowrank`` (and DoRA's per-column multiply) is bypassed and the
widened weight is sliced back to its first ``D`` columns, so the group stays one packed GEMM
computing exactly the base projections; an FFA / FBA / FFBA projection is rebuilt from its weight's
first ``in`` rows and ``out`` columns (the lanes it read and wrote die with it). A merged adapter
cannot be separated, zFLoRA has no stripped form, and a record that does not match the graph
(names missing, shapes differ) is refused: :class:`~zflora_compile.errors.InputError` (exit 2).
The strip reference (:func:`disable_compiled`) is the compiled model with every low-rank constant
(a widened weight's B rows) zeroed and every per-column scale set to 1.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from zflora_compile._version import __version__
from zflora_compile.errors import InputError
from zflora_compile.graph.records import LazyArray

KEY = "zflora.compiled"
FORMAT = 1
TOOL = "zflora-compile"


# ---------------------------------------------------------------- recording (called from emit)


def note(state: dict, step, record: dict) -> None:
    """``record`` is what ``step`` (a rewrite) created: kept in ``state['compiled']`` and on the step
    (``families.rewrite`` keeps its ``state`` to itself; the pipeline reads the plan's steps)."""
    state.setdefault("compiled", []).append(record)
    step.compiled = record


def created_name(value, operand: int = 1) -> str | None:
    """The name of the constant the node producing ``value`` reads at ``operand`` (what an emitter's
    ``project`` / ``scale`` created); None where the IR has no such name (torch.fx)."""
    producer = getattr(value, "producer", None)
    if not callable(producer):
        return None
    node = producer()
    return operand_name(node, operand) if node is not None else None


def producer_input(value, operand: int):
    """The value the node producing ``value`` reads at ``operand`` (None outside ONNX)."""
    producer = getattr(value, "producer", None)
    node = producer() if callable(producer) else None
    return node.inputs[operand] if node is not None and len(node.inputs) > operand else None


def operand_name(node, operand: int = 1) -> str | None:
    inputs = getattr(node, "inputs", None)
    if inputs is None or len(inputs) <= operand or inputs[operand] is None:
        return None
    return inputs[operand].name


def value_name(value) -> str | None:
    """An ONNX value's name (None for torch.fx nodes: FX programs carry no record)."""
    return value.name if isinstance(value, ir.Value) else None


def merged_record(site, node) -> dict:
    """A merge: ``node`` now reads a weight with the adapter folded in (no longer separable)."""
    return {"kind": "merged", "site": site.site_id, "label": site.label, "family": site.family, "weight": operand_name(node, 1), "separable": False}


def site_json(site) -> dict:
    return {"id": site.site_id, "family": site.family, "label": site.label}


# ---------------------------------------------------------------- the record in metadata_props


def read(model: ir.Model) -> dict | None:
    """The record of ``model`` (None when it was not compiled by this tool); a record that is not
    JSON is refused (exit 2)."""
    text = model.metadata_props.get(KEY)
    if text is None:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"the model's metadata '{KEY}' is not JSON ({error.msg}); it was edited after zflora-compile wrote it") from None
    if not isinstance(record, dict) or not isinstance(record.get("compilations"), list):
        raise InputError(f"the model's metadata '{KEY}' has no 'compilations' list; it was edited after zflora-compile wrote it")
    return record


def read_file(path) -> dict | None:
    """The record of the ONNX file at ``path`` (None for a model without one or that is no ONNX file)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - a torch program or anything onnx cannot parse carries no record
        return None
    text = next((p.value for p in proto.metadata_props if p.key == KEY), None)
    if text is None:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return {"unreadable": True}
    return record if isinstance(record, dict) and isinstance(record.get("compilations"), list) else {"unreadable": True}


def compilation(strategy: str, detection, plan, removed: dict | None = None) -> dict:
    """This compilation: tool version, strategy, the sites and what each rewrite created."""
    steps = [getattr(step, "compiled", None) or _unnoted(step) for step in plan]
    return {
        "tool": TOOL,
        "version": __version__,
        "strategy": strategy,
        "families": sorted({site.family for site in detection.all_sites}),
        "sites": [site_json(site) for site in detection.all_sites],
        "groups": [s for s in steps if s and s["kind"] == "fused_group"],
        **({"grouped": grouped} if (grouped := [s for s in steps if s and s["kind"] == "grouped"]) else {}),
        **({"runtime_groups": runtime} if (runtime := [s for s in steps if s and s["kind"] == "runtime_group"]) else {}),
        "widened": [s for s in steps if s and s["kind"] == "widened"],
        "merged": [s for s in steps if s and s["kind"] == "merged"],
        **({"unrecorded": unrecorded} if (unrecorded := [s for s in steps if s and s["kind"] == "unrecorded"]) else {}),
        **({"removed": removed} if removed else {}),
    }


def _unnoted(step) -> dict | None:
    """A rewrite that noted nothing: a merge (the generic linear family's) is still a merge."""
    section = getattr(step, "section", None)
    if section == "merged_sites" and hasattr(step, "site"):
        return merged_record(step.site, None)
    if section in ("fused_groups", "widened"):  # a fused form whose emit records nothing: strip cannot separate it
        sites = getattr(step, "sites", None) or [getattr(step, "site", None)]
        return {"kind": "unrecorded", "section": section, "sites": [s.site_id for s in sites if s is not None], "families": sorted({s.family for s in sites if s is not None})}
    return None


def write(model: ir.Model, entry: dict) -> dict:
    """Append ``entry`` to the model's record (created if absent) and store it; returns the record."""
    try:
        record = read(model)
    except InputError:  # an unreadable record is replaced (only strip relies on it, and refuses it)
        record = None
    record = record or {"format": FORMAT, "tool": TOOL, "compilations": []}
    record["compilations"].append(entry)
    model.metadata_props[KEY] = json.dumps(record, separators=(",", ":"))
    return record


def active(record: dict | None) -> list[dict]:
    """The compilations whose rewrites are still in the model: those after the last ``strip``."""
    if not record:
        return []
    entries = record["compilations"]
    last = max((i for i, e in enumerate(entries) if e.get("strategy") == "strip"), default=-1)
    return [e for e in entries[last + 1 :] if isinstance(e, dict)]


def summary(record: dict | None) -> dict | None:
    """What is compiled into a model, for ``inspect``: the record and its active compilations' totals."""
    if not record:
        return None
    if record.get("unreadable"):
        return {"key": KEY, "unreadable": True, "compilations": [], "active": None}
    live = active(record)
    return {
        "key": KEY,
        "compilations": record["compilations"],
        "active": {
            "strategies": [e.get("strategy") for e in live],
            "versions": sorted({str(e.get("version")) for e in live}),
            "families": sorted({f for e in live for f in e.get("families", [])}),
            "sites": sum(len(e.get("sites", [])) for e in live),
            "groups": [g["name"] for e in live for g in e.get("groups", [])],
            "widened": [w["site"] for e in live for w in e.get("widened", [])],
            "merged": [m["site"] for e in live for m in e.get("merged", [])],
        },
    }


# ---------------------------------------------------------------- strip of a compiled model


def _refuse(reason: str):
    raise InputError(f"strip of a compiled model: {reason}")


def check_separable(record: dict | None) -> list[dict]:
    """The active compilations, or :class:`InputError` when one merged its adapter into the weights."""
    live = active(record)
    for entry in live:
        if entry.get("merged"):
            raise InputError(
                f"the adapter was merged into the weights by zflora-compile {entry.get('version')}; a merged adapter cannot be separated "
                f"({len(entry['merged'])} merged site(s), e.g. '{entry['merged'][0].get('label') or entry['merged'][0].get('site')}')"
            )
        for group in entry.get("runtime_groups", []):
            raise InputError(
                f"strip of a compiled model: group '{group.get('name')}' (sites {', '.join(group.get('sites', []))}) was fused by zflora-compile "
                f"{entry.get('version')} from adapter weights fed at run time or a quantized base; its adapter GEMMs are not separable "
                "from the record; strip the model it was compiled from"
            )
        for step in entry.get("unrecorded", []):
            raise InputError(
                f"strip of a compiled model: the {', '.join(step['families'])} {step['section'].replace('_', ' ')} compiled in by zflora-compile "
                f"{entry.get('version')} (sites {', '.join(step['sites'])}) carry no record of their adapter lanes; they cannot be separated"
            )
        for group in entry.get("groups", []):
            if group.get("adapter_bias"):
                raise InputError(
                    f"strip of a compiled model: group '{group.get('name')}' was fused by zflora-compile {entry.get('version')} from an adapter "
                    "with lora_bias: its bias holds the base bias and the adapter's (b + s*b_B) and the base bias is not kept apart; "
                    "strip the model it was compiled from"
                )
        for widened in entry.get("widened", []):
            if "zflora" in widened.get("family", ""):
                raise InputError(
                    f"the zFLoRA adapter at '{widened.get('label') or widened.get('site')}' was compiled in by zflora-compile "
                    f"{entry.get('version')}: its widened residual stream and rescaled RMSNorms have no stripped form"
                )
    return live


class _Graph:
    """The named initializers and value consumers of an ONNX graph, for matching a record."""

    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = model.graph

    def initializer(self, name: str | None, what: str, shape: tuple[int, ...]) -> ir.Value:
        value = self.graph.initializers.get(name) if name else None
        if value is None or value.const_value is None:
            _refuse(f"the {what} '{name}' the metadata names is not in the graph; the model was edited after zflora-compile wrote it")
        if tuple(value.const_value.shape) != tuple(shape):
            _refuse(f"the {what} '{name}' has shape {list(value.const_value.shape)}, the metadata says {list(shape)}; the model was edited after zflora-compile wrote it")
        return value

    def sole_user(self, value: ir.Value, op: str, what: str) -> ir.Node:
        users = [u for u, _ in value.uses()]
        if len(users) != 1 or users[0].op_type != op or users[0].domain not in ("", "ai.onnx"):
            found = ", ".join(f"{u.op_type} '{u.name}'" for u in users) or "nothing"
            _refuse(f"{what} '{value.name}' should feed one {op}, it feeds {found}; the model was edited after zflora-compile wrote it")
        return users[0]

    def split_sizes(self, node: ir.Node) -> list[int] | None:
        if len(node.inputs) < 2 or node.inputs[1] is None or node.inputs[1].const_value is None:
            return None
        axis = node.attributes.get("axis")
        if axis is not None and axis.value not in (-1,) and axis.value != _rank(node.inputs[0]) - 1:
            return None
        return [int(v) for v in node.inputs[1].const_value.numpy().reshape(-1)]


def _rank(value: ir.Value) -> int:
    return len(value.shape) if value.shape is not None else -99


def _sliced(value: ir.Value, rows: int, cols: int) -> LazyArray:
    tensor = value.const_value
    dtype = tensor.dtype.numpy()
    return LazyArray((rows, cols), dtype, lambda t=tensor, r=rows, c=cols: np.ascontiguousarray(t.numpy()[:r, :c]))


def _plan_group(g: _Graph, group: dict):
    """The edits that remove one fused group's rank lanes (checked against the record first)."""
    D, R, n_in = int(group["base_width"]), int(group["rank_width"]), int(group["in_features"])
    name = group["name"]
    weight = g.initializer(group.get("weight"), f"widened weight of group '{name}'", (n_in, D + R))
    lowrank = g.initializer(group.get("lowrank"), f"low-rank constant of group '{name}'", (R, D))
    scale = g.initializer(group["column_scale"], f"per-column scale of group '{name}'", (D,)) if group.get("column_scale") else None
    wide = g.sole_user(weight, "MatMul", f"widened weight of group '{name}'")
    if wide.inputs[1] is not weight:
        _refuse(f"the widened weight of group '{name}' is not the MatMul's weight operand")
    split = g.sole_user(wide.outputs[0], "Split", f"the widened GEMM of group '{name}'")
    if g.split_sizes(split) != [D, R] or len(split.outputs) != 2:
        _refuse(f"the split after group '{name}''s widened GEMM is not [{D}, {R}] on the last axis; the model was edited after zflora-compile wrote it")
    lanes, base = split.outputs[1], split.outputs[0]
    low = g.sole_user(lowrank, "MatMul", f"low-rank constant of group '{name}'")
    if low.inputs[0] is not lanes or low.inputs[1] is not lowrank:
        _refuse(f"the low-rank GEMM of group '{name}' does not read the rank lanes {D}: of its widened GEMM")
    add = g.sole_user(low.outputs[0], "Add", f"the low-rank product of group '{name}'")
    other = add.inputs[0] if add.inputs[1] is low.outputs[0] else add.inputs[1]
    out, keep = add.outputs[0], other  # the add passes its base operand through
    if scale is not None:
        mul = g.sole_user(scale, "Mul", f"per-column scale of group '{name}'")
        if out not in mul.inputs:
            _refuse(f"the per-column scale of group '{name}' does not multiply the group's sum")
        out = mul.outputs[0]
    return weight, wide, base, (out, keep), _sliced(weight, n_in, D)


def _plan_grouped(g: _Graph, group: dict) -> list[tuple[ir.Node, ir.Value]]:
    """The adds of one GAWS / GAWS-D group's grouped parts, each with the base part it passes through:
    grouped GEMM -> Split -> (Transpose) -> Reshape -> Add(base part, .) (checked against the record)."""
    name = group["name"]
    blocks = g.initializer(group.get("blocks"), f"grouped block constant of group '{name}'", tuple(group["blocks_shape"]))
    gemm = g.sole_user(blocks, "MatMul", f"grouped block constant of group '{name}'")
    parts = [u for u, _ in gemm.outputs[0].uses()]
    if len(parts) == 1 and parts[0].op_type == "Split":
        parts = [u for out in parts[0].outputs for u, _ in out.uses()]
    adds = []
    for node in parts:
        value = None
        while node.op_type in ("Transpose", "Reshape") and len(node.outputs[0].uses()) == 1:
            value = node.outputs[0]
            node = next(iter(value.uses()))[0]
        if node.op_type != "Add" or value is None or len(node.inputs) != 2:
            _refuse(f"a grouped part of group '{name}' does not end in an Add; the model was edited after zflora-compile wrote it")
        keep = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
        adds.append((node, keep))
    if len(adds) != len(group["sites"]):
        _refuse(f"group '{name}' has {len(adds)} grouped part(s), the metadata says {len(group['sites'])}")
    return adds


def _plan_widened(g: _Graph, site: dict):
    """The edits that rebuild one FFA / FBA / FFBA projection from its base block."""
    n_in, n_out = int(site["in_features"]), int(site["out_features"])
    rows, cols = int(site["widened_shape"][0]), int(site["widened_shape"][1])
    label = site.get("label") or site["site"]
    weight = g.initializer(site.get("weight"), f"widened weight of '{label}'", (rows, cols))
    if site.get("embedding"):
        node = g.sole_user(weight, "Gather", f"widened table of '{label}'")
        x, out = node.inputs[1], node.outputs[0]
    else:
        node = g.sole_user(weight, "MatMul", f"widened weight of '{label}'")
        x, out = node.inputs[0], node.outputs[0]
        if rows > n_in:  # reads lanes: the input is concat(x, lanes ..)
            concat = x.producer()
            if concat is None or concat.op_type != "Concat" or not concat.inputs:
                _refuse(f"the widened projection '{label}' does not read concat(x, lanes); the model was edited after zflora-compile wrote it")
            x = concat.inputs[0]
    bias = None
    if site.get("bias"):
        bias_value = g.initializer(site["bias"], f"widened bias of '{label}'", (cols,))
        add = g.sole_user(out, "Add", f"the widened projection '{label}'")
        if bias_value not in add.inputs:
            _refuse(f"the widened bias of '{label}' is not added to its projection")
        out = add.outputs[0]
        bias = LazyArray((n_out,), bias_value.const_value.dtype.numpy(), lambda t=bias_value.const_value, n=n_out: np.ascontiguousarray(t.numpy().reshape(-1)[:n]))
    base = out
    if cols > n_out:
        split = g.sole_user(out, "Split", f"the widened projection '{label}'")
        sizes = g.split_sizes(split)
        if not sizes or sizes[0] != n_out or sum(sizes) != cols:
            _refuse(f"the split after '{label}' does not start with its {n_out} base lanes")
        base = split.outputs[0]
    return site.get("embedding", False), x, base, _sliced(weight, n_in if not site.get("embedding") else rows, n_out), bias, label


def strip_compiled(model: ir.Model, record: dict) -> dict:
    """Remove every lane the active compilations of ``record`` put into ``model`` (in place).

    Returns what was removed (for the strip's own record); raises :class:`InputError` (exit 2) when
    the adapter was merged, has no stripped form, or the record does not match the graph."""
    from zflora_compile.graph.onnx_ir import OnnxGraph

    live = check_separable(record)
    g = _Graph(model)
    groups = [grp for e in live for grp in e.get("groups", [])]
    widened = [w for e in live for w in e.get("widened", [])]
    planned = [(grp, _plan_group(g, grp)) for grp in groups]  # every check before any edit
    kron = [(grp, _plan_grouped(g, grp)) for e in live for grp in e.get("grouped", [])]
    rebuilt = [_plan_widened(g, w) for w in widened]
    view = OnnxGraph(model)
    for grp, (weight, wide, base, (out, keep), sliced) in planned:
        with view.at(wide, grp["name"]):
            view.redirect(out, keep)  # the low-rank product (and DoRA's scale) is bypassed
            narrow = view.constant("base_weight", sliced)
            wide.replace_input_with(1, narrow)  # x @ W[:, :D]
            wide.outputs[0].shape = None  # takes the base lanes' shape
            view.redirect(base, wide.outputs[0])  # the split's base lanes are the GEMM itself
    for grp, adds in kron:  # GAWS / GAWS-D: every add of a grouped part passes its base part through
        for add, keep in adds:
            view.redirect(add.outputs[0], keep)
    for embedding, x, base, sliced, bias, label in rebuilt:
        node = base.producer()
        with view.at(node, f"{label}.base"):
            out = view.gather(view.constant("base_table", sliced), x) if embedding else view.project(x, sliced, bias=bias, name="base_weight")
            view.redirect(base, out)
    view.cleanup()
    return {"groups": [grp["name"] for grp in groups] + [grp["name"] for grp, _ in kron], "widened": [w["site"] for w in widened]}


def disable_compiled(model: ir.Model, record: dict) -> None:
    """The strip reference, in place: every active low-rank constant zeroed, every per-column scale 1,
    every widened weight's lane-read rows zeroed in the base columns (the graph otherwise unchanged)."""
    live = check_separable(record)
    g = _Graph(model)
    for entry in live:
        for grp in entry.get("groups", []):
            D, R = int(grp["base_width"]), int(grp["rank_width"])
            low = g.initializer(grp.get("lowrank"), f"low-rank constant of group '{grp['name']}'", (R, D))
            low.const_value = ir.tensor(np.zeros((R, D), dtype=low.const_value.dtype.numpy()), name=low.name)
            if grp.get("column_scale"):
                scale = g.initializer(grp["column_scale"], f"per-column scale of group '{grp['name']}'", (D,))
                scale.const_value = ir.tensor(np.ones((D,), dtype=scale.const_value.dtype.numpy()), name=scale.name)
        for grp in entry.get("grouped", []):
            blocks = g.initializer(grp.get("blocks"), f"grouped block constant of group '{grp['name']}'", tuple(grp["blocks_shape"]))
            blocks.const_value = ir.tensor(np.zeros(tuple(grp["blocks_shape"]), dtype=blocks.const_value.dtype.numpy()), name=blocks.name)
        for site in entry.get("widened", []):
            rows, cols = int(site["widened_shape"][0]), int(site["widened_shape"][1])
            n_in, n_out = int(site["in_features"]), int(site["out_features"])
            weight = g.initializer(site.get("weight"), f"widened weight of '{site.get('label') or site['site']}'", (rows, cols))
            if rows > n_in and not site.get("embedding"):
                array = np.array(weight.const_value.numpy())
                array[n_in:, :n_out] = 0
                weight.const_value = ir.tensor(array, name=weight.name)
