"""LoRA (PEFT and compatible): ``y = x @ W (+ bias) + s * ((x @ A) @ B (+ b_B))``.

Pattern: an add, in either operand order, of

- ``P = x @ W (+ bias)``: a GEMM with a constant 2-D weight, optionally followed by an add of a
  constant bias;
- ``C = s * ((x @ A) @ B (+ b_B))``: two GEMMs with constant ``A: [in, r]`` and ``B: [r, out]``,
  optional constant scalar multiplies / divides (before or after ``B``) and casts, and optionally
  a constant per-column bias ``b_B`` on ``B`` (PEFT ``lora_bias=True``; the scales after it scale it);

both reading the same tensor ``x`` (up to casts) with ``r`` small relative to ``in`` and ``out``.
Every add with a low-rank chain on one side that fails a check is a rejection with the reason.

PEFT's spellings the pattern reads besides the plain one:

- ``autocast_adapter_dtype`` (PEFT's default on an fp16 / bf16 base): the adapter is kept in fp32,
  so the add is ``y = narrow(wide(P) + C)``: ``P`` (in W's dtype) is widened losslessly to the
  adapter's float type, ``C`` is computed there from ``wide(x)``, and the add's only reader is a
  cast back to W's dtype (the *tail*; without it, or through a lossy or integer cast, the site is
  rejected). The rewrites replace the tail's output.
- ``fan_in_fan_out`` (GPT-2 ``Conv1D``, exported as ``addmm`` / ``Gemm``): ``P = unflatten(flatten(x)
  @ W + bias)`` where the reshapes only regroup the leading axes (same static last axis in and out,
  :func:`~zflora_compile.graph.protocol.row_view_input`) and the unflattened result has ``x``'s
  leading axes; the site reads ``x`` itself (an N-D GEMM does not need the 2-D view).
- ``lora_bias``: ``b_B`` as above.

Plan (weights computed lazily; accumulated in fp32, cast back to ``W``'s dtype):

- ``merge``: ``W' = W + s * A @ B``; with a B bias also ``b' = b + s * b_B`` (the projection is
  then written anew as ``x @ W' + b'``). Under autocast that is ``narrow(W + s A@B)`` computed in
  fp32: one rounding of the merged weight, where PEFT's own merge rounds ``s A@B`` first.
- ``fuse``: for the sites of one group (same input ``x``, same dtype), with ``D = sum(out_i)`` and
  ``R = sum(r_i)``::

      Y      = x @ [W_1 | ... | W_n | A_1 | ... | A_n]                  # one GEMM, [.., D + R]
      y      = Y[.., :D] + [b_1 + s_1 b_B1 | ... ] + Y[.., D:] @ blockdiag(s_1 B_1, ..., s_n B_n)
      y_i    = y[.., offset_i : offset_i + out_i]

  The adapter lanes ``Y[.., D:]`` are cut off right after the first GEMM, so no consumer of any
  ``y_i`` (reshape into heads, RoPE, split, attention) ever sees them. One GEMM has one dtype, so
  the lanes run in W's dtype: under autocast ``A`` and ``s * B`` (scaled in fp32) are rounded to
  W's dtype once and ``x @ A`` is held in it, where PEFT computes them in fp32 -- an error of a few
  units in the last place of W's dtype on the adapter term only (the result is rounded to W's
  dtype by the tail anyway); the pipeline verifies it at that dtype's tolerance.
- ``strip``: ``y = x @ W + b``, the base model (``b_B`` goes with the adapter; under autocast the
  tail's output reads ``P`` itself: the cast round trip is exact).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from zflora_compile import metadata
from zflora_compile.finite import all_finite, refuse_non_finite
from zflora_compile.graph.protocol import (
    Gemm,
    Projection,
    GraphView,
    NotACandidate,
    Reject,
    bias_problem,
    check_casts,
    check_path,
    either_order,
    match_projection,
    matrix_shape,
    produced_by,
    row_view_input,
    single_use,
    zero_branch,
)
from zflora_compile.graph.records import AdapterSite, LazyArray, Rejection, number_groups, numpy_dtype

NAME = "lora"


@dataclasses.dataclass
class LoraBinding:
    """The graph handles a LoRA rewrite needs (opaque to everything but the view that made them)."""

    add: object
    gemm: Gemm  # the base GEMM (``x``: the site's N-D input, row views peeled)
    base_output: object  # the add's base operand (after its bias add): what strip and merge keep
    b_gemm: Gemm | None  # the GEMM applying B (zeroed for the strip reference)
    chain_nodes: list
    branch: object = None  # the add's adapter operand, where B is no single GEMM or has a bias (zeroed whole instead)
    tail: object = None  # autocast: the cast of the add's output back to W's dtype (what the rewrites replace)
    narrow_output: object = None  # autocast: the projection's output in W's dtype, below the widening cast
    adapter_bias: object = None  # lora_bias: ``s * b_B`` as an fp32 ``[out]`` getter


@dataclasses.dataclass
class Chain:
    a: Gemm
    b: Gemm
    scale: float
    source: object  # x, up to casts
    nodes: list
    bias: object = None  # B's bias (a constant handle), lora_bias
    bias_scale: float = 1.0  # the scales applied after B's bias


def replaced(graph, binding) -> tuple:
    """``(old, base)``: the value a merge or strip replaces and the base projection's value that
    takes its place (autocast: the tail and the projection below the widening cast)."""
    tail = getattr(binding, "tail", None)
    if tail is not None:
        return tail, binding.narrow_output
    return graph.output(binding.add), binding.base_output


def adapter_bias(site: AdapterSite):
    """``s * b_B`` in fp32 (``[out]``) for a LoRA with a bias on B, else None."""
    getter = getattr(site.binding, "adapter_bias", None)
    return getter() if getter is not None else None


# ---------------------------------------------------------------- pattern and check


def match_chain(view: GraphView, value, *, b_bias: bool = False) -> Chain:
    """``s * ((x @ A) @ B (+ b_B))`` ending at ``value``; raises NotACandidate or Reject. ``b_bias``:
    accept a constant bias on B (else a B bias add is no chain, and a B GEMM with a bias is rejected)."""
    reached, scale_after, nodes = view.walk_back(value)
    b = view.gemm(reached)
    bias = bias_node = None
    scale_mid = 1.0
    if b is None:
        found = view.bias_add(reached) if b_bias else None
        if found is None:
            raise NotACandidate
        data, bias, bias_node = found
        inner, scale_mid, more = view.walk_back(data)
        b = view.gemm(inner)
        if b is None:
            raise NotACandidate
        nodes += [bias_node, *more]
    nodes.append(b.node)
    reached, scale_between, more = view.walk_back(b.operand)
    nodes += more
    a = view.gemm(reached)
    if a is None:
        if bias is not None:  # a biased GEMM reading something else: a layer of the base model, no chain
            raise NotACandidate
        inner = view.activation_input(reached)
        below = view.gemm(view.walk_back(inner)[0]) if inner is not None else None
        if below is not None and view.is_constant(below.weight):
            raise Reject(f"{view.describe(reached)} sits between the low-rank GEMMs '{view.name(below.node)}' and '{view.name(b.node)}' (not linear)")
        raise NotACandidate
    if bias is not None and not (view.is_constant(a.weight) and view.is_constant(b.weight)):
        raise NotACandidate
    nodes.append(a.node)
    if a.bias is not None or (b.bias is not None and not b_bias):
        raise Reject(f"low-rank GEMM '{view.name((a if a.bias is not None else b).node)}' has a bias")
    if b.bias is not None:  # B as one GEMM with its own bias (Gemm's C)
        if bias is not None:
            raise Reject(f"low-rank GEMM '{view.name(b.node)}' has two biases")
        if not view.is_constant(b.bias):
            raise Reject(f"bias of the low-rank GEMM '{view.name(b.node)}' is not constant")
        bias = b.bias
    for gemm, role in ((a, "A"), (b, "B")):
        if not view.is_constant(gemm.weight):
            raise Reject(f"low-rank {role} '{view.value_name(gemm.weight)}' of '{view.name(gemm.node)}' is not constant ({produced_by(view, gemm.weight)})")
    source = view.peel(a.x)
    check_casts(view, a.x, source, view.dtype(a.weight), "the input of A")
    check_casts(view, b.operand, a.out, view.dtype(b.weight), "the lanes between A and B")
    return Chain(a, b, scale_after * scale_mid * scale_between, source, nodes, bias, scale_after)


@dataclasses.dataclass
class Base:
    """The base side of a LoRA add, through PEFT's spellings (see the module docstring)."""

    projection: Projection
    gemm: Gemm  # the projection's GEMM, ``x`` its N-D input (row views peeled)
    nodes: list  # between the add and the projection: widening casts, the unflattening reshape
    tail: object = None
    narrow_output: object = None


