"""Apply a :class:`~zflora_compile.planner.Plan` to a torch.fx graph.

The FX twin of :mod:`zflora_compile.passes.rewrite_onnx`: it only moves graph edges and adds the
weights the planner computed (all the algebra lives in the planner). New weights become real
constants of the program through ``add_constant`` (a parameter placeholder of an
ExportedProgram, or a ``get_attr`` of a GraphModule); dead nodes are removed afterwards.

A fused group is emitted in 2-D, with ops that exist both before and after
``run_decompositions`` (``mm``, ``add``, ``slice``, ``view``/``reshape``)::

    x2  = x.reshape(-1, in)                 # or the base GEMM's own 2-D view of x
    y   = mm(x2, [W_1 | ... | W_n | A_1 | ... | A_n])
    out = y[:, :D] (+ bias) + mm(y[:, D:], blockdiag(s_1 B_1, ...))
    y_i = out[:, off_i : off_i + out_i].view(*lead, out_i)
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.fx import Node

from zflora_compile.passes.detect_fx import FxConstants, FxLoraBinding, _is_assert, _val, op_name
from zflora_compile.passes.detect_lanes_fx import FxWidenBinding
from zflora_compile.planner import FusedGroup, LazyArray, MergedSite, Plan, WidenedProjection
from zflora_compile.graph.records import AdapterSite, WidenedSite

AddConstant = Callable[[str, torch.Tensor], Node]
aten = torch.ops.aten


def to_torch(array: LazyArray | np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A planner array as a torch tensor (bfloat16 goes through float32: exact)."""
    value = array.numpy() if isinstance(array, LazyArray) else array
    if value.dtype.name == "bfloat16":
        return torch.from_numpy(value.astype(np.float32)).to(torch.bfloat16)
    tensor = torch.from_numpy(np.ascontiguousarray(value))
    return tensor if dtype is None else tensor.to(dtype)


def _binding(site: AdapterSite) -> FxLoraBinding:
    assert isinstance(site.binding, FxLoraBinding), "site was not detected in an FX graph"
    return site.binding


def _meta_of(args, kwargs):
    missing = []

    def value(arg):
        if isinstance(arg, Node):
            if "val" not in arg.meta:
                missing.append(arg)
            return arg.meta.get("val")
        return arg

    return torch.fx.node.map_aggregate(args, value), torch.fx.node.map_aggregate(kwargs, value), missing


def call(graph: torch.fx.Graph, target, args, kwargs=None, *, like: Node | None = None, name: str | None = None) -> Node:
    """A call_function node at the graph's insertion point, with ``meta['val']`` propagated."""
    kwargs = kwargs or {}
    node = graph.call_function(target, tuple(args), kwargs)
    if name:
        node.name = graph._graph_namespace.create_name(name, node)
    fake_args, fake_kwargs, missing = _meta_of(args, kwargs)
    if not missing:
        node.meta["val"] = target(*fake_args, **fake_kwargs)
    if like is not None:
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node", "custom"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
    return node


def _dims(graph: torch.fx.Graph, source: Node, shape) -> list:
    """``shape`` as view arguments: ints, or ``sym_size`` nodes of ``source`` for symbolic axes."""
    out = []
    for axis, dim in enumerate(shape):
        if isinstance(dim, int):
            out.append(dim)
        else:
            out.append(call(graph, aten.sym_size.int, (source, axis)))
    return out


def _cast_like(graph: torch.fx.Graph, value: Node, reference: Node) -> Node:
    """``value`` cast to ``reference``'s dtype when they differ (adapters kept in another dtype)."""
    want, have = _val(reference), _val(value)
    if want is None or have is None or want.dtype == have.dtype:
        return value
    return call(graph, aten._to_copy.default, (value,), {"dtype": want.dtype}, like=reference)


def _redirect(graph: torch.fx.Graph, old: Node, new: Node) -> None:
    with graph.inserting_before(old):
        new = _cast_like(graph, new, old)
    old.replace_all_uses_with(new)


