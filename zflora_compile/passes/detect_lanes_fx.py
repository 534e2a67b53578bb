"""FFA / FBA / FFBA / zFLoRA in torch.fx graphs: the FX twin of :mod:`.detect_lanes`.

Same patterns, same :class:`~zflora_compile.graph.records.WidenedSite` records, same planner; only the
graph vocabulary differs. Projections are ``aten.linear`` (before ``run_decompositions``) or
``mm``/``addmm`` between leading-axis views (after); the zFLoRA stream is cut with
``aten.slice.Tensor`` on the last axis, its lanes appended with ``aten.cat`` or
``aten.constant_pad_nd``; the embedding is ``aten.embedding``. See :mod:`.detect_lanes` for the
algebra and the rules; anything that fails a check is reported and left as it is.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import Node

from zflora_compile.passes.detect_fx import _gemm as _plain_gemm
from zflora_compile.passes.detect_fx import (
    FxConstants,
    match_base_projection,
    _Gemm,
    _label_of,
    _matrix,
    _NotACandidate,
    _Reject,
    _single_use,
    _to_numpy,
    _val,
    _walk_back,
    op_name,
    peel,
    real_users,
    torch_dtype_name,
)
from zflora_compile.passes.detect_lanes import (
    STREAM_LANE,
    LaneDetection,
    _family_of,
    check_complementary,
    check_rank,
    last_axis_bounds,
    match_either_order,
    merged_family,
)
from zflora_compile.graph.records import AdapterSite, LaneRead, LaneWrite, Rejection, WidenedSite

_VIEWS = {"view", "reshape", "_unsafe_view"}
_BIG = 2**62
_GEMM_OPS = ("linear", "mm", "addmm", "matmul", "bmm")


def _through_broadcast(node):
    """Up through ``view``/``expand`` that keep the last axis (how ``matmul`` decomposes to ``bmm``)."""
    while isinstance(node, Node) and op_name(node) in (*_VIEWS, "expand") and _last_dim(node) == _last_dim(node.args[0]):
        node = node.args[0]
    return node


def _gemm(node) -> _Gemm | None:
    """A GEMM with its N-D input; also ``bmm(view(expand(x)), view(expand(W)))``, the decomposed
    form of ``linear`` on a non-contiguous input (e.g. a zFLoRA slice)."""
    if isinstance(node, Node) and op_name(node) == "bmm":
        weight = _through_broadcast(node.args[1])
        val = _val(weight)
        if val is None or val.dim() != 2:
            return None
        return _Gemm(node, "bmm", _through_broadcast(node.args[0]), weight, 1, None)
    return _plain_gemm(node)


@dataclasses.dataclass
class FxWidenBinding:
    """What the FX rewriter needs to apply a widened projection."""

    node: Node  # the base GEMM (linear / mm / addmm) or the embedding
    kind: str  # linear | mm | addmm | matmul | bmm | embedding
    x: Node  # its N-D input (embedding: the token ids)
    output: Node  # its N-D output (the GEMM's own bias included)
    base_output: Node  # after an explicit bias add, if any
    bias: Node | None  # the GEMM's own bias operand (linear's third argument, addmm's first)
    bias_value: object = None  # a getter of that bias (the fused GEMM adds it padded with zero lanes)
    stream: Node | None = None
    replaced: Node | None = None
    lanes_in: list[Node] = dataclasses.field(default_factory=list)  # N-D lanes read (cross families)
    lanes_out: list[Node] = dataclasses.field(default_factory=list)  # N-D lanes written (the A GEMMs' outputs)
    read_adds: list[Node] = dataclasses.field(default_factory=list)
    read_bases: list[Node] = dataclasses.field(default_factory=list)  # each add's base operand (after its bias add)
    b_nodes: list[tuple[Node, int]] = dataclasses.field(default_factory=list)  # (B GEMM, weight operand index)


def nd_output(node: Node) -> Node:
    """The GEMM's result with its leading axes restored (the view after ``mm``, if any)."""
    while True:
        users = real_users(node)
        if len(users) == 1 and op_name(users[0]) in _VIEWS and _last_dim(users[0]) == _last_dim(node):
            node = users[0]
            continue
        return node


