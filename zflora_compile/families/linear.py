"""Any linear adapter branch: LoKr, LoHa, VeRA, or one nobody has named yet.

Pattern: the adapter-shaped branches of :mod:`.branches` that no named family claimed. On one
projection ``y = x @ W (+ bias) + f_1(x) + .. + f_k(x)``, where every ``f_i`` is computed from ``x``
with constant parameters (it may read ``x @ W`` itself, as DoRA's ``(c - 1) * (x @ W)`` does).

Check: each ``f_i`` is linear and token-wise, ``f_i(x) = x @ dW_i``. ``dW_i`` is measured by
evaluating the branch alone on an identity probe (row ``j`` of ``I_in`` as token ``j``), then the
claim is tested on a seeded random input: ``f_i(R) = R @ dW_i`` within fp32 tolerance (a
nonlinearity, a constant term, or a reshape that mixes tokens or batch rows fails it). For an
embedding ``E[ids] + f(ids)`` the probe is every id, ``dE = f(0 .. vocab-1)``, and the check is
``f(ids) = dE[ids]`` on random ids.

Plan (``dW = sum_i dW_i`` in fp32):

- ``merge``: ``W' = W + dW`` (cast back to ``W``'s dtype; a bias is unchanged since ``f_i(0) = 0``);
  the top add passes the projection through. Embedding: ``E' = E + dE`` in a new table.
- ``strip``: the top add passes the projection through: the base model.
- ``fuse``: a generic branch has no separable fused form; it stays as it is (reported in the plan).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from zflora_compile.graph.branches import Branch, escape, find_branches, find_input_scales, find_lane_reads, find_scales
from zflora_compile.graph.probe import NotLinear, measure_map
from zflora_compile.graph.protocol import GraphView, NotACandidate, Reject, match_projection, zero_branch
from zflora_compile.graph.records import AdapterSite, LazyArray, LinearSite, Unrecognized, numpy_dtype

NAME = "linear"


@dataclasses.dataclass
class LinearBinding:
    top: Branch  # the highest branch on the projection; its add's output is what the model reads
    gemm: object  # the base GEMM (None for an embedding)
    merge_problem: str | None = None  # why the weight cannot be replaced (strip still can)


# ---------------------------------------------------------------- measuring dW


def measure(view: GraphView, branch: Branch, in_features: int, out_features: int) -> np.ndarray:
    """``dW`` ``[in, out]`` (fp32) of one branch, checked to be linear and token-wise; raises NotLinear."""
    ids = branch.anchor.kind == "embedding"
    return measure_map(view, branch.anchor.x, branch.value, branch.nodes, in_features, out_features, ids=ids)


# ---------------------------------------------------------------- pattern and check


def _mergeable(view: GraphView, top: Branch) -> str | None:
    """Why the branches of ``top``'s stack cannot be folded into the weight (the projection's
    output, or a sum below the top, is read by something else), or None."""
    stack = top.stack
    inside = {id(n) for b in stack for n in b.nodes}
    readers = [(view.output(b.add), above.add) for b, above in zip(stack, stack[1:])]
    if top.anchor.kind == "projection":  # every value from the GEMM up to the first add
        value, gemm = top.anchor.output, top.anchor.node
        while value is not None:
            readers.append((value, stack[0].add if value is top.anchor.output else None))
            node = view.producer(value)
            if node is None or node is gemm:
                break
            value = view.data_input(node)
    else:
        readers.append((top.anchor.output, stack[0].add))
    for value, consumer in readers:
        if view.is_graph_output(value):
            return f"'{view.value_name(value)}' is a graph output"
        path = {id(view.producer(v)) for v, _ in readers}
        for user in view.users(value):
            if user is not consumer and id(user) not in inside and id(user) not in path:
                return f"'{view.value_name(value)}' is also read by node '{view.name(user)}'"
    return None


def _parallel_projection(view: GraphView, branch: Branch) -> bool:
    """The branch is itself one full projection of the same input (``x @ W2``, as dynamo writes a
    LoKr / LoHa update it folded): then the add is symmetric and only rank tells base from adapter."""
    try:
        other = match_projection(view, branch.value)
    except (Reject, NotACandidate):
        return False
    return view.peel(other.gemm.x) is branch.anchor.x and len(branch.nodes) <= 2


def _ambiguous(view: GraphView, stack: list, measured: dict, in_features: int, out_features: int, max_rank_ratio: float) -> None:
    """Raise NotLinear for a branch that is one full projection of the same input with an update of
    more than small rank: two dense projections summed (a base model's, or a full-rank adapter the
    exporter folded) cannot be told apart, so neither is rewritten and strip refuses."""
    limit = max_rank_ratio * min(in_features, out_features)
    for branch in stack:
        if branch.anchor.kind == "projection" and _parallel_projection(view, branch):
            rank = int(np.linalg.matrix_rank(measured[id(branch)]))
            if rank > limit:
                other = view.producer(view.peel(branch.value, casts=False))
                raise NotLinear(
                    f"it adds two full projections of one input ('{view.name(branch.anchor.node)}' and '{view.name(other)}', "
                    f"update rank {rank} > {limit:g}): a base model's own projections or a folded full-rank adapter; which one is the base cannot be told"
                )


def _site(view: GraphView, top: Branch, index: int, max_rank_ratio: float, allowed: set[int]) -> LinearSite:
    anchor = top.anchor
    if anchor.kind == "projection":
        gemm = anchor.projection.gemm
        in_features, out_features = anchor.projection.shape
        weight = view.weight(gemm)
        dtype = view.dtype(gemm.weight)
        label = view.label(gemm.node, gemm.weight)
    else:
        in_features, out_features = view.constant_shape(anchor.table)
        weight = view.constant_array(anchor.table)
        dtype = view.dtype(anchor.table)
        gemm = None
        label = view.label(anchor.node, anchor.table)
    stack = top.stack
    out = escape(view, [n for b in stack for n in b.nodes], allowed)
    if out is not None:
        node, reader = out
        where = f"node '{view.name(reader)}'" if reader is not None else "a graph output"
        raise NotLinear(f"its value '{view.value_name(view.output(node))}' is also read by {where}: without the adapter that reader is not defined")
    measured = {id(b): measure(view, b, in_features, out_features) for b in stack}  # not linear: reported, not planned
    _ambiguous(view, stack, measured, in_features, out_features, max_rank_ratio)
    total = sum(measured.values())  # kept: once other rewrites run, the branch may not be measurable alone

    def delta(total=total) -> np.ndarray:
        return total

    names = [view.name(anchor.node)] + [view.name(n) for b in stack for n in (*b.nodes, b.add)]
    return LinearSite(
        site_id=f"linear{index}",
        family=NAME,
        label=label,
        input_name=view.value_name(anchor.x),
        output_name=view.value_name(view.output(top.add)),
        in_features=in_features,
        out_features=out_features,
        dtype=dtype,
        nodes=list(dict.fromkeys(names)),
        weight=weight,
        kind=anchor.kind,
        branches=len(stack),
        delta=delta,
        binding=LinearBinding(top, gemm, _mergeable(view, top)),
    )


def _describe(view: GraphView, branch: Branch) -> str:
    ops = [view.op(n) for n in branch.nodes]
    shown = " -> ".join(ops[:8]) + (" ..." if len(ops) > 8 else "")
    return f"branch {shown} added to '{view.name(branch.anchor.node)}'"


def detect(view: GraphView, found) -> None:
    """Measure every adapter-shaped branch no earlier family claimed; tally what is accounted for."""
    branches = find_branches(view)
    tops = {id(b.anchor.node): b for b in branches}  # graph order: the last on a projection is its top
    lora_by_add = {id(s.binding.add): s for s in found.sites if isinstance(s, AdapterSite)}
    held = found.held()
    # what a branch's values may feed: any branch's nodes (GAWS's input reshape is shared) and adds
    allowed = {id(n) for b in branches for n in (*b.nodes, b.add)}
    recognised = 0
    for top in tops.values():
        stack = top.stack
        unclaimed = [b for b in stack if id(b.add) not in held]  # held by a site, not only claimed
        if not unclaimed:
            recognised += len(stack)
            continue
        foreign = [b for b in stack if id(b.add) in held and id(b.add) not in lora_by_add]
        own = {id(n) for b in stack if id(b.add) in lora_by_add for n in (b.add, *b.nodes, top.anchor.node)}
        shared = next((n for b in unclaimed for n in (top.anchor.node, *b.nodes) if id(n) in held and id(n) not in own), None)
        reason = None
        if foreign:
            reason = f"it shares projection '{view.name(top.anchor.node)}' with another family's adapter"
        elif shared is not None:
            reason = f"its node '{view.name(shared)}' belongs to site {held[id(shared)]}, which another family rewrites"
        elif top.anchor.kind == "quantized":
            reason = (
                f"it is added to the quantized projection '{view.name(top.anchor.node)}' ({view.op(top.anchor.node)}): only a LoRA chain "
                "is recognised there (a measured update cannot be merged into a quantized weight)"
            )
        else:
            try:
                site = _site(view, top, len(found.linear), found.max_rank_ratio, allowed)
            except NotLinear as error:
                reason = str(error)
        if reason is not None:
            recognised += len(stack) - len(unclaimed)
            for branch in unclaimed:  # a family's own rejection of the add (if any) stays in the rejections
                found.unrecognized.append(
                    Unrecognized("branch", view.name(branch.add), f"{_describe(view, branch)}: {reason}", view.label(branch.anchor.node), [view.name(n) for n in branch.nodes])
                )
            continue
        taken = [lora_by_add.pop(id(b.add)) for b in stack if id(b.add) in lora_by_add]  # summed with the others
        found.sites[:] = [s for s in found.sites if not any(s is t for t in taken)]
        found.linear.append(site)
        found.claim(*(b.add for b in stack), keep_rejections=True)  # a family's reason says why it is not fused
        recognised += len(stack)
    found.accounting.branches_found += len(branches)
    found.accounting.branches_recognised += recognised
    counted = {id(b.add) for b in branches}
    linear_adds = {id(b.add) for site in found.linear for b in site.binding.top.stack}
    inside = {id(n) for b in branches for n in b.nodes}
    found.shaped |= counted
    for add, gemm in find_lane_reads(view, found.max_rank_ratio):  # lanes read from another tensor
        if id(add) in inside and id(add) in held:
            continue  # an add inside a recognised branch (DoRA's sum of its two terms) is counted with it
        found.shaped.add(id(add))
        if id(add) in counted:
            continue
        found.accounting.branches_found += 1
        if id(add) in held or id(add) in linear_adds:
            found.accounting.branches_recognised += 1
        elif view.name(add) not in found.rejections:  # a rejection is listed with its own reason
            found.unrecognized.append(
                Unrecognized("branch", view.name(add), f"a low-rank read (z @ B) added to '{view.name(gemm)}' that no family claimed", view.label(gemm), [view.name(add)])
            )
    after = [(scale, "output", "a base model's LayerScale") for scale in find_scales(view)]
    before = [(scale, "input", "a base model's own channel scale") for scale in find_input_scales(view)]
    for scale, side, lookalike in after + before:
        if id(scale.node) in inside or id(scale.anchor.node) in inside:
            continue  # a vector inside an adapter branch (VeRA's d and b), accounted for with it
        found.accounting.scales_found += 1
        if found.claimed(scale.node):
            found.accounting.scales_recognised += 1
            continue
        found.unrecognized.append(
            Unrecognized(
                "scale",
                view.name(scale.node),
                f"constant per-channel scale of '{view.name(scale.anchor.node)}''s {side}: {lookalike} or an "
                "IA3-style adapter cannot be told apart; left as it is",
                view.label(scale.anchor.node),
                [view.name(scale.node)],
            )
        )


# ---------------------------------------------------------------- plan


@dataclasses.dataclass
class MergeBranches:
    """``W' = W + dW`` (an embedding: a new table ``E + dE``); the top add passes the projection through."""

    section: ClassVar[str] = "merged_sites"
    site: LinearSite
    weight: LazyArray

    def to_json(self) -> str:
        return self.site.site_id

    def emit(self, graph, state: dict) -> None:
        binding = self.site.binding
        anchor = binding.top.anchor
        with graph.at(binding.top.add, self.site.label or self.site.site_id):
            weight = self.weight.numpy()  # measured now: the branches are about to be bypassed
            if binding.gemm is not None:
                graph.replace_weight(binding.gemm, weight, name="merged_weight")
                graph.redirect(graph.output(binding.top.add), anchor.output)
            else:
                graph.redirect(graph.output(binding.top.add), graph.gather(graph.constant("merged_table", weight), anchor.x))


