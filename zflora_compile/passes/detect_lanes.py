"""Structural detection of the lane families in ONNX graphs: FFA, FBA, FFBA and zFLoRA.

These adapters move a rank-``r`` activation (its *lanes*) from one projection to another.
Detection yields one :class:`~zflora_compile.graph.records.WidenedSite` per base projection that
reads or writes lanes; the planner widens its weight (see :mod:`.planner`).

Cross lanes (FFA, FBA, FFBA)::

    z = t @ A                                  # A: constant [in, r]; the writer
    y = x @ W (+ bias) + s * (z @ B)           # B: constant [r, out]; a reader, x is not t

  ``z`` may fan out to several readers (FBA: gate and up; the next layer's q, k, v; the LM head).
  A *host* carries A's columns: a base projection ``t @ W_h`` with a constant weight (FFA: q or
  gate; FBA: o or down). Fused: ``t @ [W_h | A]`` is cut once into ``(t @ W_h, z)``; each reader
  becomes ``concat(x, z) @ [[W], [s B]]`` (one Concat shared by the readers of ``x``).

zFLoRA (the residual stream ``a`` is ``d + r`` wide)::

    y = a[.., :d] @ W + s * (a[.., d:] @ B)    # entry projections and the LM head (read)
    y = a[.., :d] @ W                          # entry projection of a block without adapter
    o' = concat(o @ W, o @ A) | pad(o @ W, r)  # exit projections (write)
    e' = concat(E[ids], E_z[ids]) | pad(E[ids], r)   # the embedding

  Fused: ``a @ [[W], [s B or 0]]``, ``o @ [W | A or 0]``, ``[E | E_z or 0][ids]``: no Slice, Pad
  or Concat is left, and no GEMM is added.

Anything that looks like one of these but fails a check is reported with the reason and left as
it is. Names are only labels.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from zflora_compile.passes.detect_onnx import (
    Detection,
    _gemm_operands,
    _is_gemm,
    _label,
    _match_projection,
    _matrix_shape,
    _node_label,
    _NotACandidate,
    _oriented,
    _peel_pass_through,
    _Projection,
    _Reject,
    _single_use,
    _walk_back,
)
from zflora_compile.passes.onnx_constants import constant_dtype, constant_getter, constant_shape, is_constant
from zflora_compile.graph.records import AdapterSite, LaneRead, LaneWrite, Rejection, WidenedSite

_INT64_MAX = np.iinfo(np.int64).max
STREAM_LANE = "zflora.stream"


@dataclasses.dataclass
class OnnxWidenBinding:
    """What the ONNX rewriter needs to apply a widened projection."""

    node: ir.Node  # the base MatMul (or the embedding Gather)
    x: ir.Value  # its data input (Gather: the token ids)
    base_output: ir.Value  # its result after the bias Add, if any
    stream: ir.Value | None = None  # zFLoRA entry: the d+r tensor read whole instead of its slice
    replaced: ir.Value | None = None  # zFLoRA exit / embedding: the Concat or Pad output produced directly
    lanes_in: list[ir.Value] = dataclasses.field(default_factory=list)  # cross reads: z, in site.reads order
    lanes_out: list[ir.Value] = dataclasses.field(default_factory=list)  # cross writes: z = t @ A, in site.writes order
    read_adds: list[ir.Node] = dataclasses.field(default_factory=list)  # the adapter Adds (bypassed)
    read_bases: list[ir.Value] = dataclasses.field(default_factory=list)  # each Add's base operand (after its bias Add)
    b_nodes: list[ir.Node] = dataclasses.field(default_factory=list)  # the GEMMs applying B (zeroed for the strip reference)


@dataclasses.dataclass
class LaneDetection:
    sites: list[WidenedSite]
    rejections: list[Rejection]
    claimed: set[str]  # labels of the adapter Add / Concat / Pad nodes the sites account for


def match_either_order(match, operands):
    """``match(base, lowrank)`` on both operand orders of an Add: (result, None) for the first that
    matches, (None, reason) when an order was shaped like an adapter but failed a check, else (None, None)."""
    reasons = []
    for base, lowrank in ((operands[0], operands[1]), (operands[1], operands[0])):
        try:
            return match(base, lowrank), None
        except _NotACandidate:
            continue
        except _Reject as error:
            reasons.append(str(error))
    return None, (reasons[0] if reasons else None)


def last_axis_bounds(start: int, end: int, width: int) -> tuple[int, int]:
    """A step-1 slice's ``[start, end)`` on an axis of ``width`` lanes, negative and open ends resolved."""
    start = start + width if start < 0 else start
    end = width if end >= width else (end + width if end < 0 else end)
    return start, end