def _stem(name: str) -> str:
    return "zflora_" + "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _apply_fused_group(graph: torch.fx.Graph, group: FusedGroup, add_constant: AddConstant, order: dict[Node, int]) -> None:
    bindings = [_binding(s) for s in group.sites]
    first = min(bindings, key=lambda b: order[b.add])
    anchor = first.add
    stem = _stem(group.name)
    weight = add_constant(f"{stem}_fused_weight", to_torch(group.weight))  # [in, D + R]
    lowrank = add_constant(f"{stem}_lowrank_weight", to_torch(group.lowrank))  # [R, D]
    bias = add_constant(f"{stem}_fused_bias", to_torch(group.bias)) if group.bias is not None else None
    decomposed = first.base_kind in ("mm", "addmm")
    view = aten.view.default if decomposed else aten.reshape.default
    in_features = group.sites[0].in_features
    width, rank = group.base_width, group.rank_total
    x = first.base_input
    with graph.inserting_before(anchor):
        first_x = first.base.args[1] if first.base_kind == "addmm" else first.base.args[0]
        x_val = _val(x)
        if _val(first_x) is not None and _val(first_x).dim() == 2 and decomposed:
            x2 = first_x
        elif x_val is not None and x_val.dim() == 2:
            x2 = x
        else:
            x2 = call(graph, view, (x, [-1, in_features]), like=anchor)
        wide = call(graph, aten.mm.default, (x2, weight), like=anchor, name=f"{stem}_fused_mm")
        base_lanes = call(graph, aten.slice.Tensor, (wide, 1, 0, width), like=anchor)
        rank_lanes = call(graph, aten.slice.Tensor, (wide, 1, width, width + rank), like=anchor)
        if bias is not None:
            base_lanes = call(graph, aten.add.Tensor, (base_lanes, bias), like=anchor)
        # mm + add rather than addmm: addmm with a strided (sliced) input takes slow paths on
        # some backends (CPU bfloat16), and the add is one cheap elementwise kernel
        delta = call(graph, aten.mm.default, (rank_lanes, lowrank), like=anchor, name=f"{stem}_lowrank_mm")
        fused = call(graph, aten.add.Tensor, (base_lanes, delta), like=anchor, name=f"{stem}_add_lowrank")
        offset = 0
        for site, binding in zip(group.sites, bindings):
            part = fused
            if len(group.sites) > 1:
                part = call(graph, aten.slice.Tensor, (fused, 1, offset, offset + site.out_features), like=binding.add)
            offset += site.out_features
            out_val = _val(binding.add)
            if out_val.dim() != 2:
                part = call(graph, view, (part, [*_dims(graph, x, out_val.shape[:-1]), site.out_features]), like=binding.add)
            part = _cast_like(graph, part, binding.add)
            binding.add.replace_all_uses_with(part)


def _apply_merge(graph: torch.fx.Graph, merged: MergedSite, add_constant: AddConstant) -> None:
    binding = _binding(merged.site)
    weight = to_torch(merged.weight)  # [in, out]
    if binding.base_kind == "linear":
        weight = weight.t().contiguous()
    label = merged.site.label or merged.site.site_id
    node = add_constant(f"{_stem(label)}_merged_weight", weight)
    binding.base.update_arg(binding.weight_index, node)
    _redirect(graph, binding.add, binding.base_output)


def _apply_strip(graph: torch.fx.Graph, site: AdapterSite) -> None:
    binding = _binding(site)
    _redirect(graph, binding.add, binding.base_output)


def _widen_binding(site: WidenedSite) -> FxWidenBinding:
    assert isinstance(site.binding, FxWidenBinding), "site was not detected in an FX graph"
    return site.binding


