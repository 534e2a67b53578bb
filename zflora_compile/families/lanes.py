"""FFA, FBA and FFBA: adapter lanes written by one projection and read by others.

Pattern::

    z = t @ A                                  # A: constant [in, r]; the writer
    y = x @ W (+ bias) + s * (z @ B)           # B: constant [r, out]; a reader, x is not t

``z`` may fan out to several readers (FBA: gate and up; the next layer's q, k, v; the LM head).
A *host* carries A's columns: the first base projection ``t @ W_h`` with a constant weight that
reads ``t`` (FFA: q or gate; FBA: o or down); a reader may come before it in graph order (the
emitters restore a topological order). Fused (see :mod:`.widening`):
``t @ [W_h | A]`` is cut once into ``(t @ W_h, z)``; each reader becomes
``concat(x, z) @ [[W], [s B]]``: the adapter costs no GEMM of its own. ``strip`` drops the reads.

A read whose low-rank chain reads the projection's own input is LoRA's (:mod:`.lora`), one whose
lanes are a slice of a wider stream is zFLoRA's (:mod:`.zflora`).
"""

from __future__ import annotations

import dataclasses

from zflora_compile.families.lora import base_gemm
from zflora_compile.families.widening import WidenedSites, check_read, widening_problem
from zflora_compile.graph.protocol import Gemm, GraphView, NotACandidate, Projection, Reject, check_casts, check_rank, either_order, match_projection, matrix_shape
from zflora_compile.graph.records import LaneWrite, Rejection

NAME = "ffa/fba"


@dataclasses.dataclass
class _Read:
    add: object
    base_value: object
    projection: Projection
    a: Gemm
    b: Gemm
    scale: float


def _family_of(text: str) -> str:
    text = text.lower()
    return "ffa" if "ffa" in text else "fba" if "fba" in text else NAME


def match_lowrank(view: GraphView, value) -> tuple[Gemm, float, list, object]:
    """``s * ((s' * z) @ B)`` ending at ``value``: (B's GEMM, s * s', the nodes from B to the add, z
    up to casts). What sits between z and B may be shared by the lanes' readers (a cast of z): it
    stays as it is, computed from z, which the fused graph still provides."""
    reached, scale, nodes = view.walk_back(value)
    b = view.gemm(reached)
    if b is None or b.bias is not None or not view.is_constant(b.weight):
        raise NotACandidate
    nodes.append(b.node)
    z, between, _ = view.walk_back(b.operand)
    return b, scale * between, nodes, z


def _lowrank_b(view: GraphView, projection: Projection):
    """The GEMM computing ``projection``'s input when that projection is the B of a bottleneck pair
    ``(t @ A) @ W`` (narrower in the middle: an adapter's own GEMM, never a base projection; whatever
    the rank limit, which only decides whether an adapter is fused), else None."""
    value = projection.gemm.x
    for _ in range(3):  # through casts and constant scales of any shape
        node = view.producer(value)
        if node is None or view.gemm(value) is not None or view.data_input(node) is None:
            break
        value = view.data_input(node)
    inner = view.gemm(value)
    if inner is None or inner.shape is None or projection.shape is None or not view.is_constant(inner.weight):
        return None
    rank = projection.shape[0]
    return inner if inner.shape[1] == rank and rank < min(inner.shape[0], projection.shape[1]) else None


