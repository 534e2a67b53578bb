"""DoRA (PEFT ``use_dora=True``): ``y = c * (x @ W + s * (x @ A) @ B) + bias``, ``c = m / ||W + s*A@B||``
per output column (a constant at inference).

Pattern: what PEFT's exporters write, ``r + ((c - 1) * r' + c * s * ((x @ A) @ B))`` in either
operand order, where ``r = x @ W (+ bias)`` is a projection with a constant weight, ``r'`` is ``r``
(no bias) or ``r - bias`` (the bias subtracted again), ``c - 1`` and ``c * s`` are constants or
computed from constants only (the weight-norm subgraph ``m / ReduceL2(W + s*B@A)`` that
``dynamo-noopt`` and ``torch.export`` leave unfolded: evaluated once here), and the chain is LoRA's
(:func:`.lora.match_chain`).

Check: ``c`` and the chain's factors are per-column vectors of ``out`` entries (or scalars); the
chain's factor divided by ``c`` is one scalar ``s`` for every column; ``r'`` carries no bias (a
branch that scales the bias is left to the generic family). Rank small as for LoRA.

Plan: the LoRA planner's (:mod:`.lora`), with ``c``:

- ``merge``: ``W' = (W + s * A @ B) * c`` column-wise; the bias is not scaled.
- ``fuse``: LoRA's widened group, then one per-column multiply by ``c`` before the bias; the
  weight-norm subgraph is folded into the constant ``c``.
- ``strip``: ``y = x @ W + bias``; the strip reference zeroes the whole DoRA branch (``B = 0``,
  ``c = 1``).
"""

from __future__ import annotations

import numpy as np

from zflora_compile.families.lora import LoraBinding, match_chain
from zflora_compile.graph.branches import constant_derived, escape
from zflora_compile.graph.onnx_eval import RegionError
from zflora_compile.graph.protocol import GraphView, NotACandidate, Reject, bias_getter, check_rank, either_order, match_projection
from zflora_compile.graph.records import AdapterSite, Rejection, number_groups

NAME = "dora"


def _constant(view: GraphView, value, out: int) -> np.ndarray:
    """A constant operand (a number, a constant, or computed from constants) as a scalar or ``[out]``."""
    if isinstance(value, (int, float)):
        return np.float64(value)
    try:
        array = np.asarray(view.evaluate([], value), dtype=np.float64)
    except RegionError as error:
        raise Reject(f"DoRA's column factor '{view.value_name(value)}' cannot be evaluated: {error}") from None
    if array.size == 1:
        return np.float64(array.reshape(()))
    if array.size != out or array.shape[-1] != out:
        raise Reject(f"DoRA's factor '{view.value_name(value)}' has shape {list(array.shape)}, not [{out}]")
    return array.reshape(out)


def _split(view: GraphView, value, kind: str):
    """``(constant operand, data operand, node)`` when ``value`` is ``kind`` of a constant and data."""
    node = view.producer(value)
    found = view.binary(node) if node is not None else None
    if found is None or found[0] != kind:
        return None
    _, left, right = found
    for const, data in ((left, right), (right, left)):
        if isinstance(const, (int, float)) or constant_derived(view, const):
            if not isinstance(data, (int, float)) and not constant_derived(view, data):
                return const, data, node
    return None


def _base_term(view: GraphView, value, projection, out: int):
    """``(c - 1, nodes)`` for ``(c - 1) * r'``, ``r'`` the projection's output without its bias."""
    found = _split(view, value, "mul")
    if found is None:
        raise NotACandidate
    k, data, node = found
    data = view.peel(data, casts=False)
    if projection.bias is None:
        if data is not projection.output:
            raise NotACandidate
        return _constant(view, k, out), [node]
    if data is projection.output:
        raise Reject(f"DoRA's base term '{view.name(node)}' scales the projection's bias")
    sub = _split(view, data, "sub")
    if sub is None or view.binary(sub[2])[2] is not sub[0] or view.peel(sub[1], casts=False) is not projection.output:
        raise NotACandidate
    bias = np.asarray(view.constant_array(projection.bias)(), dtype=np.float64).reshape(-1)
    if not np.array_equal(bias, np.broadcast_to(_constant(view, sub[0], out), (out,))):
        raise Reject(f"'{view.name(sub[2])}' subtracts something other than the projection's bias")
    return _constant(view, k, out), [node, sub[2]]


