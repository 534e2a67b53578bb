"""Adapter-shaped structure, whatever family it belongs to: the compiler's safety net.

- An **adapter-shaped branch** is an add joining a projection's output (a GEMM with a constant
  2-D weight, with or without a bias; a quantized projection, ``MatMulNBits`` or ``MatMul`` of
  ``DequantizeLinear``; or an embedding ``Gather`` of a constant table) with a value
  computed from that projection's input through constant-parameter ops only (at least one of them
  a GEMM). A branch may read the projection's own output (DoRA's ``(c - 1) * (x @ W)``), and the
  projection's output may already carry other branches (two adapters active at once: the lower
  add is looked through).
- An **adapter-shaped scale** is a multiply of a projection's output by a constant per-column
  vector (``out`` entries, every other axis 1): DoRA's magnitude, IA3's output scale, or a base
  model's LayerScale (a graph cannot tell those apart).

Every one is either claimed by a family (recognised) or reported as
:class:`~zflora_compile.graph.records.Unrecognized`; strip refuses while any remains.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from zflora_compile.graph.protocol import GraphView, NotACandidate, Projection, Reject, match_projection

#: a branch with more nodes than this is not an adapter (and the search stays linear in graph size)
MAX_BRANCH_NODES = 256
#: op names (ONNX and ATen) that multiply by a constant matrix: a branch needs one of these
_GEMM_LIKE = {
    "MatMul", "Gemm", "Einsum", "Conv", "com.microsoft::FusedMatMul", "com.microsoft::MatMulNBits",
    "linear", "mm", "addmm", "matmul", "bmm", "einsum", "conv2d", "convolution",
}


@dataclasses.dataclass
class Anchor:
    """What a branch is added to: a projection (``x`` its input, up to casts and views) or an
    embedding lookup (``x`` the ids)."""

    kind: str  # "projection" | "embedding" | "quantized" (a MatMulNBits / QDQ projection)
    x: object
    output: object  # the projection's output after its bias add / the Gather's output
    node: object  # the GEMM / the Gather
    projection: Projection | None = None
    table: object = None


@dataclasses.dataclass
class Branch:
    add: object
    base: object  # the add's operand that carries the projection (possibly through lower branches)
    value: object  # the branch's output (the add's other operand)
    anchor: Anchor
    nodes: list  # the branch's nodes, in graph order
    below: "Branch | None" = None  # the branch already added to the same projection, if any

    @property
    def stack(self) -> list["Branch"]:
        """This branch and every one below it on the same projection, bottom first."""
        out, branch = [], self
        while branch is not None:
            out.append(branch)
            branch = branch.below
        return out[::-1]


@dataclasses.dataclass
class Scale:
    node: object  # the multiply
    anchor: Anchor
    factor: object  # the constant vector


def _anchor(view: GraphView, value, stacked: dict) -> tuple[Anchor, "Branch | None"] | None:
    below = stacked.get(id(view.peel(value, casts=False)))
    if below is not None:
        return below.anchor, below
    try:
        projection = match_projection(view, value)
    except (Reject, NotACandidate):
        projection = None
    if projection is not None:
        gemm = projection.gemm
        return Anchor("projection", view.peel(gemm.x), projection.output, gemm.node, projection=projection), None
    quantized = view.quantized_projection(view.peel(value, casts=False))
    if quantized is not None:  # MatMulNBits / QDQ: its weight is no float constant (never measured nor merged)
        gemm = quantized.gemm
        return Anchor("quantized", view.peel(gemm.x), quantized.output, gemm.node, projection=quantized), None
    found = view.embedding(view.peel(value, casts=False))
    if found is not None and view.is_constant(found[0]) and len(view.constant_shape(found[0])) == 2:
        table, ids, node = found
        return Anchor("embedding", ids, view.output(node), node, table=table), None
    return None


#: ops with no tensor input that compute a constant (torch.export writes DoRA's weight norm with ``eye``)
_SOURCES = {"eye", "arange", "zeros", "ones", "full", "scalar_tensor", "Range"}


class _Cone:
    """The nodes computing a value from ``x`` and constants alone (None when it reads anything else)."""

    def __init__(self, view: GraphView, order: dict):
        self.view, self.order = view, order
        self._constant: dict[int, bool] = {}

    def constant_derived(self, value, depth: int = 0) -> bool:
        """A constant, or computed from constants and sizes only (a weight-norm subgraph left
        unfolded, a reshape target built from ``Shape``)."""
        view = self.view
        if view.is_constant(value) or view.is_shape(value):
            return True  # a constant, or sizes (never the values of what they measure)
        key = id(value)
        if key not in self._constant:
            node = view.producer(value)
            self._constant[key] = False
            if node is not None and depth < 64:
                inputs = view.inputs(node)
                if not inputs:
                    self._constant[key] = view.op(node) in _SOURCES
                else:
                    self._constant[key] = all(self.constant_derived(v, depth + 1) for v in inputs)
        return self._constant[key]

    def __call__(self, top, x) -> list | None:
        view, order = self.view, self.order
        x_producer = view.producer(x)
        floor = order.get(id(x_producer), -1) if x_producer is not None else -1
        nodes: dict[int, object] = {}
        reads_x, stack = False, [top]
        while stack:
            value = stack.pop()
            if value is x:
                reads_x = True
                continue
            if self.constant_derived(value):
                continue
            node = view.producer(value)
            if node is None or order.get(id(node), -1) <= floor:
                return None  # a graph input, or something computed before x
            if id(node) in nodes:
                continue
            nodes[id(node)] = node
            if len(nodes) > MAX_BRANCH_NODES:
                return None
            stack.extend(view.inputs(node))
        if not reads_x:
            return None
        return sorted(nodes.values(), key=lambda n: order[id(n)])


def constant_derived(view: GraphView, value) -> bool:
    """``value`` is a constant, or computed from constants only (DoRA's weight norm, a LoKr factor)."""
    return _Cone(view, {}).constant_derived(value)


def cone_between(view: GraphView, top, source, order: dict | None = None) -> list | None:
    """The nodes computing ``top`` from ``source`` and constants alone, in graph order; None when
    some path reaches anything else (a graph input, a value computed before ``source``)."""
    return _Cone(view, order if order is not None else view.order())(top, source)


def escape(view: GraphView, nodes: list, allowed: set[int]):
    """``(node, reader)`` for the first of ``nodes`` whose value is read by a node outside
    ``allowed`` (ids), or is a graph output (reader None); None when the values stay inside. An
    adapter's value read elsewhere leaves the base model undefined (strip) and keeps it computed."""
    for node in nodes:
        value = view.output(node)
        if view.is_graph_output(value):
            return node, None
        reader = next((u for u in view.users(value) if id(u) not in allowed), None)
        if reader is not None:
            return node, reader
    return None


def find_branches(view: GraphView) -> list[Branch]:
    """Every adapter-shaped branch of ``view``, in graph order."""
    order = view.order()
    cone = _Cone(view, order)
    branches: list[Branch] = []
    stacked: dict[int, Branch] = {}  # id(add output) -> the branch that add joins
    for add, operands in view.adds():
        for base, other in (operands, operands[::-1]):
            if cone.constant_derived(other) or cone.constant_derived(base):
                continue
            found = _anchor(view, base, stacked)
            if found is None:
                continue
            anchor, below = found
            nodes = cone(other, anchor.x)
            if nodes is None or not any(view.op(n) in _GEMM_LIKE for n in nodes):
                continue
            branch = Branch(add, base, other, anchor, nodes, below)
            branches.append(branch)
            stacked[id(view.output(add))] = branch
            break
    return branches


def find_lane_reads(view: GraphView, max_rank_ratio: float) -> list[tuple[object, object]]:
    """``(add, base GEMM node)`` for every add of a GEMM's output (its weight a constant or a graph
    input, a bias added or not) and ``s * (z @ B)`` with ``B: [r, out]`` of small rank (a constant or
    a graph input), ``z`` any activation: the shape of an FFA / FBA lane read, a LoRA whose chain
    reads another tensor, or whose weights are fed at run time, whoever claims it."""
    found = []
    cone = _Cone(view, {})

    def through_scales(value):  # up through casts and multiplies / divides by constants of any shape
        for _ in range(16):
            value = view.peel(value)
            node = view.producer(value)
            step = view.binary(node) if node is not None else None
            if step is None or step[0] not in ("mul", "div"):
                return value
            left, right = step[1], step[2]
            if not isinstance(right, (int, float)) and cone.constant_derived(right) and not isinstance(left, (int, float)):
                value = left
            elif step[0] == "mul" and not isinstance(left, (int, float)) and cone.constant_derived(left) and not isinstance(right, (int, float)):
                value = right
            else:
                return value
        return value

    def gemm_of(value):
        try:
            found = view.gemm(value)
        except Reject:
            return None
        return found if found is not None else view.quantized_gemm(value)

    def weight_shape(gemm):  # [in, out] of a constant weight, or of a weight fed as a graph input
        if gemm.shape is not None:
            return gemm.shape
        dims = view.dims(gemm.weight)
        if dims is None or len(dims) != 2 or view.producer(gemm.weight) is not None:
            return None
        dims = (dims[1], dims[0]) if gemm.transposed else (dims[0], dims[1])
        if dims[1] is None:
            return None
        return dims  # a symbolic first axis: a rank fed at run time (Olive's lora_r), small by construction

    for add, operands in view.adds():
        for base, other in (operands, operands[::-1]):
            base_gemm = gemm_of(view.peel(base, casts=False))
            if base_gemm is None:
                found_bias = view.bias_add(view.peel(base, casts=False))
                base_gemm = gemm_of(view.peel(found_bias[0], casts=False)) if found_bias is not None else None
            if base_gemm is None and view.quantized_projection(view.peel(base, casts=False)) is not None:
                base_gemm = view.quantized_projection(view.peel(base, casts=False)).gemm
            b = gemm_of(through_scales(other))
            if b is None or b is base_gemm:
                continue
            shape = weight_shape(b)
            if base_gemm is None and (view.is_constant(base) or cone.constant_derived(base)):
                continue  # a chain plus a constant is no adapter on anything
            base_shape = weight_shape(base_gemm) if base_gemm is not None else (view.last_dim(base), view.last_dim(base))
            if shape is None or base_shape is None or None in base_shape:
                continue
            rank, out = shape
            if out == base_shape[1] and (rank is None or rank <= max_rank_ratio * min(base_shape)):
                # added to a GEMM's output, or (a low-rank chain on the stream itself) to any value
                found.append((add, base_gemm.node if base_gemm is not None else add))
                break
    return found


def _per_column(view: GraphView, factor, out: int) -> bool:
    dims = view.constant_shape(factor) if view.is_constant(factor) else view.dims(factor)
    if not dims or any(d is None for d in dims):
        return False
    shape = tuple(dims)
    return out > 1 and int(np.prod(shape)) == out and shape[-1] == out


def _constant_multiplies(view: GraphView):
    """``(mul, data, factor)`` for every multiply of a computed value by a constant (or a value
    computed from constants: PEFT's IA3 writes ``ia3_l.flatten() * 1``), each operand order."""
    cone = _Cone(view, {})
    for mul, operands in view.muls():
        for data, factor in (operands, operands[::-1]):
            if isinstance(factor, (int, float)) or isinstance(data, (int, float)):
                continue
            if cone.constant_derived(factor) and not cone.constant_derived(data):
                yield mul, data, factor


def find_scales(view: GraphView) -> list[Scale]:
    """Every multiply of a projection's output by a constant per-column vector."""
    scales, seen = [], set()
    for mul, data, factor in _constant_multiplies(view):
        try:
            projection = match_projection(view, data)
        except (Reject, NotACandidate):
            continue
        if id(mul) not in seen and _per_column(view, factor, projection.shape[1]):
            seen.add(id(mul))
            gemm = projection.gemm
            scales.append(Scale(mul, Anchor("projection", view.peel(gemm.x), projection.output, gemm.node, projection=projection), factor))
    return scales


#: ops (ONNX and ATen) that normalise a row: a per-channel constant multiplying their output is the
#: norm's weight, not an adapter
_NORMS = {
    "LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "com.microsoft::SimplifiedLayerNormalization",
    "com.microsoft::SkipSimplifiedLayerNormalization", "com.microsoft::SkipLayerNormalization", "com.microsoft::LayerNormalization",
    "layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm",
}
_ROOTS = {"Sqrt", "Reciprocal", "rsqrt", "sqrt", "reciprocal"}


def _normalised(view: GraphView, value, depth: int = 0) -> bool:
    """``value`` is a normalisation's output: a norm op, or ``x * rsqrt(..)`` / ``x / sqrt(..)``."""
    node = view.producer(view.peel(value))
    if node is None or depth > 3:
        return False
    if view.op(node) in _NORMS:
        return True
    found = view.binary(node)
    if found is None or found[0] not in ("mul", "div"):
        return False
    for operand in found[1:]:
        producer = view.producer(view.peel(operand)) if not isinstance(operand, (int, float)) else None
        if producer is not None and (view.op(producer) in _ROOTS or _normalised(view, operand, depth + 1) and found[0] == "mul"):
            return True
    return False


def find_input_scales(view: GraphView) -> list[Scale]:
    """Every multiply of a projection's *input* by a constant per-channel vector that is not a
    normalisation's weight: IA3 on a feed-forward projection (``(h * l) @ W``)."""
    scales, seen = [], set()
    for mul, data, factor in _constant_multiplies(view):
        if id(mul) in seen or _normalised(view, data):
            continue
        projections = [g for g in view.gemm_readers(view.output(mul)) if g.shape is not None and view.is_constant(g.weight)]
        if projections and _per_column(view, factor, projections[0].shape[0]):
            seen.add(id(mul))
            gemm = projections[0]
            scales.append(Scale(mul, Anchor("projection", view.peel(gemm.x), gemm.out, gemm.node), factor))
    return scales
