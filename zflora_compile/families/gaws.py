"""GAWS (grouped adaptive weight sharing): ``y = x @ W (+ bias) + reshape(reshape(x, [.., g, s_in]) @ V,
[.., g * s_out])``, so ``dW = kron(I_g, V)`` (block diagonal, ``g`` identical blocks ``V: [s_in, s_out]``).

Pattern: an adapter-shaped branch (:mod:`zflora_compile.graph.branches`) on a projection that no
earlier family claimed; the exporters write it as ``Reshape -> MatMul(V) -> Reshape`` (the input
reshape shared by q, k and v in optimised exports; the ``diag`` variant's ``diag(d) @ V`` folded or
computed from constants; a scalar scale after it).

Check: the branch is linear token by token (measured on an identity probe,
:func:`~zflora_compile.graph.probe.measure_map`), and its update is ``kron(I_g, V)`` for some
``g >= 2`` dividing ``in`` and ``out``: every off-diagonal block zero, every diagonal block equal
(exactly, as measured). The largest such ``g`` is taken (the smallest shared block). ``g = 1`` is a
dense parallel projection, not GAWS: left to the generic family.

Plan (``V`` with the scale folded in, in fp32, cast to ``W``'s dtype):

- ``merge``: ``W' = W + kron(I_g, V)``.
- ``fuse``: the sites reading one tensor with the same ``g`` form a group: one GEMM
  ``x @ [W_1 | .. | W_n]`` (+ the biases), and one grouped GEMM
  ``reshape(x, [.., g, s_in]) @ [V_1 | .. | V_n]``, split per site and flattened back to
  ``[.., g * s_out_i]``: 2 GEMMs per group, like fused LoRA.
- ``strip``: the base projection; the strip reference zeroes the branch.

**GAWS-D** (family ``gaws_d``): ``reshape(G @ reshape(x, [.., g_in, s]), [.., g_out * s])``, so
``dW = kron(G^T, I_s)``: checked the same way (each ``s x s`` block a multiple of ``I_s``, the
largest ``s >= 2``). Its fused form multiplies from the right after swapping the last two axes:
``swap(reshape(x, [.., g_in, s])) @ [G_1^T | .. | G_n^T]``, split per site, swapped back and
flattened; merge adds ``kron(G^T, I_s)``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from zflora_compile import metadata
from zflora_compile.families.lora import MergeSite, StripSite
from zflora_compile.graph.branches import Branch, escape, find_branches
from zflora_compile.graph.probe import NotLinear, measure_map
from zflora_compile.graph.protocol import Gemm, GraphView, Reject, bias_getter, check_path, zero_branch
from zflora_compile.graph.records import GroupedSite, LazyArray, number_groups, numpy_dtype

NAME = "gaws"


@dataclasses.dataclass
class GroupedBinding:
    add: object
    gemm: Gemm
    base_output: object
    branch: object
    x: object
    leading: int  # axes of x before its last


def kron_groups(delta: np.ndarray) -> tuple[int, np.ndarray] | None:
    """``(g, V)`` with ``delta == kron(I_g, V)`` for the largest ``g >= 2``, else None."""
    rows, cols = delta.shape
    if np.count_nonzero(delta) * 2 > delta.size:
        return None  # g >= 2 identical diagonal blocks leave at least half the entries zero
    for g in range(min(rows, cols), 1, -1):
        if rows % g or cols % g:
            continue
        blocks = delta.reshape(g, rows // g, g, cols // g)
        diagonal = blocks[np.arange(g), :, np.arange(g), :]  # [g, s_in, s_out]
        off = blocks.copy()
        off[np.arange(g), :, np.arange(g), :] = 0
        if not off.any() and np.array_equal(diagonal, np.broadcast_to(diagonal[0], diagonal.shape)) and diagonal[0].any():
            return g, diagonal[0]
    return None


def kron_identity(delta: np.ndarray) -> tuple[int, np.ndarray] | None:
    """``(s, G^T)`` with ``delta == kron(G^T, I_s)`` for the largest ``s >= 2``, else None."""
    rows, cols = delta.shape
    if np.count_nonzero(delta) * 2 > delta.size:
        return None
    for size in range(min(rows, cols), 1, -1):
        if rows % size or cols % size:
            continue
        blocks = delta.reshape(rows // size, size, cols // size, size)  # [g_in, s, g_out, s]
        factors = blocks[:, 0, :, 0]  # G^T [g_in, g_out]
        if factors.any() and np.array_equal(blocks, factors[:, None, :, None] * np.eye(size, dtype=delta.dtype)[None, :, None, :]):
            return size, factors
    return None


def _site(view: GraphView, branch: Branch, index: int, allowed: set[int]) -> GroupedSite | None:
    projection = branch.anchor.projection
    gemm = projection.gemm
    in_w, out_w = projection.shape
    try:
        check_path(view, branch.base, gemm.node, branch.add, "base projection output")
    except Reject:
        return None
    if escape(view, branch.nodes, allowed) is not None:
        return None  # a value of the branch is read elsewhere: the generic family reports it
    delta = measure_map(view, branch.anchor.x, branch.value, branch.nodes, in_w, out_w)
    layout, found = NAME, kron_groups(delta)
    if found is None:
        layout, found = "gaws_d", kron_identity(delta)
    if found is None:
        return None
    groups, block = found
    try:
        bias = bias_getter(view, projection)
    except Reject:
        return None
    rank = view.rank(branch.anchor.x)
    if rank is None:
        return None
    bias_add = [projection.bias_add] if projection.bias_add is not None else []
    return GroupedSite(
        site_id=f"{layout}{index}",
        family=layout,
        label=view.label(gemm.node, gemm.weight),
        input_name=view.value_name(gemm.x),
        output_name=view.value_name(view.output(branch.add)),
        in_features=in_w,
        out_features=out_w,
        dtype=view.dtype(gemm.weight),
        nodes=[view.name(n) for n in [gemm.node, *bias_add, *branch.nodes, branch.add]],
        weight=view.weight(gemm),
        groups=groups,
        block=lambda b=block: b,
        bias=bias,
        has_bias=projection.bias is not None,
        binding=GroupedBinding(branch.add, gemm, branch.base, branch.value, branch.anchor.x, rank - 1),
    )


def detect(view: GraphView, found) -> None:
    """Every GAWS / GAWS-D site: single branches whose measured update is ``kron(I_g, V)`` or
    ``kron(G^T, I_s)``, ``g, s >= 2``."""
    branches = find_branches(view)
    stacked = {id(b.below.add) for b in branches if b.below is not None}
    sites: list[GroupedSite] = []
    allowed = {id(n) for b in branches for n in (*b.nodes, b.add)}  # GAWS's input reshape is shared by q, k, v
    for branch in branches:
        if branch.anchor.kind != "projection" or branch.below is not None or id(branch.add) in stacked or found.claimed(branch.add):
            continue
        try:
            site = _site(view, branch, len(found.grouped) + len(sites), allowed)
        except NotLinear:
            continue  # the generic family measures it again and reports the reason
        if site is not None:
            sites.append(site)
            found.claim(branch.add, keep_rejections=True)
    number_groups(sites, "k", "family", "groups")  # one grouped GEMM per input, dtype, layout and g
    found.grouped += sites


# ---------------------------------------------------------------- plan


def scaled_block(site: GroupedSite) -> np.ndarray:
    return np.asarray(site.block(), dtype=np.float32)


def delta(site: GroupedSite) -> np.ndarray:
    """``kron(I_g, V)`` (GAWS) or ``kron(G^T, I_s)`` (GAWS-D), fp32."""
    eye = np.eye(site.groups, dtype=np.float32)
    return np.kron(eye, scaled_block(site)) if site.family == NAME else np.kron(scaled_block(site), eye)


def merged_weight(site: GroupedSite) -> np.ndarray:
    """``W + dW`` in fp32, cast back to ``W``'s dtype."""
    return (site.weight().astype(np.float32) + delta(site)).astype(numpy_dtype(site.dtype))