def _apply_widened(graph: torch.fx.Graph, widened: WidenedProjection, add_constant: AddConstant, concats: dict, lanes: dict) -> None:
    """One GEMM (or embedding) with the planner's widened weight replaces the base node.

    Input: the zFLoRA stream whole, ``cat([x, z_1, ..], -1)`` (shared by projections reading the
    same input and lanes), or ``x``. Output: the cat/pad it replaces (zFLoRA), or two slices of the
    last axis: base lanes and written lanes (FFA/FBA), or the base output. A bias of the base GEMM
    is added padded with zeros on the written lanes.
    """
    site, binding = widened.site, _widen_binding(widened.site)
    stem = _stem(site.label or site.site_id)
    weight = to_torch(widened.weight)  # [in + read lanes, out + written lanes]
    rows, cols = weight.shape
    out_f = site.out_features
    with graph.inserting_before(binding.node):
        if binding.kind == "embedding":
            table = add_constant(f"{stem}_widened_table", weight)
            out = call(graph, aten.embedding.default, (table, binding.x), like=binding.node)
        else:
            if binding.stream is not None:
                x = binding.stream
            elif binding.lanes_in:
                key = (binding.x, *binding.lanes_in)
                if key not in concats:  # lanes whose host was rewritten already come from its slice
                    inputs = [binding.x, *(lanes.get(z, z) for z in binding.lanes_in)]
                    concats[key] = call(graph, aten.cat.default, (inputs, -1), like=binding.node)
                x = concats[key]
            else:
                x = binding.x
            bias = None
            if binding.bias_value is not None:
                value = binding.bias_value().detach().reshape(-1)
                bias = add_constant(f"{stem}_widened_bias", torch.cat([value, value.new_zeros(cols - out_f)]))
            x_val = _val(x)
            if binding.kind == "linear":
                w = add_constant(f"{stem}_widened_weight", weight.t().contiguous())
                out = call(graph, aten.linear.default, (x, w) if bias is None else (x, w, bias), like=binding.node)
            else:
                w = add_constant(f"{stem}_widened_weight", weight)
                x2 = x if x_val.dim() == 2 else call(graph, aten.view.default, (x, [-1, rows]), like=binding.node)
                out = call(graph, aten.mm.default, (x2, w), like=binding.node, name=f"{stem}_widened_mm")
                if bias is not None:
                    out = call(graph, aten.add.Tensor, (out, bias), like=binding.node)
                if x_val.dim() != 2:
                    out = call(graph, aten.view.default, (out, [*_dims(graph, x, x_val.shape[:-1]), cols]), like=binding.node)
        if binding.replaced is not None:
            _redirect(graph, binding.replaced, out)
        elif binding.lanes_out:
            base = call(graph, aten.slice.Tensor, (out, -1, 0, out_f), like=binding.node)
            offset = out_f
            for z, rank in zip(binding.lanes_out, widened.out_splits[1:]):
                part = call(graph, aten.slice.Tensor, (out, -1, offset, offset + rank), like=binding.node)
                _redirect(graph, z, part)
                lanes[z] = part
                offset += rank
            _redirect(graph, binding.output, base)
            out = base
        else:
            _redirect(graph, binding.output, out)
    _bypass_reads(graph, binding, out)


def _bypass_reads(graph: torch.fx.Graph, binding: FxWidenBinding, replacement: Node | None = None) -> None:
    """Each adapter add passes its own base operand through (the replacement when that was the
    base node's output; its bias add, which now reads the replacement, otherwise)."""
    for add, base in zip(binding.read_adds, binding.read_bases):
        _redirect(graph, add, replacement if base is binding.output and replacement is not None else base)


def apply_plan_fx(gm: torch.fx.GraphModule, plan: Plan, add_constant: AddConstant) -> None:
    """Rewrite ``gm`` in place according to ``plan``, then remove what became dead."""
    graph = gm.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    for group in plan.groups:
        _apply_fused_group(graph, group, add_constant, order)
    for merged in plan.merged:
        _apply_merge(graph, merged, add_constant)
    for site in plan.stripped:
        _apply_strip(graph, site)
    concats: dict = {}
    lanes: dict = {}
    for widened in plan.widened:
        _apply_widened(graph, widened, add_constant, concats, lanes)
    for site in plan.stripped_reads:
        _bypass_reads(graph, _widen_binding(site))
    cleanup(gm)


def disable_adapters_fx(gm: torch.fx.GraphModule, sites: list[AdapterSite], constants: FxConstants, add_constant: AddConstant, widened: list[WidenedSite] = ()) -> None:
    """Replace every site's B by zeros, graph otherwise unchanged: the reference for ``strip``."""
    b_nodes = [(_binding(s).lowrank_b, _binding(s).lowrank_b_index, s.site_id) for s in sites]
    b_nodes += [(node, index, f"{s.site_id}_{i}") for s in widened for i, (node, index) in enumerate(_widen_binding(s).b_nodes)]
    for node, index, site_id in b_nodes:
        weight = node.args[index]
        shape, dtype = constants.shape_dtype(weight)
        zeros = add_constant(f"zflora_{site_id}_zero_b", torch.zeros(shape, dtype=dtype))
        node.update_arg(index, zeros)
    cleanup(gm)


def cleanup(gm: torch.fx.GraphModule) -> None:
    """Remove dead nodes, including metadata assertions that only check dead values."""
    graph = gm.graph
    while True:
        removed = False
        for node in reversed(list(graph.nodes)):
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            if _is_assert(node):
                target = node.args[0] if node.args else None
                if isinstance(target, Node) and all(_is_assert(u) for u in target.users) and not _needed(target):
                    graph.erase_node(node)
                    removed = True
                continue
            if not node.users and not node.is_impure():
                graph.erase_node(node)
                removed = True
        if not removed:
            break
    gm.recompile()


def _needed(node: Node) -> bool:
    """A value only asserted on is dead unless it is an input (asserting inputs is a guard)."""
    return node.op == "placeholder" or op_name(node) in ("sym_size",)