def _match_base(view: GraphView, add, base_value, *, checks: bool = True) -> Base:
    """The projection ``base_value`` is: plain, widened to the adapter's dtype (autocast, with its
    tail), and/or unflattened from a 2-D GEMM over the flattened input (Conv1D). ``checks=False``:
    the structure only (no cast, tail or leading-axes checks; ``add`` unused)."""
    if view.is_constant(base_value):
        raise NotACandidate  # a constant added to a low-rank product: B's own bias; the add reading it is the site
    inner = view.peel(base_value)
    nodes, tail = [], None
    if inner is not view.peel(base_value, casts=False):  # casts between the add and the projection
        wide, narrow = view.value_dtype(base_value), view.value_dtype(inner)
        if checks:
            check_casts(view, base_value, inner, None, "the base projection output")
            if wide is None or narrow is None:
                raise Reject(f"cannot tell the dtypes around the cast of the base projection output '{view.value_name(inner)}' at '{view.name(add)}'")
        value = base_value
        while value is not inner and view.producer(value) is not None and len(nodes) < 10_000:
            nodes.append(view.producer(value))
            value = view.data_input(nodes[-1])
        if checks and wide != narrow:  # PEFT autocast: the sum is computed in the adapter's dtype and cast back
            tail = _tail(view, add, view.output(add), wide, narrow)
    else:
        inner = base_value
    below = row_view_input(view, inner)
    x = None
    if below is not None:
        projection = match_projection(view, below)
        x = row_view_input(view, projection.gemm.x, matrix_shape(view, projection.gemm, "weight")[0])  # x's width: checked against A's
        if x is None and checks:
            raise Reject(f"'{view.name(view.producer(inner))}' reshapes the output of '{view.name(projection.node)}', whose input '{view.value_name(projection.gemm.x)}' is no flattened view of a tensor")
        lead, x_lead = view.leading_shape(inner), view.leading_shape(x) if x is not None else None
        if checks and (lead is None or x_lead is None or lead != x_lead):
            raise Reject(
                f"cannot tell that '{view.name(view.producer(inner))}' restores the leading axes of '{view.value_name(x)}' "
                f"(shapes {lead} and {x_lead}) around '{view.name(projection.node)}'"
            )
        nodes.append(view.producer(inner))
    else:
        projection = match_projection(view, inner)
    gemm = projection.gemm if below is None else dataclasses.replace(projection.gemm, x=x)
    return Base(projection, gemm, nodes, tail, inner if tail is not None else None)


