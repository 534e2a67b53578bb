"""Adapter sites inside ONNX subgraphs: ``If`` branches, ``Loop`` / ``Scan`` bodies, at any depth.

optimum's ``decoder_model_merged.onnx`` is one ``If`` on ``use_cache_branch`` whose two branches
hold the with-past and without-past decoders; their nodes read the weights from the main graph
(outer-scope values), and the two decoders share them. The families match one graph at a time
(:class:`~zflora_compile.graph.onnx_ir.OnnxGraph` views the main graph or one subgraph; values of
enclosing graphs are read like any other value), so this module

- lists the model's graphs as :class:`Scope` records (each viewed through :class:`ScopedGraph`,
  whose readers of a value are nodes of that graph alone), the main graph first, then every subgraph
  in node order, depth first, each with its path (``If:/model/If_0/then_branch``; nested:
  ``If:/model/If_0/then_branch/Loop:/loop/body``);
- detects each graph on its own and joins the results into one :class:`ModelDetection`: the
  sites, rejections, unrecognised structures and accounting of every graph, where everything
  found in a subgraph is named by its path (``<path>:lora0``, group ``<path>:g0``, rejected node
  ``<path>:<node>``), so no two graphs' ids collide;
- plans each graph's sites on their own (a fused group never spans two graphs) into one
  :class:`ModelPlan`, and rewrites (or, for the strip reference, disables) each graph through its
  own view, the innermost graphs first.

Shared weights: a rewrite never edits a weight in place. ``merge`` points its GEMM at a new
initializer ``W + s A @ B`` computed from the original ``W`` (so a ``W`` read by both branches
gets ``s A @ B`` added once per branch, each time to the original ``W``); ``fuse`` builds new
widened weights per graph; the strip reference points each ``B`` GEMM at new zeros. The original
initializers stay in the main graph while any graph still reads them. Identical constants the
rewrite created in two graphs (the two branches' merged ``W``) are then kept once
(:func:`share_created`): exact, the content compared bytewise; the constants a fused group or a
widened projection records for strip of a compiled model stay one per graph (that strip finds
them by name and expects one reader each).
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import onnx_ir as ir

import zflora_compile.families as families
from zflora_compile.graph.onnx_ir import OnnxGraph
from zflora_compile.graph.records import DEFAULT_MAX_RANK_RATIO, Accounting, Detection
from zflora_compile.planner import Plan
from zflora_compile.planner import plan as plan_sites


@dataclasses.dataclass
class Scope:
    """One graph of a model: the main graph (``path`` "", ``depth`` 0) or a subgraph;
    ``owners``: id(subgraph) -> the node holding it, for every subgraph of the model."""

    path: str
    graph: ir.Graph
    depth: int = 0
    owners: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def view(self, model: ir.Model) -> "ScopedGraph":
        return ScopedGraph(model, self.graph, self.owners)

    def name(self, local: str) -> str:
        """``local`` (a site id, group or node name of this graph) as named model-wide."""
        return f"{self.path}:{local}" if self.path else local


def scopes(model: ir.Model) -> list[Scope]:
    """The main graph, then every subgraph (``GRAPH`` / ``GRAPHS`` attributes), depth first."""
    out: list[Scope] = []
    owners: dict[int, ir.Node] = {}

    def visit(graph: ir.Graph, path: str, depth: int) -> None:
        out.append(Scope(path, graph, depth, owners))
        for index, node in enumerate(graph):
            where = f"{node.op_type}:{node.name or f'#{index}'}"
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    owners[id(attr.as_graph())] = node
                    visit(attr.as_graph(), f"{path}/{where}/{attr.name}" if path else f"{where}/{attr.name}", depth + 1)
                elif attr.type == ir.AttributeType.GRAPHS:
                    for i, sub in enumerate(attr.as_graphs()):
                        owners[id(sub)] = node
                        visit(sub, f"{path}/{where}/{attr.name}[{i}]" if path else f"{where}/{attr.name}[{i}]", depth + 1)

    visit(model.graph, "", 0)
    return out


class ScopedGraph(OnnxGraph):
    """:class:`OnnxGraph` of one graph whose readers are that graph's nodes: a value read inside a
    subgraph of it is read by the node holding that subgraph (the ``If`` reads what its branches
    read, as ONNX has it), and a read in a graph outside this one (an outer value the other ``If``
    branch reads too) is no node of this view. (onnx-ir lists every use of a value, in any graph:
    the families would take the other branch's GEMMs for candidates of this one.) Likewise a value
    an enclosing graph computes has no producer here. A rewrite therefore only changes nodes of its
    own graph and never removes a node another graph reads, so leaving those reads out cannot make
    a rewrite wrong."""

    def __init__(self, model: ir.Model, graph: ir.Graph | None = None, owners: dict | None = None):
        super().__init__(model, graph)
        self._owners = owners or {}

    def _local(self, node: ir.Node) -> ir.Node | None:
        """``node``, or the node of this graph holding the subgraph ``node`` is in (None: neither)."""
        for _ in range(1000):
            if node.graph is self.graph:
                return node
            node = self._owners.get(id(node.graph))
            if node is None:
                return None
        return None

    def _readers(self, values) -> list[ir.Node]:
        """One entry per use, as :class:`OnnxGraph` has it (a node reading a value twice counts twice)."""
        return [local for value in values for user, _ in value.uses() if (local := self._local(user)) is not None]

    def producer(self, value):
        """The node of this graph computing ``value``; a value an enclosing graph computes is an
        input here (None): a site is made of this graph's nodes only, so a rewrite never edits a
        node other branches read (merging into an outer GEMM would change them too)."""
        node = super().producer(value)
        return node if node is not None and node.graph is self.graph else None

    def users(self, value):
        return self._readers([value])

    def successors(self, node):
        return self._readers(node.outputs)

    def gemm_readers(self, value):
        return [gemm for gemm in super().gemm_readers(value) if gemm is not None and gemm.node.graph is self.graph]


def views(model: ir.Model) -> list[tuple[str, OnnxGraph]]:
    """``(path, view)`` for every graph of the model (:func:`scopes`' order)."""
    return [(scope.path, scope.view(model)) for scope in scopes(model)]


@dataclasses.dataclass
class ModelDetection(Detection):
    """Every graph's :class:`Detection` joined; ``parts``: ``(scope, detection)`` per graph."""

    parts: list = dataclasses.field(default_factory=list, repr=False, compare=False)


@dataclasses.dataclass
class ModelPlan(Plan):
    """Every graph's :class:`Plan` joined (in :func:`scopes`' order); ``parts``: ``(scope, plan)``."""

    parts: list = dataclasses.field(default_factory=list, repr=False, compare=False)


def _name_records(scope: Scope, detection: Detection) -> None:
    """Site ids, groups and rejected / unrecognised node names of a subgraph carry its path."""
    if not scope.path:
        return
    for site in detection.all_sites:
        site.site_id = scope.name(site.site_id)
        if getattr(site, "group", ""):
            site.group = scope.name(site.group)
    for record in (*detection.rejections, *detection.unrecognized):
        record.node = scope.name(record.node)


def join_accounting(tallies) -> Accounting:
    total = Accounting()
    for tally in tallies:
        for field in dataclasses.fields(Accounting):
            setattr(total, field.name, getattr(total, field.name) + getattr(tally, field.name))
    return total


def detect(model: ir.Model, max_rank_ratio: float = DEFAULT_MAX_RANK_RATIO) -> ModelDetection:
    """Every adapter site of every graph of ``model`` (the families run on each graph on its own)."""
    parts = []
    for scope in scopes(model):
        found = families.detect(scope.view(model), max_rank_ratio=max_rank_ratio)
        _name_records(scope, found)
        parts.append((scope, found))
    if len(parts) == 1:  # no subgraph: the main graph's detection as it is
        only = parts[0][1]
        return ModelDetection(only.sites, only.rejections, only.widened, only.linear, only.grouped, only.unrecognized, only.accounting, parts=parts)
    return ModelDetection(
        [s for _, d in parts for s in d.sites],
        [r for _, d in parts for r in d.rejections],
        [s for _, d in parts for s in d.widened],
        linear=[s for _, d in parts for s in d.linear],
        grouped=[s for _, d in parts for s in d.grouped],
        unrecognized=[u for _, d in parts for u in d.unrecognized],
        accounting=join_accounting(d.accounting for _, d in parts),
        parts=parts,
    )


def plan(detection: Detection, strategy: str) -> ModelPlan:
    """Each graph's sites planned on their own (:func:`zflora_compile.planner.plan`), joined."""
    if not isinstance(detection, ModelDetection):
        raise TypeError("subgraphs.plan needs the ModelDetection of subgraphs.detect")
    parts = [(scope, plan_sites(found, strategy)) for scope, found in detection.parts]
    return ModelPlan(strategy, [step for _, part in parts for step in part.rewrites], parts=parts)


def _innermost_first(parts: list) -> list:
    """Every subgraph before the graph holding it: a rewrite only redirects values of its own graph,
    so a graph's plan still holds live handles when its subgraphs have been rewritten (the reverse
    order would leave an inner plan reading an outer value the outer rewrite replaced)."""
    return list(reversed(parts))


def rewrite(model: ir.Model, the_plan: ModelPlan) -> None:
    """Apply each graph's plan through a view of that graph, innermost graphs first; then keep
    once each constant the rewrite created in two graphs (:func:`share_created`)."""
    before = set(model.graph.initializers)
    for scope, part in _innermost_first(the_plan.parts):
        if len(part):
            families.rewrite(scope.view(model), part)
    if sum(1 for _, part in the_plan.parts if len(part)) > 1:
        records = [step.compiled for step in the_plan if isinstance(getattr(step, "compiled", None), dict)]
        # what strip of a compiled model finds by name and expects one reader of (fused, widened, grouped)
        separable = {v for r in records if r.get("kind") != "merged" for v in _strings(r)}
        kept = share_created(model, before, separable)
        for record in records:
            if record.get("kind") == "merged" and record.get("weight") in kept:
                record["weight"] = kept[record["weight"]]


def _strings(value) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return {s for v in value.values() for s in _strings(v)}
    if isinstance(value, (list, tuple)):
        return {s for v in value for s in _strings(v)}
    return set()


def disable_adapters(model: ir.Model, detection: ModelDetection) -> None:
    """The strip reference in every graph: each detected adapter's B zeroed (a new constant per
    site: a B two graphs share is replaced in both, never edited in place)."""
    for scope, found in _innermost_first(detection.parts):
        if len(found):
            families.disable_adapters(scope.view(model), found)


def share_created(model: ir.Model, before: set[str], separate: set[str] = frozenset()) -> dict[str, str]:
    """Initializers created since ``before`` (names) with equal dtype, shape and bytes are kept
    once: every reader of a copy reads the first. The two branches of optimum's merged decoder
    share ``W``; merged, each branch gets its own ``W + s A @ B``, the same numbers. Names in
    ``separate`` stay as they are (a compiled model's record names them, one reader each).
    Returns ``{removed copy: kept name}``."""
    initializers = model.graph.initializers
    created = [v for name, v in initializers.items() if name not in before and name not in separate and v.const_value is not None]
    keys: dict[tuple, ir.Value] = {}
    kept: dict[str, str] = {}
    for value in created:
        tensor = value.const_value
        data = np.ascontiguousarray(tensor.numpy()).tobytes()
        key = (tensor.dtype, tuple(tensor.shape), hashlib.sha256(data).hexdigest())
        first = keys.get(key)
        if first is None:
            keys[key] = value
            continue
        if np.ascontiguousarray(first.const_value.numpy()).tobytes() != data:
            continue  # same digest, different bytes: kept apart
        value.replace_all_uses_with(first)
        del initializers[value.name]
        kept[value.name] = first.name
    return kept