def _last_dim(node) -> int | None:
    val = _val(node)
    if val is None or val.dim() == 0 or not isinstance(val.shape[-1], int):
        return None
    return int(val.shape[-1])


def _slice_of_last_axis(node) -> tuple[Node, int, int] | None:
    """``(data, start, end)`` of a step-1 ``aten.slice`` on the last axis (end clipped to the width)."""
    if not isinstance(node, Node) or op_name(node) != "slice":
        return None
    args = list(node.args) + [None] * (5 - len(node.args))
    data, dim, start, end, step = args[:5]
    dim = node.kwargs.get("dim", 0 if dim is None else dim)
    start = node.kwargs.get("start", 0 if start is None else start)
    end = node.kwargs.get("end", _BIG if end is None else end)
    step = node.kwargs.get("step", 1 if step is None else step)
    val, width = _val(data), _last_dim(data)
    if val is None or width is None or not all(isinstance(v, int) for v in (dim, start, end, step)):
        return None
    if dim not in (-1, val.dim() - 1) or step != 1:
        return None
    return (data, *last_axis_bounds(start, end, width))


@dataclasses.dataclass
class _Projection:
    gemm: _Gemm
    x: Node  # N-D input
    output: Node  # N-D output of the GEMM
    base_output: Node  # after the explicit bias add
    weight_shape: tuple[int, int]  # [in, out]


def _match_projection(value, constants: FxConstants) -> _Projection:
    """``x @ W (+ bias)`` producing ``value``; raises _Reject."""
    if not isinstance(value, Node):
        raise _Reject("low-rank chain is added to a constant, not to a projection")
    gemm = match_base_projection(value, constants, gemm_of=_gemm, one_bias=False).gemm
    shape = _matrix(constants, gemm.weight, gemm.transposed, "weight", gemm.node)
    return _Projection(gemm, peel(gemm.x, casts=False), nd_output(gemm.node), value if value is not gemm.node else nd_output(gemm.node), shape)


@dataclasses.dataclass
class _Read:
    add: Node
    projection: _Projection
    b: _Gemm
    scale: float
    rank: int
    a: _Gemm | None = None  # cross lanes: the GEMM applying A
    stream: Node | None = None  # zFLoRA: the d+r tensor


def _match_read(add: Node, base_value, lowrank_value, constants: FxConstants, lora_bases: set[int]) -> _Read:
    nodes: list[Node] = []
    reached, scale = _walk_back(lowrank_value, constants, nodes)
    b = _gemm(reached)
    if b is None or b.bias is not None or not constants.is_constant(b.weight):
        raise _NotACandidate
    rank, _ = _matrix(constants, b.weight, b.transposed, "B", b.node)
    z = peel(b.x)  # the adapter may run in its own dtype: casts around it are part of the chain
    high = _slice_of_last_axis(z)
    if high is not None:
        stream, start, end = high
        if start == 0 or end != _last_dim(stream):
            raise _NotACandidate
        try:
            projection = _match_projection(base_value, constants)
        except _Reject:
            raise _NotACandidate from None  # e.g. the lanes of an already fused LoRA group
        check_complementary(
            _slice_of_last_axis(projection.x),  # no cast between: the GEMM will read the stream itself
            _slice_of_last_axis(peel(projection.x)),
            stream,
            start,
            projection=projection.gemm.node.name,
            lanes=z.name,
            add=add.name,
        )
        read = _Read(add, projection, b, scale, rank, stream=stream)
    else:
        a = _gemm(z)
        if a is None or not constants.is_constant(a.weight):
            raise _NotACandidate
        base_gemm = _gemm(peel(base_value, casts=False))
        if base_gemm is not None and peel(base_gemm.x) is peel(a.x):
            raise _NotACandidate  # plain LoRA (the LoRA detector's, with its own checks and reasons)
        projection = _match_projection(base_value, constants)
        if peel(projection.gemm.x) is peel(a.x):
            raise _NotACandidate
        if a.bias is not None:
            raise _Reject(f"low-rank GEMM '{a.node.name}' has a bias")
        read = _Read(add, projection, b, scale, rank, a=a)
    if id(projection.gemm.node) in lora_bases:
        raise _Reject(f"projection '{projection.gemm.node.name}' also carries a LoRA adapter")
    if read.projection.weight_shape[1] != _matrix(constants, b.weight, b.transposed, "B", b.node)[1]:
        raise _Reject(f"shapes do not line up at '{add.name}': W {list(projection.weight_shape)}, B [{rank}, {_matrix(constants, b.weight, b.transposed, 'B', b.node)[1]}]")
    for i, node in enumerate(nodes):
        _single_use(node, nodes[i - 1] if i else add, "low-rank intermediate")
    _single_use(projection.base_output, add, "base projection output")
    if projection.output is not projection.base_output and len(real_users(projection.output)) != 1:
        raise _Reject(f"base projection output '{projection.output.name}' is also used by node '{real_users(projection.output)[-1].name}'")
    return read