def base_gemm(view: GraphView, value) -> Gemm | None:
    """The base GEMM a LoRA add's base operand ``value`` is, as :func:`_match_base` reads PEFT's
    spellings (widening casts, a bias add, an unflattening reshape), its ``x`` the N-D input; None
    where it is none. The structure only, checks aside: for another family's "this add is plain
    LoRA, the LoRA family's (with its reason)" exit."""
    try:
        base = _match_base(view, None, value, checks=False)
    except (Reject, NotACandidate):
        return None
    return base.gemm if base.gemm.x is not None else None


def _tail(view: GraphView, add, out, wide: str, narrow: str):
    """The cast of the add's ``wide`` output back to ``narrow`` (W's dtype), its only reader."""
    users = view.users(out)
    tail = view.output(users[0]) if len(users) == 1 and not view.is_graph_output(out) else None
    if tail is None or view.peel(tail) is not out or view.value_dtype(tail) != narrow:
        what = f"{len(users)} nodes" if len(users) != 1 else (f"'{view.name(users[0])}' ({view.value_dtype(tail)})" if users else "a graph output")
        raise Reject(
            f"the {wide} sum '{view.value_name(out)}' of a {narrow} projection and its adapter is read by {what}, "
            f"not only by a cast back to {narrow}: a rewrite in {narrow} cannot replace it"
        )
    return tail