def check_complementary(low, through, stream, start: int, *, projection: str, lanes: str, add: str) -> None:
    """A zFLoRA read ``a[..., :d] @ W + s * a[..., d:] @ B``: the projection must read ``a[..., 0:start)``
    of the same stream, with nothing between. ``low``/``through``: the projection input's slice
    ``(data, start, end)`` as read / through casts (None when it is no slice). Raises _NotACandidate
    when this is not a read of ``stream`` at all, _Reject when it is one the pass cannot widen."""
    if low is None and through is not None and through[0] is stream:
        raise _Reject(
            f"projection '{projection}' reads the base lanes of '{stream.name}' through a Cast: "
            "the widened GEMM would read the stream itself, in another dtype; not widened"
        )
    if low is None or low[0] is not stream:
        raise _NotACandidate
    if low[1] != 0 or low[2] != start:
        raise _Reject(
            f"the lanes '{lanes}' read at '{add}' are a slice of '{stream.name}', but projection "
            f"'{projection}' does not read the complementary slice [0, {start}) of the same tensor"
        )


def check_rank(rank: int, shape, where: str, max_rank_ratio: float) -> None:
    if rank > max_rank_ratio * min(shape):
        raise _Reject(f"rank {rank} at '{where}' is not small relative to W {list(shape)} (limit {max_rank_ratio:g} x {min(shape)})")


def merged_family(old: str, new: str) -> str:
    """The family of a projection carrying lanes of two families (FFA and FBA make FFBA)."""
    if old == new:
        return old
    return "ffba" if {old, new} <= {"ffa", "fba", "ffa/fba", "ffba"} else f"{old}+{new}"


def combine(lora, lanes: LaneDetection):
    """One Detection: LoRA sites, widened sites, and the rejections of both (the lane detector's
    reason replaces the LoRA detector's for the same node: it is the specific one)."""
    lane_nodes = lanes.claimed | {r.node for r in lanes.rejections}
    rejections = [r for r in lora.rejections if r.node not in lane_nodes] + lanes.rejections
    return Detection(lora.sites, rejections, lanes.sites)


@dataclasses.dataclass
class _Read:
    add: ir.Node
    projection: _Projection
    b_node: ir.Node
    b: ir.Value
    b_transposed: bool
    scale: float
    lane: ir.Value  # cross: z (the A GEMM's output); zFLoRA: the high slice a[.., d:]
    stream: ir.Value | None = None  # zFLoRA: a


def _family_of(text: str) -> str:
    text = text.lower()
    return "ffa" if "ffa" in text else "fba" if "fba" in text else "ffa/fba"


def _int_list(value: ir.Value | None) -> list[int] | None:
    getter = constant_getter(value) if value is not None else None
    return None if getter is None else [int(v) for v in np.atleast_1d(getter())]


def _last_dim(value: ir.Value) -> tuple[int, int] | None:
    """(rank, static last dimension) of ``value``, or None when unknown."""
    shape = value.shape
    if shape is None or len(shape) == 0 or not isinstance(shape[-1], int):
        return None
    return len(shape), int(shape[-1])


