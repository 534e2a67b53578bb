"""zFLoRA: the residual stream ``a`` is ``d + r`` wide; its last ``r`` lanes are the adapter's.

Pattern::

    y = a[.., :d] @ W + s * (a[.., d:] @ B)    # entry projections and the LM head (read)
    y = a[.., :d] @ W                          # entry projection of a block without adapter (cut)
    o' = concat(o @ W, o @ A) | pad(o @ W, r)  # exit projections (write)
    e' = concat(E[ids], E_z[ids]) | pad(E[ids], r)   # the embedding (write)

Cuts and writes are only looked for once a read has shown the rank ``r``. Fused (see
:mod:`.widening`): ``a @ [[W], [s B or 0]]``, ``o @ [W | A or 0]``, ``[E | E_z or 0][ids]``: no
slice, pad or concat is left, and no GEMM is added. There is no ``strip``: the widened residual
stream and its rescaled norms are part of the adapted model.
"""

from __future__ import annotations

from zflora_compile.families.lanes import match_lowrank
from zflora_compile.families.widening import STREAM_LANE, WidenedSites, check_read, widening_problem
from zflora_compile.graph.protocol import GraphView, NotACandidate, Reject, check_rank, either_order, match_projection, matrix_shape, single_use
from zflora_compile.graph.records import LaneRead, LaneWrite, Rejection

NAME = "zflora"


def check_complementary(view: GraphView, x, stream, start: int, *, projection: str, lanes: str, add: str) -> None:
    """A read ``a[..., :d] @ W + s * a[..., d:] @ B``: the projection must read ``a[..., 0:start)`` of
    the same stream, with nothing between (no cast: the widened GEMM reads the stream itself)."""
    low, through = view.last_axis_slice(x), view.last_axis_slice(view.peel(x))
    if low is None and through is not None and through[0] is stream:
        raise Reject(
            f"projection '{projection}' reads the base lanes of '{view.value_name(stream)}' through a Cast: "
            "the widened GEMM would read the stream itself, in another dtype; not widened"
        )
    if low is None or low[0] is not stream:
        raise NotACandidate
    if low[1] != 0 or low[2] != start:
        raise Reject(
            f"the lanes '{lanes}' read at '{add}' are a slice of '{view.value_name(stream)}', but projection "
            f"'{projection}' does not read the complementary slice [0, {start}) of the same tensor"
        )


def _match_read(view: GraphView, add, base_value, lowrank_value, found):
    b, scale, nodes, z = match_lowrank(view, lowrank_value)
    high = view.last_axis_slice(z)
    if high is None:
        raise NotACandidate
    stream, start, end = high
    if start == 0 or end != view.last_dim(stream):
        raise NotACandidate  # not the lanes at the end of the stream (a base slice, a bias add...)
    try:
        projection = match_projection(view, base_value, one_bias=False)
    except Reject:
        raise NotACandidate from None  # not a projection reading the same stream
    gemm = projection.gemm
    check_complementary(view, gemm.x, stream, start, projection=view.name(gemm.node), lanes=view.value_name(z), add=view.name(add))
    check_read(view, add, base_value, projection, nodes, found.claimed)
    conflict = found.widened.conflict(projection.node, NAME)
    if conflict:
        raise Reject(conflict)
    rank, out_b = matrix_shape(view, b, "B")
    in_w, out_w = projection.shape
    if out_b != out_w or view.last_dim(stream) != in_w + rank:
        raise Reject(f"shapes do not line up at '{view.name(add)}': stream '{view.value_name(stream)}' {view.last_dim(stream)} lanes, W [{in_w}, {out_w}], B [{rank}, {out_b}]")
    check_rank(rank, (in_w, out_w), view.name(add), found.max_rank_ratio)
    return base_value, projection, b, scale, stream, rank