def _match_site(view: GraphView, add, base_value, chain: Chain, max_rank_ratio: float, index: int) -> AdapterSite:
    base = _match_base(view, add, base_value)
    projection, gemm, bias = base.projection, base.gemm, base.projection.bias
    if view.peel(gemm.x) is not chain.source:
        raise Reject(
            f"low-rank chain reads '{view.value_name(chain.source)}' but the projection '{view.name(gemm.node)}' "
            f"it is added to reads '{view.value_name(view.peel(gemm.x))}'"
        )
    check_casts(view, gemm.x, view.peel(gemm.x), view.dtype(gemm.weight), "the input of the base projection")
    check_casts(view, view.output(chain.nodes[0]) if chain.nodes else chain.b.out, chain.b.out, view.dtype(gemm.weight), "the low-rank output")
    check_path(view, base_value, gemm.node, add, "base projection output")
    for i, node in enumerate(chain.nodes):  # collected walking back: nodes[i] feeds nodes[i - 1], nodes[0] the add
        single_use(view, view.output(node), chain.nodes[i - 1] if i else add, "low-rank intermediate")
    in_w, out_w = projection.shape
    in_a, rank = matrix_shape(view, chain.a, "A")
    rank_b, out_b = matrix_shape(view, chain.b, "B")
    if (in_a, rank_b, out_b) != (in_w, rank, out_w):
        raise Reject(f"shapes do not line up at '{view.name(add)}': W [{in_w}, {out_w}], A [{in_a}, {rank}], B [{rank_b}, {out_b}]")
    if rank > max_rank_ratio * min(in_w, out_w):
        raise Reject(f"rank {rank} is not small relative to W [{in_w}, {out_w}] (limit {max_rank_ratio:g} x {min(in_w, out_w)})")
    bias_getter = None
    if bias is not None:
        problem = bias_problem(view, bias, out_w, gemm.x)
        if problem:
            raise Reject(f"bias of '{view.name(gemm.node)}' {problem}")
        getter = view.constant_array(bias)
        bias_getter = lambda g=getter, n=out_w: g().reshape(n)  # noqa: E731
    b_bias = None
    if chain.bias is not None:
        problem = bias_problem(view, chain.bias, out_w, chain.b.operand)
        if problem:
            raise Reject(f"bias of the low-rank GEMM '{view.name(chain.b.node)}' {problem}")
        getter = view.constant_array(chain.bias)
        b_bias = lambda g=getter, n=out_w, s=chain.bias_scale: g().astype(np.float32).reshape(n) * np.float32(s)  # noqa: E731
    out = view.output(add)
    x_shape, out_shape = view.shape_key(gemm.x), view.shape_key(out)
    if (x_shape is None or out_shape is None) and view.requires_shapes:
        raise Reject(f"no shape metadata on '{view.value_name(gemm.x)}' or '{view.name(add)}'; export the graph with torch.export or run FakeTensorProp")
    if x_shape is not None and out_shape is not None and (x_shape[:-1] != out_shape[:-1] or out_shape[-1] != str(out_w)):
        raise Reject(f"shape mismatch at '{view.name(add)}': input {x_shape} but output {out_shape}")
    bias_add = [projection.bias_add] if projection.bias_add is not None else []
    tail = [view.producer(base.tail)] if base.tail is not None else []
    return AdapterSite(
        site_id=f"lora{index}",
        family=NAME,
        label=view.label(gemm.node, gemm.weight),
        input_name=view.value_name(gemm.x),
        output_name=view.value_name(base.tail if base.tail is not None else out),
        in_features=in_w,
        out_features=out_w,
        rank=rank,
        scale=chain.scale,
        dtype=view.dtype(gemm.weight),
        has_bias=bias is not None,
        nodes=[view.name(n) for n in [gemm.node, *bias_add, *reversed(base.nodes), *reversed(chain.nodes), add, *tail]],
        weight=view.weight(gemm),
        lora_a=view.weight(chain.a),
        lora_b=view.weight(chain.b),
        bias=bias_getter,
        binding=LoraBinding(
            add, gemm, base_value, chain.b, list(chain.nodes),
            branch=view.output(chain.nodes[0]) if chain.bias is not None else None,
            tail=base.tail, narrow_output=base.narrow_output, adapter_bias=b_bias,
        ),
    )