class _Builder:
    def __init__(self, constants: FxConstants):
        self.constants = constants
        self.sites: dict[int, WidenedSite] = {}

    def site(self, gemm_node: Node, kind: str, weight: Node, transposed: bool, x: Node, output: Node, base_output: Node, bias, family: str) -> WidenedSite:
        key = id(gemm_node)
        if key not in self.sites:
            in_f, out_f = _matrix(self.constants, weight, transposed, "weight", gemm_node)
            _, dtype = self.constants.shape_dtype(weight)
            label = _label_of(gemm_node)
            for suffix in (".base_layer",):
                label = label.removesuffix(suffix)
            self.sites[key] = WidenedSite(
                site_id="",
                family=family,
                label=label or gemm_node.name,
                input_name=x.name,
                output_name=base_output.name,
                in_features=in_f,
                out_features=out_f,
                dtype=torch_dtype_name(dtype),
                nodes=[gemm_node.name],
                weight=_to_numpy(self.constants.getter(weight), transposed),
                kind="embedding" if kind == "embedding" else "projection",
                binding=FxWidenBinding(
                    node=gemm_node, kind=kind, x=x, output=output, base_output=base_output, bias=bias,
                    bias_value=self.constants.getter(bias) if isinstance(bias, Node) else None,
                ),
            )
        site = self.sites[key]
        site.family = merged_family(site.family, family)
        return site

    def projection_site(self, projection: _Projection, family: str) -> WidenedSite:
        g = projection.gemm
        return self.site(g.node, g.kind, g.weight, g.transposed, projection.x, projection.output, projection.base_output, g.bias, family)

    def add_read(self, site: WidenedSite, read: _Read, lane: str) -> None:
        site.reads.append(LaneRead(lane, read.rank, read.scale, _to_numpy(self.constants.getter(read.b.weight), read.b.transposed)))
        binding: FxWidenBinding = site.binding
        binding.read_adds.append(read.add)
        binding.read_bases.append(read.projection.base_output)
        binding.b_nodes.append((read.b.node, read.b.weight_index))
        site.nodes += [read.b.node.name, read.add.name]
        if read.stream is not None:
            binding.stream = read.stream
        else:
            binding.lanes_in.append(nd_output(read.a.node))


def detect_lanes_fx(gm: torch.fx.GraphModule, constants: FxConstants, lora_sites: list[AdapterSite], *, max_rank_ratio: float) -> LaneDetection:
    """Every FFA / FBA / FFBA / zFLoRA site in ``gm.graph``."""
    lora_bases = {id(s.binding.base) for s in lora_sites} | {id(n) for s in lora_sites for n in s.binding.chain_nodes}
    lora_adds = {id(s.binding.add) for s in lora_sites}
    rejections: list[Rejection] = []
    claimed: set[str] = set()
    reads: list[_Read] = []
    for node in gm.graph.nodes:
        if op_name(node) != "add" or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1 or id(node) in lora_adds:
            continue
        read, reason = match_either_order(lambda base, low, n=node: _match_read(n, base, low, constants, lora_bases), node.args)
        if read is not None:
            reads.append(read)
        elif reason:
            rejections.append(Rejection(node=node.name, reason=reason, label=_label_of(node)))
    builder = _Builder(constants)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    _build_cross(gm, [r for r in reads if r.a is not None], builder, rejections, claimed, lora_bases, max_rank_ratio, order)
    _build_zflora(gm, [r for r in reads if r.stream is not None], builder, rejections, claimed, lora_bases, max_rank_ratio)
    sites = sorted(builder.sites.values(), key=lambda s: order[s.binding.node])
    for number, site in enumerate(sites):
        site.site_id = f"{site.family.replace('/', '_')}{number}"
    return LaneDetection(sites, rejections, claimed)