def _lora_term(view: GraphView, value, out: int):
    """``(factor, chain, nodes)`` for ``factor * s * ((x @ A) @ B)``: the product of the constant
    multiplies (and divisors) in front of LoRA's chain."""
    factor, nodes = np.float64(1.0), []
    while True:
        found = _split(view, value, "mul") or _split(view, value, "div")
        if found is None:
            break
        const, data, node = found
        kind = view.binary(node)[0]
        if kind == "div" and view.binary(node)[2] is not const:
            break  # a constant divided by the chain is no scale
        number = _constant(view, const, out)
        factor = factor * (1.0 / number if kind == "div" else number)
        nodes.append(node)
        value = data
    chain = match_chain(view, value)
    return factor * chain.scale, chain, nodes


def _match(view: GraphView, add, base, other, found) -> AdapterSite:
    try:
        projection = match_projection(view, base)
    except Reject:
        raise NotACandidate from None
    out = projection.shape[1]
    node = view.producer(other)
    summed = view.binary(node) if node is not None else None
    if summed is None or summed[0] != "add":
        raise NotACandidate
    k = base_nodes = factor = chain = chain_nodes = None
    for first, second in ((summed[1], summed[2]), (summed[2], summed[1])):
        try:
            k, base_nodes = _base_term(view, first, projection, out)
            factor, chain, chain_nodes = _lora_term(view, second, out)
            break
        except NotACandidate:
            continue
    if chain is None:
        raise NotACandidate
    if view.peel(chain.a.x) is not view.peel(projection.gemm.x):
        raise Reject(f"DoRA's chain reads '{view.value_name(view.peel(chain.a.x))}', its projection '{view.value_name(view.peel(projection.gemm.x))}'")
    c = np.broadcast_to(k + 1.0, (out,)).astype(np.float64)
    if not np.all(np.isfinite(c)) or np.any(c == 0):
        raise Reject(f"DoRA's magnitude at '{view.name(add)}' has a zero or non-finite column")
    s = np.broadcast_to(factor, (out,)) / c
    if not np.allclose(s, s[0], rtol=1e-5, atol=0):
        raise Reject(f"the LoRA term at '{view.name(add)}' is scaled by something other than c times one number")
    in_w, out_w = projection.shape
    rank = chain.a.shape[1] if chain.a.shape else 0
    if chain.a.shape is None or chain.b.shape != (rank, out_w) or chain.a.shape[0] != in_w:
        raise Reject(f"shapes do not line up at '{view.name(add)}'")
    check_rank(rank, projection.shape, view.name(add), found.max_rank_ratio)
    gemm = projection.gemm
    bias = bias_getter(view, projection)
    column = c.astype(np.float32)
    inner = [*chain.nodes, *base_nodes, *chain_nodes, node]
    out = escape(view, inner, {id(n) for n in (*inner, add)})
    if out is not None:
        where = f"node '{view.name(out[1])}'" if out[1] is not None else "a graph output"
        raise Reject(f"DoRA's intermediate '{view.value_name(view.output(out[0]))}' is also read by {where}")
    bias_add = [projection.bias_add] if projection.bias_add is not None else []
    return AdapterSite(
        site_id=f"dora{sum(s.family == NAME for s in found.sites)}",
        family=NAME,
        label=view.label(gemm.node, gemm.weight),
        input_name=view.value_name(gemm.x),
        output_name=view.value_name(view.output(add)),
        in_features=in_w,
        out_features=out_w,
        rank=rank,
        scale=float(s[0]),
        dtype=view.dtype(gemm.weight),
        has_bias=projection.bias is not None,
        nodes=[view.name(n) for n in [gemm.node, *bias_add, *inner, add]],
        weight=view.weight(gemm),
        lora_a=view.weight(chain.a),
        lora_b=view.weight(chain.b),
        bias=bias,
        column_scale=lambda c=column: c,
        binding=LoraBinding(add, gemm, base, chain.b, inner, branch=other),
    )


def detect(view: GraphView, found) -> None:
    """Every DoRA site of ``view`` into ``found``."""
    sites: list[AdapterSite] = []
    for add, operands in view.adds():
        if found.claimed(add):
            continue
        site, reason = either_order(lambda base, other, add=add: _match(view, add, base, other, found), operands)
        if site is not None:
            sites.append(site)
            found.sites.append(site)
            found.claim(add, site.binding.gemm.node, *site.binding.chain_nodes)
        elif reason:
            found.reject(Rejection(node=view.name(add), reason=reason, label=view.label(add)))
    number_groups(sites, "d")