def _match_read(view: GraphView, add, base_value, lowrank_value, claimed) -> _Read:
    b, scale, nodes, z = match_lowrank(view, lowrank_value)
    a = view.gemm(z)
    if view.last_axis_slice(z) is not None or a is None or not view.is_constant(a.weight):
        raise NotACandidate
    base = base_gemm(view, base_value)
    if base is not None and view.peel(base.x) is view.peel(a.x):
        raise NotACandidate  # plain LoRA (the LoRA family's, with its own checks and reasons)
    projection = match_projection(view, base_value, one_bias=False)
    if view.peel(projection.gemm.x) is view.peel(a.x):
        raise NotACandidate
    if a.bias is not None:
        raise Reject(f"low-rank GEMM '{view.name(a.node)}' has a bias")
    inner = _lowrank_b(view, projection)
    if inner is not None:
        raise Reject(
            f"the lanes of A '{view.name(a.node)}' are added to '{view.name(projection.node)}', the B of the low-rank pair "
            f"'{view.name(inner.node)}' -> '{view.name(projection.node)}' (an adapter, not a base projection)"
        )
    if _changes_dtype(view, b.operand, z):
        raise Reject(f"a Cast sits between the lanes of A '{view.name(a.node)}' and B '{view.name(b.node)}': the widened GEMM would read the lanes in another dtype")
    check_casts(view, lowrank_value, b.out, view.dtype(projection.gemm.weight), "the low-rank output")
    x = projection.gemm.x
    lanes_dtype, x_dtype = view.value_dtype(a.out), view.value_dtype(x)
    if lanes_dtype and x_dtype and lanes_dtype != x_dtype:
        raise Reject(f"the lanes of A '{view.name(a.node)}' are {lanes_dtype} but projection '{view.name(projection.node)}' reads {x_dtype}: they cannot be read together")
    lanes_lead, x_lead = view.leading_shape(a.x), view.leading_shape(x)  # a GEMM keeps its input's leading axes
    if lanes_lead is not None and x_lead is not None and lanes_lead != x_lead:
        raise Reject(f"the lanes of A '{view.name(a.node)}' have leading axes {lanes_lead} but projection '{view.name(projection.node)}' reads {x_lead}: they cannot be read together")
    check_read(view, add, base_value, projection, nodes, claimed)
    return _Read(add, base_value, projection, a, b, scale)


def detect(view: GraphView, found) -> None:
    """Every FFA / FBA / FFBA read, grouped by the lanes it reads, with its host."""
    reads: list[_Read] = []
    for add, operands in view.adds():
        if found.claimed(add):
            continue
        read, reason = either_order(lambda base, low, add=add: _match_read(view, add, base, low, found.claimed), operands)
        if read is not None:
            reads.append(read)
        elif reason:
            found.reject(Rejection(node=view.name(add), reason=reason, label=view.label(add)))
    lanes: dict[int, list[_Read]] = {}
    for read in reads:
        lanes.setdefault(id(read.a.node), []).append(read)
    writers = set(lanes)
    order = view.order()
    hosted = []
    for group in lanes.values():
        try:
            hosts = _hosts(view, group, writers, order, found)
        except Reject as reject:
            _reject_group(view, group, str(reject), found)
            continue
        if hosts:
            hosted.append((group, hosts))
    for group, host in _without_cycles(view, hosted, found):
        _widen(view, group, host, found.widened)
        found.claim(*(read.add for read in group))


def _changes_dtype(view: GraphView, top, bottom) -> bool:
    """Whether any value on the pass-through path from ``top`` down to ``bottom`` has another dtype."""
    want, value = view.value_dtype(bottom), top
    while value is not None and value is not bottom:
        have = view.value_dtype(value)
        if want is None or have is None or have != want:
            return True
        producer = view.producer(value)
        value = view.data_input(producer) if producer is not None else None
    return value is None


def _reject_group(view: GraphView, group: list[_Read], reason: str, found) -> None:
    for read in group:
        found.reject(Rejection(node=view.name(read.add), reason=reason, label=view.label(read.add)))


def _without_cycles(view: GraphView, hosted: list, found) -> list:
    """(group, host) for the lane groups whose widening keeps the graph acyclic. Widened, a reader
    depends on its lanes' host; a host reachable from one of its group's readers (through the graph
    and the other groups' new dependencies) would depend on its own output: the next candidate
    host is tried, and a group with none left is refused. Widened, A's output is a split of its
    host, so everything reading the lanes (a read left unfused too) depends on the host."""
    kept = [(group, list(hosts)) for group, hosts in hosted]
    while True:
        extra: dict[int, list] = {}
        for group, hosts in kept:
            extra.setdefault(id(hosts[0].node), []).append(group[0].a.node)
            for read in group:
                extra.setdefault(id(hosts[0].node), []).append(read.projection.node)
                extra.setdefault(id(group[0].a.node), []).append(read.projection.node)
        bad = next(((g, hs, r) for g, hs in kept for r in g if _reaches(view, r.projection.node, hs[0].node, extra)), None)
        if bad is None:
            return [(group, hosts[0]) for group, hosts in kept]
        group, hosts, read = bad
        host = hosts.pop(0)
        if hosts:
            continue
        kept = [(g, hs) for g, hs in kept if g is not group]
        _reject_group(view, group, (
            f"projection '{view.name(host.node)}' cannot carry the lanes of A '{view.name(group[0].a.node)}': it depends on "
            f"the output of their reader '{view.name(read.projection.node)}', so the widened graph would have a cycle"
        ), found)