def _build_cross(gm, reads: list[_Read], builder: _Builder, rejections, claimed, lora_bases, max_rank_ratio, order) -> None:
    constants = builder.constants
    lanes: dict[int, list[_Read]] = {}
    for read in reads:
        lanes.setdefault(id(read.a.node), []).append(read)
    writers = {id(group[0].a.node) for group in lanes.values()}
    for group in lanes.values():
        a = group[0].a
        t = peel(a.x)
        try:
            in_a, rank = _matrix(constants, a.weight, a.transposed, "A", a.node)
            hosts = []
            for user in gm.graph.nodes:
                gemm = _gemm(user) if op_name(user) in _GEMM_OPS else None
                if gemm is None or id(user) in writers or id(user) in lora_bases or peel(gemm.x) is not t:
                    continue
                if constants.is_constant(gemm.weight) and _matrix(constants, gemm.weight, gemm.transposed, "weight", user)[0] == in_a:
                    hosts.append(gemm)
            if not hosts:
                for read in group:
                    rejections.append(Rejection(node=read.add.name, label=_label_of(read.add), reason=(
                        f"low-rank chain reads '{t.name}' but the projection '{read.projection.gemm.node.name}' it is added to "
                        f"reads '{peel(read.projection.gemm.x).name}'; as an FFA/FBA lane it needs a base projection with a "
                        f"constant weight reading '{t.name}' to carry A's columns (input of A '{a.node.name}'), and there is none"
                    )))
                continue
            host = min(hosts, key=lambda g: order[g.node])
            if any(order[r.projection.gemm.node] < order[host.node] for r in group):
                raise _Reject(f"the lanes of A '{a.node.name}' are read before projection '{host.node.name}', the one that could carry A's columns")
            check_rank(rank, _matrix(constants, host.weight, host.transposed, "weight", host.node), a.node.name, max_rank_ratio)
            for read in group:
                if read.rank != rank:
                    raise _Reject(f"shapes do not line up at '{read.add.name}': A [{in_a}, {rank}], B has {read.rank} rows")
                check_rank(rank, read.projection.weight_shape, read.add.name, max_rank_ratio)
        except _Reject as reject:
            rejections.extend(Rejection(node=r.add.name, reason=str(reject), label=_label_of(r.add)) for r in group)
            continue
        family = _family_of(_label_of(a.node) + " " + a.node.name)
        host_projection = _Projection(host, peel(host.x, casts=False), nd_output(host.node), nd_output(host.node), (0, 0))
        host_site = builder.projection_site(host_projection, family)
        host_site.writes.append(LaneWrite(a.node.name, rank, _to_numpy(constants.getter(a.weight), a.transposed)))
        host_site.binding.lanes_out.append(nd_output(a.node))
        host_site.nodes.append(a.node.name)
        for read in group:
            builder.add_read(builder.projection_site(read.projection, family), read, a.node.name)
            claimed.add(read.add.name)


def _build_zflora(gm, reads: list[_Read], builder: _Builder, rejections, claimed, lora_bases, max_rank_ratio) -> None:
    ranks: set[int] = set()
    read_nodes: set[int] = set()
    for read in reads:
        try:
            in_w, out_w = read.projection.weight_shape
            if _last_dim(read.stream) != in_w + read.rank:
                raise _Reject(f"shapes do not line up at '{read.add.name}': stream '{read.stream.name}' has {_last_dim(read.stream)} lanes, W [{in_w}, {out_w}], B [{read.rank}, ..]")
            check_rank(read.rank, (in_w, out_w), read.add.name, max_rank_ratio)
        except _Reject as reject:
            rejections.append(Rejection(node=read.add.name, reason=str(reject), label=_label_of(read.add)))
            continue
        builder.add_read(builder.projection_site(read.projection, "zflora"), read, STREAM_LANE)
        claimed.add(read.add.name)
        ranks.add(read.rank)
        read_nodes.add(id(read.projection.gemm.node))
    if not ranks:
        return
    for node in list(gm.graph.nodes):
        try:
            gemm = _gemm(node) if op_name(node) in _GEMM_OPS else None
            if gemm is not None and id(node) not in read_nodes and id(node) not in lora_bases:
                _zflora_cut(gemm, ranks, builder)
            elif op_name(node) in ("cat", "constant_pad_nd", "pad") and _zflora_write(node, ranks, builder, lora_bases):
                claimed.add(node.name)
        except _Reject as reject:
            rejections.append(Rejection(node=node.name, reason=str(reject), label=_label_of(node)))