def detect(view: GraphView, found) -> None:
    """Every LoRA site of ``view`` into ``found`` (a :class:`~zflora_compile.families.Found`)."""
    sites: list[AdapterSite] = []
    for add, operands in view.adds():
        def match(base, lowrank, add=add):
            return _match_site(view, add, base, match_chain(view, lowrank, b_bias=True), found.max_rank_ratio, len(sites))

        site, reason = either_order(match, operands)
        if site is not None:
            sites.append(site)
            found.claim(add, site.binding.gemm.node, *site.binding.chain_nodes)
        elif reason:
            found.reject(Rejection(node=view.name(add), reason=reason, label=view.label(add)))
    number_groups(sites, "g")
    found.sites += sites


# ---------------------------------------------------------------- plan


def scaled_b_fp32(site: AdapterSite) -> np.ndarray:
    """``s * B`` in fp32."""
    return site.lora_b().astype(np.float32) * np.float32(site.scale)


def merged_weight(site: AdapterSite, dtype: np.dtype) -> np.ndarray:
    """``W + s * A @ B`` (DoRA: times ``c`` per column) accumulated in fp32, cast to ``dtype``;
    refused (``InputError``) when W is not finite or the sum overflows ``dtype``."""
    merged = site.lora_a().astype(np.float32) @ scaled_b_fp32(site)
    np.add(merged, site.weight(), out=merged)  # W cast in the add: no fp32 copy of W
    if site.column_scale is not None:
        merged *= site.column_scale().astype(np.float32).reshape(1, -1)
    refuse_non_finite(site, "merge", "W + s·A@B", fp32=merged)
    return merged.astype(dtype)


def total_bias(site: AdapterSite) -> np.ndarray:
    """``b + s * b_B`` in fp32 (zeros for what is absent): the bias a fused or merged site adds."""
    total = site.bias().astype(np.float32).reshape(-1) if site.bias else np.zeros(site.out_features, dtype=np.float32)
    extra = adapter_bias(site)
    return total if extra is None else total + extra