def _reaches(view: GraphView, start, target, extra: dict) -> bool:
    seen, frontier = {id(start)}, [start]
    while frontier:
        node = frontier.pop()
        for nxt in [*view.successors(node), *extra.get(id(node), [])]:
            if nxt is target:
                return True
            if id(nxt) not in seen:
                seen.add(id(nxt))
                frontier.append(nxt)
    return False


def _hosts(view: GraphView, group: list[_Read], writers: set[int], order: dict, found) -> list[Gemm]:
    """The projections that could carry A's columns, in graph order, after the checks every read of
    the lanes needs (none: the reads are reported)."""
    a = group[0].a
    t = a.x
    in_a, rank = matrix_shape(view, a, "A")
    candidates = [
        g
        for g in view.gemm_readers(t)
        if id(g.node) not in writers and not found.claimed(g.node) and g.shape is not None and view.is_constant(g.weight) and g.shape[0] == in_a
    ]
    unfit = {id(g.node): _unfit_host(view, g, a) for g in candidates}
    hosts = [g for g in candidates if unfit[id(g.node)] is None]
    if candidates and not hosts:
        raise Reject(f"no projection reading '{view.value_name(t)}' can carry the columns of A '{view.name(a.node)}': {unfit[id(candidates[0].node)]}")
    if not hosts:
        for read in group:
            found.reject(Rejection(node=view.name(read.add), label=view.label(read.add), reason=(
                f"low-rank chain reads '{view.value_name(t)}' but the projection '{view.name(read.projection.node)}' it is added to "
                f"reads '{view.value_name(view.peel(read.projection.gemm.x))}'; as an FFA/FBA lane it needs a base projection with "
                f"a constant weight reading '{view.value_name(t)}' to carry A's columns (input of A '{view.name(a.node)}'), and no base "
                f"projection with a constant weight reads '{view.value_name(t)}'"
            )))
        return []
    hosts.sort(key=lambda g: order[id(g.node)])
    check_rank(rank, hosts[0].shape, view.name(a.node), found.max_rank_ratio)
    for read in group:
        rank_b, out_b = matrix_shape(view, read.b, "B")
        in_w, out_w = read.projection.shape
        if (rank_b, out_b) != (rank, out_w):
            raise Reject(f"shapes do not line up at '{view.name(read.add)}': W [{in_w}, {out_w}], A [{in_a}, {rank}], B [{rank_b}, {out_b}]")
        check_rank(rank, (in_w, out_w), view.name(read.add), found.max_rank_ratio)
    return hosts


def _unfit_host(view: GraphView, gemm: Gemm, a: Gemm) -> str | None:
    """Why ``gemm`` cannot carry A's columns, or None."""
    reads, a_reads = view.value_dtype(gemm.x), view.value_dtype(a.x)
    if view.dtype(gemm.weight) != view.dtype(a.weight) or (reads and a_reads and reads != a_reads):
        return f"projection '{view.name(gemm.node)}' is {view.dtype(gemm.weight)} reading {view.value_dtype(gemm.x)}, A is {view.dtype(a.weight)} reading {view.value_dtype(a.x)}"
    return widening_problem(view, gemm)


def _widen(view: GraphView, group: list[_Read], host: Gemm, widened: WidenedSites) -> None:
    a = group[0].a
    rank = a.shape[1]
    family = _family_of(view.label(a.node, a.weight) + " " + view.name(a.node))
    lane = view.name(a.node)
    host_site = widened.projection(host, family)
    host_site.writes.append(LaneWrite(lane, rank, view.weight(a)))
    host_site.binding.lanes_out.append(a.out)
    host_site.nodes.append(view.name(a.node))
    for read in group:
        site = widened.projection(read.projection.gemm, family)
        widened.add_read(site, read.add, read.base_value, read.b, read.scale, lane, rank, z=a.out)