def _zflora_cut(gemm: _Gemm, ranks: set[int], builder: _Builder) -> None:
    """``a[.., :d] @ W`` with ``a`` a d+r stream: the projection reads ``a`` through zero rows."""
    constants = builder.constants
    low = _slice_of_last_axis(peel(gemm.x, casts=False))
    if low is None or not constants.is_constant(gemm.weight):
        return
    stream, start, end = low
    in_w, _ = _matrix(constants, gemm.weight, gemm.transposed, "weight", gemm.node)
    rank = (_last_dim(stream) or 0) - end
    if start != 0 or end != in_w or rank not in ranks:
        return
    out = nd_output(gemm.node)
    site = builder.site(gemm.node, gemm.kind, gemm.weight, gemm.transposed, peel(gemm.x, casts=False), out, out, gemm.bias, "zflora")
    site.reads.append(LaneRead(STREAM_LANE, rank, 1.0, None))
    site.binding.stream = stream


def _pad_amount(node: Node) -> int | None:
    pads = node.args[1] if len(node.args) > 1 else None
    value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
    if op_name(node) == "pad":
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
        if mode != "constant":
            return None
    if not isinstance(pads, (list, tuple)) or len(pads) != 2 or pads[0] != 0 or value not in (None, 0, 0.0):
        return None
    return pads[1] if isinstance(pads[1], int) else None


def _zflora_write(node: Node, ranks: set[int], builder: _Builder, lora_bases) -> bool:
    constants = builder.constants
    if op_name(node) in ("constant_pad_nd", "pad"):
        rank = _pad_amount(node)
        if rank is None or rank not in ranks:
            return False
        base_value, lane_value = node.args[0], None
    else:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        val = _val(node)
        if len(tensors) != 2 or val is None or dim not in (-1, val.dim() - 1):
            return False
        base_value, lane_value = tensors
        rank = _last_dim(lane_value)
        if rank not in ranks:
            return False
    base = peel(base_value, casts=False)
    if op_name(base) == "embedding":  # the token embedding: embedding(E, ids)
        table, ids = base.args[0], base.args[1]
        if not constants.is_constant(table):
            return False
        lane_table = None
        if lane_value is not None:
            lanes = peel(lane_value)
            if op_name(lanes) != "embedding" or lanes.args[1] is not ids or not constants.is_constant(lanes.args[0]):
                raise _Reject(f"the lanes concatenated at '{node.name}' are not a table lookup of the same token ids")
            lane_table = lanes.args[0]
        site = builder.site(base, "embedding", table, False, ids, base, base, None, "zflora")
        site.writes.append(LaneWrite(STREAM_LANE, rank, _to_numpy(constants.getter(lane_table), False) if lane_table is not None else None))
    else:
        gemm = _gemm(base)
        if gemm is None or id(base) in lora_bases or not constants.is_constant(gemm.weight):
            return False
        lane_a = None
        if lane_value is not None:
            lanes = _gemm(peel(lane_value))
            if lanes is None or peel(lanes.x) is not peel(gemm.x) or not constants.is_constant(lanes.weight) or lanes.bias is not None:
                raise _Reject(f"the lanes concatenated at '{node.name}' are not a GEMM of the same input as projection '{base.name}'")
            lane_a = lanes
        x = peel(gemm.x, casts=False)
        out = nd_output(gemm.node)
        site = builder.site(gemm.node, gemm.kind, gemm.weight, gemm.transposed, x, out, out, gemm.bias, "zflora")
        getter = _to_numpy(constants.getter(lane_a.weight), lane_a.transposed) if lane_a is not None else None
        site.writes.append(LaneWrite(STREAM_LANE, rank, getter))
        if lane_a is not None:
            site.nodes.append(lane_a.node.name)
    site.binding.replaced = node
    site.nodes.append(node.name)
    return True