def detect(view: GraphView, found) -> None:
    """zFLoRA reads, then (for the ranks they show) cuts and writes."""
    ranks: set[int] = set()
    readers: set[int] = set()
    widened: WidenedSites = found.widened
    for add, operands in view.adds():
        if found.claimed(add):
            continue
        read, reason = either_order(lambda base, low, add=add: _match_read(view, add, base, low, found), operands)
        if read is None:
            if reason:
                found.reject(Rejection(node=view.name(add), reason=reason, label=view.label(add)))
            continue
        base_value, projection, b, scale, stream, rank = read
        widened.add_read(widened.projection(projection.gemm, NAME), add, base_value, b, scale, STREAM_LANE, rank, stream=stream)
        found.claim(add)
        ranks.add(rank)
        readers.add(id(projection.node))
    if not ranks:
        return
    for node in view.nodes():
        try:
            gemm = view.gemm(view.output(node))
        except Reject:
            continue  # a GEMM no family can rewrite (e.g. Gemm with transA): not a cut
        try:
            if gemm is not None:
                if id(node) not in readers and not found.claimed(node):
                    _cut(view, gemm, ranks, widened)
            elif _write(view, node, ranks, widened, found):
                found.claim(node)
        except Reject as reject:
            found.reject(Rejection(node=view.name(node), reason=str(reject), label=view.label(node)))


def _cut(view: GraphView, gemm, ranks: set[int], widened: WidenedSites) -> None:
    """``a[.., :d] @ W`` with ``a`` a d+r stream: the projection reads ``a`` through zero rows."""
    low = view.last_axis_slice(gemm.x)
    if low is None or gemm.shape is None or not view.is_constant(gemm.weight):
        return
    stream, start, end = low
    rank = (view.last_dim(stream) or 0) - end
    if start != 0 or end != gemm.shape[0] or rank not in ranks:
        return
    problem = widening_problem(view, gemm) or widened.conflict(gemm.node, NAME)
    if problem:
        raise Reject(problem)
    site = widened.projection(gemm, NAME)
    site.reads.append(LaneRead(STREAM_LANE, rank, 1.0, None))
    site.binding.stream = stream


def _write(view: GraphView, node, ranks: set[int], widened: WidenedSites, found) -> bool:
    """Exit projections and the embedding that append the r lanes to the stream."""
    padded = view.last_axis_pad(node)
    if padded is not None:
        (base_value, rank), lane_value = padded, None
    else:
        parts = view.last_axis_concat(node)
        if parts is None or len(parts) != 2 or view.producer(parts[1]) is None:
            return False
        base_value, lane_value = parts
        rank = view.last_dim(lane_value)
    if rank not in ranks:
        return False
    base = view.peel(base_value, casts=False)
    lookup = view.embedding(base)
    if lookup is not None:
        table, ids, lookup_node = lookup
        if not view.is_constant(table) or len(view.constant_shape(table)) != 2:
            return False
        lane_table = None
        if lane_value is not None:
            lanes = view.embedding(view.peel(lane_value))
            if lanes is None or lanes[1] is not ids or not view.is_constant(lanes[0]):
                raise Reject(f"the lanes concatenated at '{view.name(node)}' are not a table lookup of the same token ids")
            single_use(view, lane_value, node, "lane lookup output")
            lane_table = lanes[0]
        single_use(view, base_value, node, "embedding output")
        site = widened.embedding(lookup_node, table, ids, NAME)
        site.writes.append(LaneWrite(STREAM_LANE, rank, view.constant_array(lane_table) if lane_table is not None else None))
    else:
        gemm = view.gemm(base)
        if gemm is None or found.claimed(gemm.node) or gemm.shape is None or not view.is_constant(gemm.weight):
            return False
        lane_gemm = None
        if lane_value is not None:
            lane_gemm = view.gemm(view.peel(lane_value))
            if lane_gemm is None or view.peel(lane_gemm.x) is not view.peel(gemm.x) or not view.is_constant(lane_gemm.weight) or lane_gemm.bias is not None:
                raise Reject(f"the lanes concatenated at '{view.name(node)}' are not a GEMM of the same input as projection '{view.name(gemm.node)}'")
            single_use(view, lane_value, node, "lane GEMM output")
        single_use(view, base_value, node, "base projection output")
        problem = widening_problem(view, gemm) or widened.conflict(gemm.node, NAME)
        if problem:
            raise Reject(problem)
        site = widened.projection(gemm, NAME)
        site.writes.append(LaneWrite(STREAM_LANE, rank, view.weight(lane_gemm) if lane_gemm is not None else None))
        if lane_gemm is not None:
            site.nodes.append(view.name(lane_gemm.node))
    site.binding.replaced = view.output(node)
    site.nodes.append(view.name(node))
    return True
