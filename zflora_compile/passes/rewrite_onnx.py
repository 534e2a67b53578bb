"""Apply a :class:`~zflora_compile.planner.Plan` to an onnx-ir graph.

The rewriter only moves graph edges and adds the initializers the planner computed; all of the
algebra lives in the planner. Dead nodes and initializers (the old low-rank chains, old
weights) are removed afterwards by :func:`cleanup`.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from zflora_compile.passes.detect_lanes import OnnxWidenBinding
from zflora_compile.passes.detect_onnx import OnnxLoraBinding
from zflora_compile.passes.onnx_constants import constant_dtype, constant_shape
from zflora_compile.planner import FusedGroup, LazyArray, MergedSite, Plan, WidenedProjection
from zflora_compile.graph.records import AdapterSite, WidenedSite, numpy_dtype

_PREFIX = "zflora"


class _Names:
    """Unique value / initializer / node names for what the rewriter adds."""

    def __init__(self, graph: ir.Graph):
        self.taken = {v.name for v in graph.initializers.values()}
        for node in graph:
            self.taken.update(o.name for o in node.outputs if o.name)
            if node.name:
                self.taken.add(node.name)
        self.taken.update(v.name for v in graph.inputs)

    def __call__(self, base: str) -> str:
        name, n = base, 1
        while name in self.taken:
            n += 1
            name = f"{base}_{n}"
        self.taken.add(name)
        return name


def _initializer(graph: ir.Graph, names: _Names, name: str, array: LazyArray | np.ndarray) -> ir.Value:
    if isinstance(array, LazyArray):
        tensor = ir.LazyTensor(lambda a=array: ir.tensor(a.numpy()), dtype=ir.DataType.from_numpy(array.dtype), shape=ir.Shape(array.shape), name=name)
    else:
        tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _binding(site: AdapterSite) -> OnnxLoraBinding:
    assert isinstance(site.binding, OnnxLoraBinding), "site was not detected in an ONNX graph"
    return site.binding


def _redirect(old: ir.Value, new: ir.Value) -> None:
    """Point every use of ``old`` (graph outputs included, keeping their names) at ``new``."""
    was_output_name = old.name if old.is_graph_output() else None
    if new.type is None:  # same values, so the same type and shape (graph outputs must keep theirs)
        new.type = old.type
    if new.shape is None:
        new.shape = old.shape
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if was_output_name is not None:
        old.name = f"{was_output_name}.{_PREFIX}_replaced"
        new.name = was_output_name


def _node(graph: ir.Graph, names: _Names, before: ir.Node, op: str, inputs, name: str, num_outputs: int = 1, **attrs) -> ir.Node:
    node = ir.node(op, inputs, attributes=attrs or None, num_outputs=num_outputs, name=names(name))
    for i, output in enumerate(node.outputs):
        output.name = names(f"{name}_out{i}" if num_outputs > 1 else f"{name}_out")
    graph.insert_before(before, node)
    return node


def _int64(graph: ir.Graph, names: _Names, name: str, values: list[int]) -> ir.Value:
    return _initializer(graph, names, names(name), np.asarray(values, dtype=np.int64))


def _apply_fused_group(graph: ir.Graph, names: _Names, group: FusedGroup, order: dict[int, int]) -> None:
    bindings = [_binding(s) for s in group.sites]
    anchor = min((b.add for b in bindings), key=lambda n: order[id(n)])
    x = bindings[0].base_input
    stem = f"{_PREFIX}.{group.name}"
    weight = _initializer(graph, names, names(f"{stem}.fused_weight"), group.weight)
    lowrank = _initializer(graph, names, names(f"{stem}.lowrank_weight"), group.lowrank)
    wide = _node(graph, names, anchor, "MatMul", [x, weight], f"{stem}/FusedMatMul").outputs[0]
    cut = _int64(graph, names, f"{stem}.lane_split", [group.base_width, group.rank_total])
    base_lanes, rank_lanes = _node(graph, names, anchor, "Split", [wide, cut], f"{stem}/CutAdapterLanes", num_outputs=2, axis=-1).outputs
    delta = _node(graph, names, anchor, "MatMul", [rank_lanes, lowrank], f"{stem}/LowRankMatMul").outputs[0]
    if group.bias is not None:
        bias = _initializer(graph, names, names(f"{stem}.fused_bias"), group.bias)
        base_lanes = _node(graph, names, anchor, "Add", [base_lanes, bias], f"{stem}/AddBias").outputs[0]
    fused = _node(graph, names, anchor, "Add", [base_lanes, delta], f"{stem}/AddLowRank").outputs[0]
    if len(group.sites) == 1:
        outputs = [fused]
    else:
        sizes = _int64(graph, names, f"{stem}.out_split", group.out_splits)
        outputs = list(_node(graph, names, anchor, "Split", [fused, sizes], f"{stem}/SplitProjections", num_outputs=len(group.sites), axis=-1).outputs)
    for binding, output in zip(bindings, outputs):
        _redirect(binding.add.outputs[0], output)


def _apply_merge(graph: ir.Graph, names: _Names, merged: MergedSite) -> None:
    binding = _binding(merged.site)
    weight = merged.weight
    if binding.weight_transposed:
        weight = LazyArray(weight.shape[::-1], weight.dtype, lambda w=weight: np.ascontiguousarray(w.numpy().T))
    value = _initializer(graph, names, names(f"{_PREFIX}.{merged.site.label or merged.site.site_id}.merged_weight"), weight)
    binding.base.replace_input_with(1, value)
    _redirect(binding.add.outputs[0], binding.base_output)


def _apply_strip(site: AdapterSite) -> None:
    binding = _binding(site)
    _redirect(binding.add.outputs[0], binding.base_output)


def _widen_binding(site: WidenedSite) -> OnnxWidenBinding:
    assert isinstance(site.binding, OnnxWidenBinding), "site was not detected in an ONNX graph"
    return site.binding


def _apply_widened(graph: ir.Graph, names: _Names, widened: WidenedProjection, concats: dict, lanes: dict) -> None:
    """Replace the base node by one GEMM (or Gather) with the planner's widened weight.

    Input: the zFLoRA stream whole, or ``concat(x, z_1, ..)`` (one Concat per distinct input, shared
    by the projections that read the same lanes), or ``x``. Output: the Concat/Pad it replaces
    (zFLoRA), or a Split into the base lanes and each written lane (FFA/FBA), or the base output.
    """
    site, binding = widened.site, _widen_binding(widened.site)
    stem = f"{_PREFIX}.{site.label or site.site_id}"
    anchor = binding.node
    if binding.stream is not None:
        x = binding.stream
    elif binding.lanes_in:
        key = (id(binding.x), *(id(z) for z in binding.lanes_in))
        if key not in concats:  # a lane whose host was rewritten already is read from the host's Split
            inputs = [binding.x, *(lanes.get(id(z), z) for z in binding.lanes_in)]
            concats[key] = _node(graph, names, anchor, "Concat", inputs, f"{stem}/ConcatLanes", axis=-1).outputs[0]
        x = concats[key]
    else:
        x = binding.x
    weight = _initializer(graph, names, names(f"{stem}.widened_weight"), widened.weight)
    if site.kind == "embedding":
        out = _node(graph, names, anchor, "Gather", [weight, x], f"{stem}/WidenedGather", axis=0).outputs[0]
    else:
        out = _node(graph, names, anchor, "MatMul", [x, weight], f"{stem}/WidenedMatMul").outputs[0]
    base_out = binding.node.outputs[0]
    if binding.replaced is not None:
        _redirect(binding.replaced, out)
    elif binding.lanes_out:
        sizes = _int64(graph, names, f"{stem}.lane_split", widened.out_splits)
        parts = _node(graph, names, anchor, "Split", [out, sizes], f"{stem}/CutLanes", num_outputs=len(widened.out_splits), axis=-1).outputs
        _redirect(base_out, parts[0])
        for z, part in zip(binding.lanes_out, parts[1:]):
            _redirect(z, part)
            lanes[id(z)] = part
        out = parts[0]
    else:
        _redirect(base_out, out)
    _bypass_reads(binding, out)


def _bypass_reads(binding: OnnxWidenBinding, replacement: ir.Value | None = None) -> None:
    """Every adapter Add now passes its base operand through (the lanes are inside the GEMM, or gone).

    ``replacement``: the value that took over the base node's output, when the node was replaced
    (an Add whose base operand was that output reads the replacement; one whose base operand is a
    bias Add keeps reading the bias Add, which now reads the replacement).
    """
    for add, base in zip(binding.read_adds, binding.read_bases):
        unbiased = base is binding.node.outputs[0]
        _redirect(add.outputs[0], replacement if unbiased and replacement is not None else base)


def apply_plan(model: ir.Model, plan: Plan) -> None:
    """Rewrite ``model`` in place according to ``plan``, then remove what became dead."""
    graph = model.graph
    names = _Names(graph)
    order = {id(node): i for i, node in enumerate(graph)}
    for group in plan.groups:
        _apply_fused_group(graph, names, group, order)
    for merged in plan.merged:
        _apply_merge(graph, names, merged)
    for site in plan.stripped:
        _apply_strip(site)
    concats: dict = {}
    lanes: dict = {}
    for widened in plan.widened:
        _apply_widened(graph, names, widened, concats, lanes)
    for site in plan.stripped_reads:
        _bypass_reads(_widen_binding(site))
    cleanup(model)


def disable_adapters(model: ir.Model, sites: list[AdapterSite], widened: list[WidenedSite] = ()) -> None:
    """Replace every site's B by zeros, leaving the graph as it is: the reference for ``strip``."""
    graph = model.graph
    names = _Names(graph)
    b_nodes = [(_binding(site).lowrank_b, site.site_id) for site in sites]
    b_nodes += [(node, f"{site.site_id}_{i}") for site in widened for i, node in enumerate(_widen_binding(site).b_nodes)]
    for node, site_id in b_nodes:
        weight = node.inputs[1]
        shape = constant_shape(weight)
        zeros = np.zeros(shape, dtype=numpy_dtype(constant_dtype(weight)))
        node.replace_input_with(1, _initializer(graph, names, names(f"{_PREFIX}.{site_id}.zero_b"), zeros))
    cleanup(model)


def cleanup(model: ir.Model) -> None:
    """Dead-node and unused-initializer removal, then a topological sort."""
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.TopologicalSortPass()(model)