@dataclasses.dataclass
class FuseGrouped:
    """Sites reading one tensor with the same ``g``: ``x @ [W_i]`` and ``reshape(x) @ [V_i]``."""

    section: ClassVar[str] = "fused_groups"
    name: str
    sites: list[GroupedSite]
    weight: LazyArray  # [in, D]
    blocks: LazyArray  # [s_in, sum s_out_i]
    bias: LazyArray | None

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "sites": [s.site_id for s in self.sites],
            "out_splits": [s.out_features for s in self.sites],
            "rank_total": 0,
            "weight_shape": list(self.weight.shape),
            "lowrank_shape": list(self.blocks.shape),
            "groups": self.sites[0].groups,
        }

    def emit(self, graph, state: dict) -> None:
        bindings = [s.binding for s in self.sites]
        order = state.setdefault("order", graph.order())
        first = min(bindings, key=lambda b: order[id(b.add)])
        g, transposed = self.sites[0].groups, self.sites[0].family != NAME
        with graph.at(first.add, self.name):
            base = graph.project(first.gemm.x, self.weight, like=first.gemm, name="fused_weight")
            if self.bias is not None:
                base = graph.add(base, graph.constant("fused_bias", self.bias))
            if transposed:  # GAWS-D: [.., g_in, s] -> [.., s, g_in] @ [G_i^T]
                lanes = graph.swap_last(graph.regroup(first.x, [self.blocks.shape[0], g], first.leading), first.leading)
            else:  # GAWS: [.., g, s_in] @ [V_i]
                lanes = graph.regroup(first.x, [g, self.blocks.shape[0]], first.leading)
            grouped = graph.project(lanes, self.blocks, name="grouped_weight")
            parts = graph.split_last(grouped, [s.out_features // g for s in self.sites])
            for binding, base_part, part in zip(bindings, graph.split_last(base, [s.out_features for s in self.sites]), parts):
                part = graph.swap_last(part, binding.leading) if transposed else part
                graph.redirect(graph.output(binding.add), graph.add(base_part, graph.flatten_last(part, 2, binding.leading)))
        metadata.note(state, self, {
            "kind": "grouped",
            "name": self.name,
            "sites": [s.site_id for s in self.sites],
            "labels": [s.label for s in self.sites],
            "families": sorted({s.family for s in self.sites}),
            "groups": g,
            "blocks": metadata.created_name(grouped),
            "blocks_shape": list(self.blocks.shape),
        })


def _fuse(sites: list[GroupedSite]) -> FuseGrouped:
    dtype = numpy_dtype(sites[0].dtype)
    width = sum(s.out_features for s in sites)
    rows = sites[0].in_features // sites[0].groups  # GAWS: s_in; GAWS-D: g_in

    def weight() -> np.ndarray:
        return np.concatenate([s.weight().astype(dtype) for s in sites], axis=1)

    def blocks() -> np.ndarray:
        return np.concatenate([scaled_block(s) for s in sites], axis=1).astype(dtype)

    bias = None
    if any(s.has_bias for s in sites):
        bias = LazyArray((width,), dtype, lambda: np.concatenate([(s.bias() if s.bias else np.zeros(s.out_features)).astype(dtype) for s in sites]))
    labels = [s.label or s.site_id for s in sites]
    return FuseGrouped(
        "+".join(labels),
        sites,
        LazyArray((sites[0].in_features, width), dtype, weight),
        LazyArray((rows, sum(s.out_features // s.groups for s in sites)), dtype, blocks),
        bias,
    )


def plan(sites: list[GroupedSite], strategy: str) -> list:
    if strategy == "strip":  # LoRA's rewrites: the binding has the same add, GEMM and base output
        return [StripSite(site) for site in sites]
    if strategy == "merge":
        return [MergeSite(s, LazyArray((s.in_features, s.out_features), numpy_dtype(s.dtype), lambda s=s: merged_weight(s))) for s in sites]
    groups: dict[str, list[GroupedSite]] = {}
    for site in sites:
        groups.setdefault(site.group or site.site_id, []).append(site)
    return [_fuse(members) if len(members) > 1 else KeepGrouped(members[0]) for members in groups.values()]


@dataclasses.dataclass
class KeepGrouped:
    """A lone projection's GAWS branch is already its fused form (one GEMM and one grouped GEMM)."""

    section: ClassVar[str] = "unfused_sites"
    site: GroupedSite

    def to_json(self) -> dict:
        return {"site": self.site.site_id, "reason": "alone on its input: the unfused form is already one GEMM and one grouped GEMM"}

    def emit(self, graph, state: dict) -> None:
        return None


def disable(graph, site: GroupedSite) -> None:
    """The branch multiplied by zero before its add (the strip reference)."""
    binding = site.binding
    zero_branch(graph, binding.add, binding.base_output, binding.branch, f"{site.site_id}.zero_branch")