def _slice_of_last_axis(node: ir.Node | None) -> tuple[ir.Value, int, int] | None:
    """``(data, start, end)`` of a step-1 ``Slice`` on the last axis, or None."""
    if node is None or node.op_type != "Slice" or node.domain != "" or len(node.inputs) < 3:
        return None
    data = node.inputs[0]
    dims = _last_dim(data)
    starts, ends = _int_list(node.inputs[1]), _int_list(node.inputs[2])
    axes = _int_list(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else [0]
    steps = _int_list(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
    if dims is None or None in (starts, ends, axes, steps) or not (len(starts) == len(ends) == len(axes) == len(steps) == 1):
        return None
    rank, width = dims
    if axes[0] not in (-1, rank - 1) or steps[0] != 1:
        return None
    return (data, *last_axis_bounds(starts[0], ends[0], width))


def _match_b(value: ir.Value) -> tuple[ir.Node, ir.Value, ir.Value, bool, float, list[ir.Node]]:
    """``s * (z @ B)`` ending at ``value``: (B GEMM, z, B, B transposed, s, chain nodes)."""
    nodes: list[ir.Node] = []
    reached, scale = _walk_back(value, nodes)
    b_node = reached.producer()
    if not _is_gemm(b_node):
        raise _NotACandidate
    z, b, b_t, b_bias = _gemm_operands(b_node)
    if not is_constant(b) or b_bias is not None:
        raise _NotACandidate
    nodes.append(b_node)
    return b_node, _peel_pass_through(z), b, b_t, scale, nodes


def _match_read(add: ir.Node, base_value: ir.Value, lowrank_value: ir.Value, lora_bases: set[int]) -> _Read:
    b_node, z, b, b_t, scale, nodes = _match_b(lowrank_value)
    producer = z.producer()
    high = _slice_of_last_axis(producer)
    if high is not None:  # zFLoRA: the lanes are the high slice a[.., d:] of the d+r stream
        stream, start, end = high
        if start == 0 or end != _last_dim(stream)[1]:
            raise _NotACandidate  # not the lanes at the end of the stream (a base slice, a bias Add...)
        try:
            projection = _match_projection(base_value)
        except _Reject:
            raise _NotACandidate from None  # not a projection reading the same stream
        check_complementary(
            _slice_of_last_axis(projection.x.producer()),  # no Cast between: the GEMM will read the stream itself
            _slice_of_last_axis(_peel_pass_through(projection.x).producer()),
            stream,
            start,
            projection=_node_label(projection.node),
            lanes=z.name,
            add=_node_label(add),
        )
        read = _Read(add, projection, b_node, b, b_t, scale, z, stream)
    elif _is_gemm(producer) and is_constant(producer.inputs[1]):
        base = _peel_pass_through(base_value).producer()
        if _is_gemm(base) and _peel_pass_through(base.inputs[0]) is _peel_pass_through(producer.inputs[0]):
            raise _NotACandidate  # plain LoRA (the LoRA detector's, with its own checks and reasons)
        projection = _match_projection(base_value)
        if _peel_pass_through(projection.x) is _peel_pass_through(producer.inputs[0]):
            raise _NotACandidate  # plain LoRA: the LoRA detector's
        read = _Read(add, projection, b_node, b, b_t, scale, z)
    else:
        raise _NotACandidate
    if id(projection.node) in lora_bases:
        raise _Reject(f"projection '{_node_label(projection.node)}' also carries a LoRA adapter")
    if projection.node.op_type != "MatMul":
        raise _Reject(f"projection '{_node_label(projection.node)}' is a Gemm; only MatMul projections are widened")
    _single_use(projection.node.outputs[0], projection.bias_add or add, "base projection output")
    if projection.bias_add is not None:
        _single_use(projection.bias_add.outputs[0], add, "base projection output")
    for i, chain_node in enumerate(nodes):
        _single_use(chain_node.outputs[0], nodes[i - 1] if i else add, "low-rank intermediate")
    return read


class _Builder:
    """Collects reads and writes per base node into WidenedSite records."""

    def __init__(self):
        self.sites: dict[int, WidenedSite] = {}

    def site(self, node: ir.Node, weight: ir.Value, transposed: bool, x: ir.Value, base_output: ir.Value, family: str, kind: str = "projection") -> WidenedSite:
        key = id(node)
        if key not in self.sites:
            in_f, out_f = _matrix_shape(weight, transposed, "weight", node)
            self.sites[key] = WidenedSite(
                site_id="",
                family=family,
                label=_label(node, weight),
                input_name=x.name or "",
                output_name=base_output.name or "",
                in_features=in_f,
                out_features=out_f,
                dtype=constant_dtype(weight),
                nodes=[_node_label(node)],
                weight=_oriented(constant_getter(weight), transposed),
                kind=kind,
                binding=OnnxWidenBinding(node=node, x=x, base_output=base_output),
            )
        site = self.sites[key]
        site.family = merged_family(site.family, family)
        return site

    def add_read(self, site: WidenedSite, read: _Read, lane: str, rank: int) -> None:
        site.reads.append(LaneRead(lane, rank, read.scale, _oriented(constant_getter(read.b), read.b_transposed)))
        binding: OnnxWidenBinding = site.binding
        binding.read_adds.append(read.add)
        binding.read_bases.append(read.projection.output)
        binding.b_nodes.append(read.b_node)
        site.nodes += [_node_label(read.b_node), _node_label(read.add)]
        if read.stream is not None:
            binding.stream = read.stream
        else:
            binding.lanes_in.append(read.lane)


def _lora_bases(lora_sites: list[AdapterSite]) -> set[int]:
    """The LoRA sites' GEMMs (bases and low-rank chains): never a lane's host or reader."""
    return {id(s.binding.base) for s in lora_sites} | {id(n) for s in lora_sites for n in s.binding.chain_nodes}


def detect_lanes(graph: ir.Graph, lora_sites: list[AdapterSite], *, max_rank_ratio: float) -> LaneDetection:
    """Every FFA / FBA / FFBA / zFLoRA site in ``graph`` (see the module docstring)."""
    lora_bases = _lora_bases(lora_sites)
    lora_adds = {id(s.binding.add) for s in lora_sites}
    rejections: list[Rejection] = []
    claimed: set[int] = set()
    reads: list[_Read] = []
    for node in graph:
        if node.op_type != "Add" or node.domain != "" or len(node.inputs) != 2 or id(node) in lora_adds:
            continue
        read, reason = match_either_order(lambda base, low, n=node: _match_read(n, base, low, lora_bases), node.inputs)
        if read is not None:
            reads.append(read)
        elif reason:
            rejections.append(Rejection(node=_node_label(node), reason=reason))
    builder = _Builder()
    _build_cross_lanes(graph, [r for r in reads if r.stream is None], builder, rejections, claimed, lora_bases, max_rank_ratio)
    _build_zflora(graph, [r for r in reads if r.stream is not None], builder, rejections, claimed, lora_bases, max_rank_ratio)
    order = {id(node): i for i, node in enumerate(graph)}
    sites = sorted(builder.sites.values(), key=lambda s: order[id(s.binding.node)])
    for number, site in enumerate(sites):
        site.site_id = f"{site.family.replace('/', '_')}{number}"
    return LaneDetection(sites, rejections, claimed)


# ------------------------------------------------------------------ FFA / FBA / FFBA


def _build_cross_lanes(graph, reads: list[_Read], builder: _Builder, rejections, claimed, lora_bases, max_rank_ratio) -> None:
    lanes: dict[int, list[_Read]] = {}
    for read in reads:
        lanes.setdefault(id(read.lane), []).append(read)
    writers = {id(group[0].lane.producer()) for group in lanes.values()}
    order = {id(node): i for i, node in enumerate(graph)}
    for group in lanes.values():
        z = group[0].lane
        a_node = z.producer()
        try:
            t, a, a_t, a_bias = _gemm_operands(a_node)
            if a_bias is not None:
                raise _Reject(f"low-rank GEMM '{_node_label(a_node)}' has a bias")
            in_a, rank = _matrix_shape(a, a_t, "A", a_node)
            hosts = [
                user
                for user, index in t.uses()
                if index == 0
                and user.op_type == "MatMul"
                and user.domain == ""
                and id(user) not in writers
                and id(user) not in lora_bases
                and is_constant(user.inputs[1])
                and len(constant_shape(user.inputs[1])) == 2
                and constant_shape(user.inputs[1])[0] == in_a
            ]
            if not hosts:
                for read in group:
                    rejections.append(Rejection(node=_node_label(read.add), reason=(
                        f"low-rank chain reads '{t.name}' but the projection '{_node_label(read.projection.node)}' it is added to "
                        f"reads '{_peel_pass_through(read.projection.x).name}'; as an FFA/FBA lane it needs a base projection with "
                        f"a constant weight reading '{t.name}' to carry A's columns (input of A '{_node_label(a_node)}'), and no base "
                        f"projection with a constant weight reads '{t.name}'"
                    )))
                continue
            host = min(hosts, key=lambda n: order[id(n)])
            check_rank(rank, (in_a, constant_shape(host.inputs[1])[1]), _node_label(a_node), max_rank_ratio)
            for read in group:
                rank_b, out_b = _matrix_shape(read.b, read.b_transposed, "B", read.b_node)
                in_w, out_w = _matrix_shape(read.projection.weight, False, "weight", read.projection.node)
                if (rank_b, out_b) != (rank, out_w):
                    raise _Reject(f"shapes do not line up at '{_node_label(read.add)}': W [{in_w}, {out_w}], A [{in_a}, {rank}], B [{rank_b}, {out_b}]")
                check_rank(rank, (in_w, out_w), _node_label(read.add), max_rank_ratio)
        except _Reject as reject:
            for read in group:
                rejections.append(Rejection(node=_node_label(read.add), reason=str(reject)))
            continue
        family = _family_of(_label(a_node, a) + " " + (a_node.name or ""))
        host_site = builder.site(host, host.inputs[1], False, t, host.outputs[0], family)
        host_site.writes.append(LaneWrite(z.name or _node_label(a_node), rank, _oriented(constant_getter(a), a_t)))
        host_site.binding.lanes_out.append(z)
        host_site.nodes.append(_node_label(a_node))
        for read in group:
            projection = read.projection
            site = builder.site(projection.node, projection.weight, False, projection.x, projection.output, family)
            builder.add_read(site, read, z.name or _node_label(a_node), rank)
            claimed.add(_node_label(read.add))


# ------------------------------------------------------------------ zFLoRA


def _build_zflora(graph, reads: list[_Read], builder: _Builder, rejections, claimed, lora_bases, max_rank_ratio) -> None:
    ranks: set[int] = set()
    read_nodes: set[int] = set()
    for read in reads:
        try:
            rank, out_b = _matrix_shape(read.b, read.b_transposed, "B", read.b_node)
            in_w, out_w = _matrix_shape(read.projection.weight, False, "weight", read.projection.node)
            if out_b != out_w or _last_dim(read.stream)[1] != in_w + rank:
                raise _Reject(f"shapes do not line up at '{_node_label(read.add)}': stream '{read.stream.name}' {_last_dim(read.stream)[1]} lanes, W [{in_w}, {out_w}], B [{rank}, {out_b}]")
            check_rank(rank, (in_w, out_w), _node_label(read.add), max_rank_ratio)
        except _Reject as reject:
            rejections.append(Rejection(node=_node_label(read.add), reason=str(reject)))
            continue
        site = builder.site(read.projection.node, read.projection.weight, False, read.projection.x, read.projection.output, "zflora")
        builder.add_read(site, read, STREAM_LANE, rank)
        claimed.add(_node_label(read.add))
        ranks.add(rank)
        read_nodes.add(id(read.projection.node))
    if not ranks:
        return
    for node in list(graph):
        if node.domain != "":
            continue
        try:
            if node.op_type == "MatMul" and id(node) not in read_nodes and id(node) not in lora_bases:
                _zflora_cut(node, ranks, builder)
            elif node.op_type in ("Concat", "Pad"):
                if _zflora_write(node, ranks, builder, lora_bases):
                    claimed.add(_node_label(node))
        except _Reject as reject:
            rejections.append(Rejection(node=_node_label(node), reason=str(reject)))


def _zflora_cut(node: ir.Node, ranks: set[int], builder: _Builder) -> None:
    """``a[.., :d] @ W`` with ``a`` a d+r stream: the projection reads ``a`` through zero rows."""
    low = _slice_of_last_axis(node.inputs[0].producer())
    weight = node.inputs[1]
    if low is None or not is_constant(weight) or len(constant_shape(weight)) != 2:
        return
    stream, start, end = low
    rank = _last_dim(stream)[1] - end
    if start != 0 or end != constant_shape(weight)[0] or rank not in ranks:
        return
    site = builder.site(node, weight, False, node.inputs[0], node.outputs[0], "zflora")
    site.reads.append(LaneRead(STREAM_LANE, rank, 1.0, None))
    site.binding.stream = stream


def _pad_amount(node: ir.Node) -> int | None:
    """``r`` for a constant zero Pad of ``r`` lanes at the end of the last axis only, else None."""
    mode = node.attributes.get("mode")
    if mode is not None and mode.value != "constant" or len(node.inputs) < 2:
        return None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        getter = constant_getter(node.inputs[2])
        if getter is None or np.any(getter() != 0):
            return None
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        return None
    pads = _int_list(node.inputs[1])
    dims = _last_dim(node.inputs[0]) or _last_dim(node.outputs[0])
    if pads is None or dims is None or len(pads) != 2 * dims[0]:
        return None
    rank = dims[0]
    if any(p != 0 for i, p in enumerate(pads) if i != 2 * rank - 1):
        return None
    return pads[2 * rank - 1]


def _zflora_write(node: ir.Node, ranks: set[int], builder: _Builder, lora_bases: set[int]) -> bool:
    """Exit projections and the embedding that append the r lanes to the stream."""
    if node.op_type == "Pad":
        rank = _pad_amount(node)
        if rank is None or rank not in ranks:
            return False
        base, lane_producer = node.inputs[0].producer(), None
    else:
        axis = node.attributes.get("axis")
        dims = _last_dim(node.outputs[0])
        if len(node.inputs) != 2 or axis is None or dims is None or axis.value not in (-1, dims[0] - 1):
            return False
        base, lane_producer = node.inputs[0].producer(), node.inputs[1].producer()
        if lane_producer is None or _last_dim(node.inputs[1]) is None or _last_dim(node.inputs[1])[1] not in ranks:
            return False
        rank = _last_dim(node.inputs[1])[1]
    if base is None or base.domain != "" or base.op_type not in ("MatMul", "Gather") or id(base) in lora_bases:
        return False
    if base.op_type == "Gather":  # the embedding: Gather(E, ids)
        table, ids = base.inputs[0], base.inputs[1]
        axis = base.attributes.get("axis")
        if (axis is not None and axis.value != 0) or not is_constant(table) or len(constant_shape(table)) != 2:
            return False
        lane_table = None
        if lane_producer is not None:
            if lane_producer.op_type != "Gather" or lane_producer.inputs[1] is not ids or not is_constant(lane_producer.inputs[0]):
                raise _Reject(f"the lanes concatenated at '{_node_label(node)}' are not a table lookup of the same token ids")
            lane_table = lane_producer.inputs[0]
            _single_use(lane_producer.outputs[0], node, "lane lookup output")
        _single_use(base.outputs[0], node, "embedding output")
        site = builder.site(base, table, False, ids, base.outputs[0], "zflora", kind="embedding")
        site.writes.append(LaneWrite(STREAM_LANE, rank, constant_getter(lane_table) if lane_table is not None else None))
    else:
        x, weight = base.inputs
        if not is_constant(weight) or len(constant_shape(weight)) != 2:
            return False
        lane_a = None
        if lane_producer is not None:
            if not _is_gemm(lane_producer) or lane_producer.op_type != "MatMul" or lane_producer.inputs[0] is not x or not is_constant(lane_producer.inputs[1]):
                raise _Reject(f"the lanes concatenated at '{_node_label(node)}' are not a GEMM of the same input as projection '{_node_label(base)}'")
            lane_a = lane_producer.inputs[1]
            _single_use(lane_producer.outputs[0], node, "lane GEMM output")
        _single_use(base.outputs[0], node, "base projection output")
        site = builder.site(base, weight, False, x, base.outputs[0], "zflora")
        site.writes.append(LaneWrite(STREAM_LANE, rank, constant_getter(lane_a) if lane_a is not None else None))
        if lane_a is not None:
            site.nodes.append(_node_label(lane_producer))
    site.binding.replaced = node.outputs[0]
    site.nodes.append(_node_label(node))
    return True
