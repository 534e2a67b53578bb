"""The adapter families: one module each (pattern + check, plan, emit), written once against
the graph view and emitter of :mod:`zflora_compile.graph.protocol`.

:data:`FAMILIES` lists them in detection order. A family claims the nodes it accounts for; a
later family skips claimed nodes, and its reason for a node replaces an earlier family's (the
later one is the more specific: a LoRA-shaped add whose chain reads another tensor is an FFA
lane). :data:`PLANNERS` maps each kind of site record to the module that plans, emits and
disables it.
"""

from __future__ import annotations

import dataclasses

from zflora_compile.families import dora, gaws, lanes, linear, lora, lowrank, runtime, widening, zflora
from zflora_compile.graph.records import DEFAULT_MAX_RANK_RATIO, Accounting, AdapterSite, Detection, GroupedSite, LinearSite, Rejection, RuntimeSite, Unrecognized, WidenedSite

#: detection order: LoRA first (it is the most specific about its own adds), then LoRA with weights
#: fed at run time or a quantized base (it takes what LoRA rejected for exactly those reasons, before
#: the lane families read a graph-input B as a lane), then the lane families, then DoRA, GAWS,
#: factored linear branches (BD-LoRA, VeRA: densified to LoRA), then any linear branch no named
#: family claimed (it also tallies what is accounted for)
FAMILIES = (lora, runtime, lanes, zflora, dora, gaws, lowrank, linear)
#: site record type -> the module with ``plan(sites, strategy)`` and ``disable(graph, site)`` (exact
#: types: a RuntimeSite is an AdapterSite, planned by its own module)
PLANNERS = {AdapterSite: lora, RuntimeSite: runtime, WidenedSite: widening, GroupedSite: gaws, LinearSite: linear}


@dataclasses.dataclass
class Found:
    """What the families found so far in one graph."""

    view: object
    max_rank_ratio: float
    sites: list = dataclasses.field(default_factory=list)
    rejections: dict = dataclasses.field(default_factory=dict)  # node name -> Rejection
    claimed_ids: set = dataclasses.field(default_factory=set)
    linear: list = dataclasses.field(default_factory=list)
    grouped: list = dataclasses.field(default_factory=list)
    shaped: set = dataclasses.field(default_factory=set)  # ids of the adds shaped like an adapter (graph.branches)
    unrecognized: list = dataclasses.field(default_factory=list)
    accounting: Accounting = dataclasses.field(default_factory=Accounting)
    widened: widening.WidenedSites = dataclasses.field(init=False)

    def __post_init__(self):
        self.widened = widening.WidenedSites(self.view)

    def claim(self, *nodes, keep_rejections: bool = False) -> None:
        """These nodes are accounted for: no later family looks at them, earlier rejections drop
        (``keep_rejections``: they stay, saying why a more specific family left them)."""
        for node in nodes:
            self.claimed_ids.add(id(node))
            if not keep_rejections:
                self.rejections.pop(self.view.name(node), None)

    def claimed(self, node) -> bool:
        return id(node) in self.claimed_ids

    def held(self) -> dict[int, str]:
        """id(node) -> site id, for every node a site found so far rewrites or reads (its GEMM, its
        adapter's GEMMs, its adds; a widened projection's lane reads and writes)."""
        out: dict[int, str] = {}
        view = self.view
        for site in self.sites:
            b = site.binding
            for node in (b.gemm.node, b.add, *b.chain_nodes, *([b.b_gemm.node] if b.b_gemm is not None else [])):
                out[id(node)] = site.site_id or site.family
        for site in self.grouped:
            b = site.binding
            out[id(b.add)] = out[id(b.gemm.node)] = site.site_id
        for site in self.linear:
            for branch in site.binding.top.stack:
                out[id(branch.add)] = site.site_id
        for site in self.widened.by_node.values():
            b = site.binding
            for node in (b.node, *(g.node for g in b.b_gemms), *b.read_adds, *(view.producer(z) for z in b.lanes_out if z is not None)):
                out[id(node)] = site.family
        return out

    def reject(self, rejection: Rejection) -> None:
        self.rejections.pop(rejection.node, None)
        self.rejections[rejection.node] = rejection


def detect(graph, *, max_rank_ratio: float = DEFAULT_MAX_RANK_RATIO) -> Detection:
    """Every adapter site of ``graph`` (a graph view), and what was left alone, and why."""
    found = Found(graph, max_rank_ratio)
    for family in FAMILIES:
        family.detect(graph, found)
    _left_rejected(graph, found)
    return Detection(
        found.sites,
        list(found.rejections.values()),
        found.widened.finish(),
        linear=found.linear,
        grouped=found.grouped,
        unrecognized=found.unrecognized,
        accounting=found.accounting,
    )


def _left_rejected(graph, found: Found) -> None:
    """A rejection no family took back, at an add shaped like an adapter, is adapter-shaped structure
    left in the model: it is unrecognised too (and counted), so strip refuses while it remains.
    (A family's rejection elsewhere, e.g. a base model's MLP seen as a chain with an activation, is
    only reported.)"""
    listed = {u.node for u in found.unrecognized} | {n for u in found.unrecognized for n in u.nodes}
    names = {graph.name(node): node for node in graph.nodes()}
    for rejection in found.rejections.values():
        node = names.get(rejection.node)
        if rejection.node in listed or node is None or id(node) in found.held() or id(node) not in found.shaped:
            continue
        found.unrecognized.append(Unrecognized("branch", rejection.node, rejection.reason, rejection.label))  # counted with the shapes


def rewrite(graph, plan) -> None:
    """Apply ``plan`` (its rewrites, in order) to ``graph`` in place, then remove what became dead."""
    state: dict = {}
    for step in plan.rewrites:
        step.emit(graph, state)
    graph.cleanup()


def disable_adapters(graph, detection: Detection) -> None:
    """Every detected adapter's B replaced by zeros, the graph otherwise unchanged."""
    for site in detection.all_sites:
        PLANNERS[type(site)].disable(graph, site)
    graph.cleanup()
