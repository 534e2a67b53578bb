"""Factored linear adapters: block-diagonal LoRA (BD-LoRA), VeRA, and any LoRA-like branch behind
reshapes, einsums or vector scalings, densified into plain LoRA and handed to the LoRA planner.

Pattern: an adapter-shaped branch (:mod:`zflora_compile.graph.branches`) on a projection that no
earlier family claimed, with a *waist*: a value ``z`` inside the branch, of last-axis width ``r``
small relative to ``W``, that every path from ``x`` to the branch's output goes through.

Check: both halves are linear token by token, measured on identity probes
(:func:`~zflora_compile.graph.probe.measure_map`): ``z = x @ A`` (``A: [in, r]``) and
``branch = z @ B`` (``B: [r, out]``). Whatever the graph does inside a half (a block-diagonal
``Reshape -> Einsum -> Reshape``, VeRA's ``lambda_d`` and ``lambda_b`` vectors, scalar scales) is
folded into ``A`` or ``B``; the structure is read from the measured factors, never from a
configuration: a factor that is block diagonal with ``n >= 2`` blocks makes the site BD-LoRA
(``family`` "bdlora"; on column-parallel layers ``B`` is the block-diagonal one, on row-parallel
layers ``A``), otherwise "lowrank".

Plan: the LoRA planner's (:mod:`.lora`): ``merge`` ``W' = W + A @ B``; ``fuse`` widens the group's
GEMM with ``A`` and applies ``blockdiag(B_i)`` to the lanes; ``strip`` the base projection.
"""

from __future__ import annotations

import numpy as np

from zflora_compile.families.lora import LoraBinding
from zflora_compile.graph.branches import Branch, cone_between, find_branches
from zflora_compile.graph.probe import NotLinear, measure_map
from zflora_compile.graph.protocol import GraphView, Reject, bias_getter, check_path
from zflora_compile.graph.records import AdapterSite, number_groups

NAME = "lowrank"


def _waist(view: GraphView, branch: Branch, limit: float) -> tuple[object, int, list, list] | None:
    """The narrowest value every path from ``x`` to the branch output goes through: ``(z, r,
    nodes x -> z, nodes z -> output)``, or None."""
    order = view.order()
    leading = (view.dims(branch.anchor.x) or [None])[:-1]
    best = None
    for node in branch.nodes:
        value = view.output(node)
        dims = view.dims(value)
        if not dims or dims[:-1] != leading or dims[-1] is None or dims[-1] > limit or value is branch.value:
            continue  # a waist is one row of r lanes per token, laid out like x
        after = cone_between(view, branch.value, value, order)
        if after is None:
            continue  # some path to the output bypasses it
        inside = {id(n) for n in after}
        before = [n for n in branch.nodes if id(n) not in inside and n is not view.producer(value)] + [view.producer(value)]
        if best is None or dims[-1] < best[1]:
            best = (value, dims[-1], before, after)
    return best


def block_count(matrix: np.ndarray) -> int:
    """The largest ``n >= 2`` for which ``matrix`` is block diagonal with ``n`` equal blocks, else 1."""
    rows, cols = matrix.shape
    for n in range(min(rows, cols), 1, -1):
        if rows % n or cols % n:
            continue
        blocks = matrix.reshape(n, rows // n, n, cols // n)
        off = blocks.copy()
        off[np.arange(n), :, np.arange(n), :] = 0
        if not off.any() and np.abs(blocks).sum() > 0:
            return n
    return 1


def _site(view: GraphView, branch: Branch, index: int, max_rank_ratio: float) -> AdapterSite | None:
    projection = branch.anchor.projection
    gemm = projection.gemm
    in_w, out_w = projection.shape
    found = _waist(view, branch, max_rank_ratio * min(in_w, out_w))
    if found is None:
        return None
    waist, rank, before, after = found
    a = measure_map(view, branch.anchor.x, waist, before, in_w, rank)
    b = measure_map(view, waist, branch.value, after, rank, out_w)
    try:
        bias = bias_getter(view, projection)
    except Reject:
        return None
    blocks = max(block_count(a), block_count(b))
    add_out = view.output(branch.add)
    bias_add = [projection.bias_add] if projection.bias_add is not None else []
    return AdapterSite(
        site_id=f"lowrank{index}",
        family="bdlora" if blocks > 1 else NAME,
        label=view.label(gemm.node, gemm.weight),
        input_name=view.value_name(gemm.x),
        output_name=view.value_name(add_out),
        in_features=in_w,
        out_features=out_w,
        rank=rank,
        scale=1.0,
        dtype=view.dtype(gemm.weight),
        has_bias=projection.bias is not None,
        nodes=[view.name(n) for n in [gemm.node, *bias_add, *branch.nodes, branch.add]],
        weight=view.weight(gemm),
        lora_a=lambda a=a: a,
        lora_b=lambda b=b: b,
        bias=bias,
        binding=LoraBinding(branch.add, gemm, branch.base, None, list(branch.nodes), branch=branch.value),
    )


def detect(view: GraphView, found) -> None:
    """Factor every unclaimed single branch with a waist into a LoRA site (BD-LoRA, VeRA, ...)."""
    sites: list[AdapterSite] = []
    branches = find_branches(view)
    stacked = {id(b.below.add) for b in branches if b.below is not None}
    for branch in branches:
        if branch.anchor.kind != "projection" or branch.below is not None or id(branch.add) in stacked or found.claimed(branch.add):
            continue
        try:
            check_path(view, branch.base, branch.anchor.node, branch.add, "base projection output")
        except Reject:
            continue  # the projection's output has another reader: the generic family keeps it
        inside = {id(n) for n in branch.nodes} | {id(branch.add)}
        if any(view.is_graph_output(view.output(n)) or any(id(u) not in inside for u in view.users(view.output(n))) for n in branch.nodes):
            continue  # a value inside is read elsewhere: fusing would keep it computed, the generic family merges it
        try:
            site = _site(view, branch, len(found.sites) + len(sites), found.max_rank_ratio)
        except NotLinear:
            continue  # the generic family measures it again and reports the reason
        if site is None:
            continue
        sites.append(site)
        found.claim(branch.add, keep_rejections=True)
    number_groups(sites, "w")
    found.sites += sites