@dataclasses.dataclass
class FuseGroup:
    """Sites reading one tensor, fused into ``x @ weight`` then ``lanes @ lowrank``."""

    section: ClassVar[str] = "fused_groups"
    name: str
    sites: list[AdapterSite]
    weight: LazyArray  # [in, D + R]
    lowrank: LazyArray  # [R, D]
    bias: LazyArray | None  # [D]
    out_splits: list[int]
    rank_total: int
    column_scale: LazyArray | None = None  # [D]: DoRA's c (1 on plain LoRA columns)
    max_rank: int | None = None  # --max-rank: rank_total is len(sites) * max_rank, the rest zero lanes

    @property
    def base_width(self) -> int:
        return sum(self.out_splits)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "sites": [s.site_id for s in self.sites],
            "out_splits": self.out_splits,
            "rank_total": self.rank_total,
            "weight_shape": list(self.weight.shape),
            "lowrank_shape": list(self.lowrank.shape),
        }

    def emit(self, graph, state: dict) -> None:
        bindings = [s.binding for s in self.sites]
        order = state.setdefault("order", graph.order())
        first = min(bindings, key=lambda b: order[id(b.add)])
        bias = scaled = None
        with graph.at(first.add, self.name):
            wide = graph.project(first.gemm.x, self.weight, like=first.gemm, name="fused_weight")
            base_lanes, rank_lanes = graph.split_last(wide, [self.base_width, self.rank_total])
            low = graph.project(rank_lanes, self.lowrank, name="lowrank_weight")
            if self.column_scale is not None:  # DoRA: c * (x @ W + lanes @ sB), then the bias
                fused = scaled = graph.scale(graph.add(base_lanes, low), self.column_scale)
                if self.bias is not None:
                    fused = graph.add(fused, bias := graph.constant("fused_bias", self.bias))
            else:
                if self.bias is not None:
                    base_lanes = graph.add(base_lanes, bias := graph.constant("fused_bias", self.bias))
                fused = graph.add(base_lanes, low)
            for binding, output in zip(bindings, graph.split_last(fused, self.out_splits)):
                tail = getattr(binding, "tail", None)
                graph.redirect(tail if tail is not None else graph.output(binding.add), output)
        metadata.note(state, self, self.record(wide, low, scaled, bias))

    def record(self, wide, low, scaled, bias) -> dict:
        """What the group created, by name (``metadata_props``: which columns are adapter lanes)."""
        return {
            "kind": "fused_group",
            "name": self.name,
            "sites": [s.site_id for s in self.sites],
            "labels": [s.label for s in self.sites],
            "families": sorted({s.family for s in self.sites}),
            "in_features": self.weight.shape[0],
            "base_width": self.base_width,
            "rank_width": self.rank_total,
            "out_splits": self.out_splits,
            "weight": metadata.created_name(wide),
            "lowrank": metadata.created_name(low),
            "column_scale": metadata.created_name(scaled) if scaled is not None else None,
            "bias": metadata.value_name(bias) if bias is not None else None,
            **({"max_rank": self.max_rank, "adapter_ranks": [s.rank for s in self.sites]} if self.max_rank is not None else {}),
            # lora_bias: the fused bias holds b + s*b_B and the base bias b is not kept apart
            **({"adapter_bias": True} if any(adapter_bias(s) is not None for s in self.sites) else {}),
        }


@dataclasses.dataclass
class MergeSite:
    """``W' = W + s * A @ B``; the add passes the projection through. With a bias on B
    (``lora_bias``) the projection is written anew as ``x @ W' + b'``, ``b' = b + s * b_B``."""

    section: ClassVar[str] = "merged_sites"
    site: AdapterSite
    weight: LazyArray  # [in, out]
    bias: LazyArray | None = None  # [out]: b', where B has a bias

    def to_json(self) -> str:
        return self.site.site_id

    def emit(self, graph, state: dict) -> None:
        binding = self.site.binding
        old, base = replaced(graph, binding)
        node = binding.gemm.node
        with graph.at(binding.add, self.site.label or self.site.site_id):
            if self.bias is None:
                graph.replace_weight(binding.gemm, self.weight, name="merged_weight")
                graph.redirect(old, base)
            else:
                merged = graph.project(binding.gemm.x, self.weight, like=binding.gemm, bias=self.bias, name="merged_weight")
                graph.redirect(old, merged)
                product = metadata.producer_input(merged, 0)  # ONNX: the MatMul under the bias Add
                node = product.producer() if product is not None and callable(getattr(product, "producer", None)) else None
        metadata.note(state, self, metadata.merged_record(self.site, node))


