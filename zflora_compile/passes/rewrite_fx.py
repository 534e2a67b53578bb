"""Apply a :class:`~zflora_compile.passes.planner.Plan` to a torch.fx graph.

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
from zflora_compile.passes.planner import FusedGroup, LazyArray, MergedSite, Plan
from zflora_compile.sites import AdapterSite

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
    cleanup(gm)


def disable_adapters_fx(gm: torch.fx.GraphModule, sites: list[AdapterSite], constants: FxConstants, add_constant: AddConstant) -> None:
    """Replace every site's B by zeros, graph otherwise unchanged: the reference for ``strip``."""
    for site in sites:
        binding = _binding(site)
        weight = binding.lowrank_b.args[binding.lowrank_b_index]
        shape, dtype = constants.shape_dtype(weight)
        zeros = add_constant(f"zflora_{site.site_id}_zero_b", torch.zeros(shape, dtype=dtype))
        binding.lowrank_b.update_arg(binding.lowrank_b_index, zeros)
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