@dataclasses.dataclass
class StripBranches:
    """Every add of the stack passes the projection through: the base model."""

    section: ClassVar[str] = "stripped_sites"
    site: LinearSite

    def to_json(self) -> str:
        return self.site.site_id

    def emit(self, graph, state: dict) -> None:
        binding = self.site.binding
        for branch in binding.top.stack:  # every sum on the way (one may be a graph output)
            graph.redirect(graph.output(branch.add), binding.top.anchor.output)


@dataclasses.dataclass
class KeepBranches:
    """No separable fused form: the branches stay as they are."""

    section: ClassVar[str] = "unfused_sites"
    site: LinearSite

    reason: str = "a generic linear branch has no separable fused form; merge or strip it"

    def to_json(self) -> dict:
        return {"site": self.site.site_id, "reason": self.reason}

    def emit(self, graph, state: dict) -> None:
        return None


def merged(site: LinearSite) -> np.ndarray:
    dtype = numpy_dtype(site.dtype)
    return (site.weight().astype(np.float32) + site.delta()).astype(dtype)


def plan(sites: list[LinearSite], strategy: str) -> list:
    if strategy == "strip":
        return [StripBranches(site) for site in sites]
    if strategy == "merge":
        return [
            KeepBranches(s, f"not merged: {s.binding.merge_problem}")
            if s.binding.merge_problem
            else MergeBranches(s, LazyArray((s.in_features, s.out_features), numpy_dtype(s.dtype), lambda s=s: merged(s)))
            for s in sites
        ]
    return [KeepBranches(site) for site in sites]


def disable(graph, site: LinearSite) -> None:
    """Each branch multiplied by zero before its add, the graph otherwise unchanged (the strip reference)."""
    for branch in site.binding.top.stack:
        zero_branch(graph, branch.add, branch.base, branch.value, f"{site.site_id}.zero_branch")