@dataclasses.dataclass
class StripSite:
    """The add passes the projection through: the base model."""

    section: ClassVar[str] = "stripped_sites"
    site: AdapterSite

    def to_json(self) -> str:
        return self.site.site_id

    def emit(self, graph, state: dict) -> None:
        graph.redirect(*replaced(graph, self.site.binding))


def _group_name(sites: list[AdapterSite], fallback: str) -> str:
    labels = [s.label for s in sites if s.label]
    if len(labels) != len(sites):
        return fallback
    prefix = labels[0].rsplit(".", 1)[0] if "." in labels[0] else ""
    if all(label.rsplit(".", 1)[0] == prefix for label in labels) and prefix:
        return prefix + "." + "+".join(label.rsplit(".", 1)[-1] for label in labels)
    return "+".join(labels)


def fuse_group(sites: list[AdapterSite], name: str) -> FuseGroup:
    dtype = numpy_dtype(sites[0].dtype)
    outs = [s.out_features for s in sites]
    width, rank_total = sum(outs), sum(s.rank for s in sites)

    def weight() -> np.ndarray:
        block = np.concatenate([s.weight().astype(dtype) for s in sites] + [s.lora_a().astype(dtype) for s in sites], axis=1)
        if not all_finite(block):  # A was checked before the rewrite: a W holds it
            for site in sites:
                refuse_non_finite(site, "fuse", "W", site.weight())
        return block

    def lowrank() -> np.ndarray:
        block = np.zeros((rank_total, width), dtype=np.float32)
        row, col = 0, 0
        for site in sites:
            block[row : row + site.rank, col : col + site.out_features] = scaled_b_fp32(site)
            row, col = row + site.rank, col + site.out_features
        return block.astype(dtype)

    bias = None
    if any(s.has_bias or adapter_bias(s) is not None for s in sites):

        def bias_fn() -> np.ndarray:
            return np.concatenate([total_bias(s).astype(dtype) for s in sites])

        bias = LazyArray((width,), dtype, bias_fn)
    column_scale = None
    if any(s.column_scale is not None for s in sites):

        def column_scale_fn() -> np.ndarray:
            return np.concatenate([(s.column_scale() if s.column_scale else np.ones(s.out_features)).reshape(-1).astype(dtype) for s in sites])

        column_scale = LazyArray((width,), dtype, column_scale_fn)
    return FuseGroup(name, sites, LazyArray((sites[0].in_features, width + rank_total), dtype, weight), LazyArray((rank_total, width), dtype, lowrank), bias, outs, rank_total, column_scale)


def plan(sites: list[AdapterSite], strategy: str) -> list:
    if strategy == "strip":
        return [StripSite(site) for site in sites]
    if strategy == "merge":
        return [
            MergeSite(
                site,
                LazyArray((site.in_features, site.out_features), numpy_dtype(site.dtype), lambda s=site: merged_weight(s, numpy_dtype(s.dtype))),
                LazyArray((site.out_features,), numpy_dtype(site.dtype), lambda s=site: total_bias(s).astype(numpy_dtype(s.dtype)))
                if getattr(site.binding, "adapter_bias", None) is not None
                else None,
            )
            for site in sites
        ]
    groups: dict[str, list[AdapterSite]] = {}
    for site in sites:
        groups.setdefault(site.group or site.site_id, []).append(site)
    return [fuse_group(members, _group_name(members, key)) for key, members in groups.items()]


def disable(graph, site: AdapterSite) -> None:
    """B replaced by zeros, the graph otherwise unchanged (the strip reference); a site whose B is no
    single GEMM (densified, DoRA) has its whole branch multiplied by zero instead."""
    binding = site.binding
    if binding.branch is not None:
        zero_branch(graph, binding.add, binding.base_output, binding.branch, f"{site.site_id}.zero_branch")
        return
    gemm = binding.b_gemm
    with graph.at(site.binding.add, f"{site.site_id}.zero_b"):
        graph.replace_weight(gemm, np.zeros(gemm.shape, dtype=numpy_dtype(graph.dtype(gemm.weight))), name="zero_b")
