"""What a family may ask of a graph (:class:`GraphView`) and what its rewrite may emit (:class:`Emitter`).

A family module is written once against these two protocols; :mod:`.onnx_ir` and :mod:`.torch_fx`
implement them. Handles are opaque: a *value* is whatever flows along an edge (an ``ir.Value``, an
``fx.Node``), a *node* whatever computes one (an ``ir.Node``, the same ``fx.Node``). Families never
look inside a handle; they compare handles with ``is`` and pass them back to the view.

Orientation: every weight a view hands out is ``[in, out]`` (right-multiplication), whatever the
graph stores (``Gemm(transB=1)``, ``aten.linear``); the view remembers how to put it back.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np

Value = Any
Node = Any
ArrayGetter = Callable[[], np.ndarray]


class NotACandidate(Exception):
    """The structure is not shaped like an adapter at all: nothing to report."""


class Reject(Exception):
    """The structure is shaped like an adapter but a check failed: reported with the reason."""


@dataclasses.dataclass
class Gemm:
    """``x @ W (+ bias)`` computed by one node, as a view sees it.

    ``x``: the N-D input (leading-axis views peeled); ``out``: the N-D result (the GEMM's own bias
    included); ``weight``: the weight operand handle; ``shape``: ``[in, out]`` when ``weight`` is a
    2-D constant (else None); ``bias``: the GEMM's own bias operand (Gemm's C, ``linear``'s third
    argument, ``addmm``'s first), else None; ``kind``: the op (``MatMul``, ``Gemm``, ``linear``...).
    """

    node: Node
    kind: str
    x: Value
    out: Value
    weight: Value
    bias: Value | None = None
    shape: tuple[int, int] | None = None
    transposed: bool = False  # the graph stores the weight [out, in] (view-internal)
    weight_index: int = 1  # position of the weight operand (view-internal)
    operand: Value = None  # the input operand as the node reads it (before peeling views)


@dataclasses.dataclass
class Projection:
    """A base projection: a GEMM with a constant 2-D weight, optionally followed by an add of a
    constant bias. ``output``: after that bias add (what an adapter is added to)."""

    gemm: Gemm
    output: Value
    bias: Value | None  # the added bias, else the GEMM's own
    bias_add: Node | None

    @property
    def node(self) -> Node:
        return self.gemm.node

    @property
    def shape(self) -> tuple[int, int]:
        return self.gemm.shape


class GraphView(Protocol):
    """The questions a family's pattern and check may ask of a graph."""

    ir: str  # "onnx" | "fx"
    requires_shapes: bool  # the emitter needs every value's shape (FX meta) to rewrite a site

    # structure
    def nodes(self) -> Iterator[Node]: ...
    def adds(self) -> Iterator[tuple[Node, list[Value]]]: ...  # binary adds, in graph order
    def producer(self, value: Value) -> Node | None: ...
    def data_input(self, node: Node) -> Value | None: ...  # the first non-constant operand
    def output(self, node: Node) -> Value: ...
    def users(self, value: Value) -> list[Node]: ...
    def successors(self, node: Node) -> list[Node]: ...  # the nodes reading any of its outputs
    def is_graph_output(self, value: Value) -> bool: ...
    def order(self) -> dict[int, int]: ...  # id(node) -> position
    # names (labels only: never decide anything)
    def name(self, node: Node | None) -> str: ...
    def value_name(self, value: Value) -> str: ...
    def describe(self, value: Value) -> str: ...  # "'Relu' node 'n'" / "a graph input" / "a constant"
    def label(self, node: Node, weight: Value) -> str: ...
    # arithmetic seen through casts, identities and leading-axis views
    def peel(self, value: Value, *, casts: bool = True) -> Value: ...
    def walk_back(self, value: Value) -> tuple[Value, float, list[Node]]: ...
    def gemm(self, value: Value) -> Gemm | None: ...
    def gemm_readers(self, value: Value) -> list[Gemm]: ...
    def bias_add(self, value: Value) -> tuple[Value, Value, Node] | None: ...  # (data, constant, add)
    def activation_input(self, value: Value) -> Value | None: ...
    # constants, lazily
    def is_constant(self, value: Value) -> bool: ...
    # weights that are not constants (families/runtime.py; the FX view answers None)
    def quantized_gemm(self, value: Value) -> Gemm | None: ...  # MatMulNBits / MatMul of a DequantizeLinear
    def quantized_projection(self, value: Value) -> Projection | None: ...  # the same, with its bias add
    def runtime_weight(self, gemm: Gemm) -> tuple[str, tuple] | None: ...  # (kind, [in, out] dims) of a weight a caller feeds
    def constant_array(self, value: Value, *, transposed: bool = False) -> ArrayGetter: ...
    def weight(self, gemm: Gemm) -> ArrayGetter: ...  # the GEMM's constant weight, [in, out]
    def constant_shape(self, value: Value) -> tuple[int, ...]: ...
    def dtype(self, value: Value) -> str: ...  # numpy name of a constant's element type
    # shapes and the last axis
    def last_dim(self, value: Value) -> int | None: ...
    def shape_key(self, value: Value) -> list[str] | None: ...  # None where shapes are advisory
    def value_dtype(self, value: Value) -> str | None: ...  # numpy name of any value's element type, if known
    def leading_shape(self, value: Value) -> list[str] | None: ...  # all but the last axis, if known
    def rank(self, value: Value) -> int | None: ...
    def last_axis_slice(self, value: Value) -> tuple[Value, int, int] | None: ...
    def last_axis_concat(self, node: Node) -> list[Value] | None: ...
    def last_axis_pad(self, node: Node) -> tuple[Value, int] | None: ...
    def embedding(self, value: Value) -> tuple[Value, Value, Node] | None: ...  # (table, ids, node)
    # any node, for the accounting of adapter-shaped structure (graph.branches) and measuring it
    def inputs(self, node: Node) -> list[Value]: ...  # every value operand
    def op(self, node: Node) -> str: ...  # "MatMul", "com.microsoft::FusedMatMul", "mm"...
    def is_shape(self, value: Value) -> bool: ...  # sizes of a tensor, not its values (Shape, sym_size)
    def binary(self, node: Node) -> tuple[str, Any, Any] | None: ...  # ("add"|"sub"|"mul"|"div", left, right); numbers stay numbers
    def muls(self) -> Iterator[tuple[Node, list[Value]]]: ...  # binary multiplies, in graph order
    def dims(self, value: Value) -> list[int | None] | None: ...  # static dims, None where symbolic
    def evaluate(self, feeds: list[tuple[Value, np.ndarray]], output: Value) -> np.ndarray: ...  # the region between, alone


class Emitter(Protocol):
    """What a family's rewrite may emit. New nodes go before the node given to :meth:`at`."""

    def at(self, node: Node, stem: str = ""): ...  # context manager; ``stem`` prefixes new names
    def constant(self, name: str, array) -> Value: ...  # a LazyArray or ndarray
    def project(self, x: Value, array, like: Gemm | None = None, bias=None, name: str = "weight") -> Value: ...  # x @ array (+ bias)
    def add(self, a: Value, b: Value) -> Value: ...
    def scale(self, value: Value, factor) -> Value: ...  # value * (a float, or a per-column vector)
    def split_last(self, value: Value, sizes: list[int]) -> list[Value]: ...
    def concat_last(self, values: list[Value]) -> Value: ...
    def regroup(self, value: Value, sizes: list[int], leading: int) -> Value: ...  # [.., g*s] -> [.., g, s]
    def flatten_last(self, value: Value, count: int, leading: int) -> Value: ...  # [.., g, s] -> [.., g*s]
    def swap_last(self, value: Value, leading: int) -> Value: ...  # [.., a, b] -> [.., b, a]
    def gather(self, table: Value, ids: Value) -> Value: ...
    def replace_weight(self, gemm: Gemm, array, name: str = "weight") -> None: ...  # ``array``: [in, out]
    def redirect(self, old: Value, new: Value) -> None: ...
    def cleanup(self) -> None: ...


def single_use(view: GraphView, value: Value, consumer: Node, what: str) -> None:
    """Reject unless ``consumer`` is the only user of ``value`` (and it is no graph output)."""
    users = view.users(value)
    if any(u is not consumer for u in users) or not users or view.is_graph_output(value):
        others = [view.name(u) for u in users if u is not consumer]
        where = f"node '{others[0]}'" if others else "a graph output"
        raise Reject(f"{what} '{view.value_name(value)}' is also used by {where}")


def either_order(match: Callable[[Value, Value], Any], operands: Iterable[Value]) -> tuple[Any, str | None]:
    """``match(base, lowrank)`` on both operand orders of an add: (result, None) for the first
    that matches, (None, reason) when an order was shaped like an adapter but failed a check,
    else (None, None)."""
    first, second = operands
    reasons = []
    for base, lowrank in ((first, second), (second, first)):
        try:
            return match(base, lowrank), None
        except NotACandidate:
            continue
        except Reject as error:
            reasons.append(str(error))
    return None, (reasons[0] if reasons else None)


def last_axis_bounds(start: int, end: int, width: int) -> tuple[int, int]:
    """A step-1 slice's ``[start, end)`` on an axis of ``width`` lanes, negative and open ends resolved."""
    start = start + width if start < 0 else start
    end = width if end >= width else (end + width if end < 0 else end)
    return start, end


def match_projection(view: GraphView, value: Value, *, one_bias: bool = True) -> Projection:
    """The projection producing ``value``: a GEMM with a constant weight, optionally followed by an
    add of a constant bias; raises :class:`Reject` when it is something else. ``one_bias``: reject
    a GEMM with a bias of its own that also gets an added one."""
    bias = bias_add = None
    reached = view.peel(value, casts=False)
    found = view.bias_add(reached)
    if found is not None and view.gemm(view.peel(found[0], casts=False)) is not None:
        data, bias, bias_add = found
        reached = view.peel(data, casts=False)
    gemm = view.gemm(reached)
    if gemm is None:
        raise Reject(f"low-rank chain is added to {view.describe(reached)}, not to a projection with a constant weight")
    if gemm.bias is not None:
        if bias is not None and one_bias:
            raise Reject(f"base projection '{view.name(gemm.node)}' has two biases")
        if gemm.bias is not None and not view.is_constant(gemm.bias):
            raise Reject(f"bias of '{view.name(gemm.node)}' is not constant")
        bias = gemm.bias if bias is None else bias
    if not view.is_constant(gemm.weight):
        raise Reject(f"base weight '{view.value_name(gemm.weight)}' of '{view.name(gemm.node)}' is not constant ({produced_by(view, gemm.weight)})")
    if bias is not None and not view.is_constant(bias):
        raise Reject(f"bias of '{view.name(gemm.node)}' is not constant")
    matrix_shape(view, gemm, "weight")
    output = view.output(bias_add) if bias_add is not None else gemm.out
    return Projection(gemm, output, bias, bias_add)


#: ONNX ops that may only regroup leading axes (checked: the same static last axis in and out)
_ROW_VIEWS = ("Reshape", "Flatten")


def row_view_input(view: GraphView, value: Value, width: int | None = None) -> Value | None:
    """The tensor that ``value`` is a row-preserving reshape of, else None: an ONNX ``Reshape`` /
    ``Flatten`` whose input and output have the same static last axis only regroups the leading
    axes (``[B, S, d] <-> [B*S, d]``, what exporters write around a 2-D ``Gemm`` such as GPT-2's
    ``Conv1D`` addmm), so row ``i`` of the output is row ``i`` of the input in row-major order.
    ``width``: the last axis both tensors must have anyway (the caller checks it: the rows of the
    GEMM weight that reads the reshape, and of the one that reads its input), used where the graph
    records none (a symbolic axis); otherwise an unknown last axis is no evidence. (The FX view
    peels such views itself: :meth:`GraphView.peel`, :meth:`GraphView.gemm`.)"""
    node = view.producer(value)
    if node is None or view.op(node) not in _ROW_VIEWS:
        return None
    data = view.inputs(node)[0] if view.inputs(node) else None
    if data is None or view.is_constant(data):
        return None
    out_last, in_last = view.last_dim(value), view.last_dim(data)
    out_last, in_last = (width if out_last is None else out_last), (width if in_last is None else in_last)
    return data if out_last is not None and out_last == in_last else None


def check_path(view: GraphView, top: Value, node: Node, consumer: Node, what: str) -> None:
    """Every value from ``top`` (read by ``consumer``) down to ``node``'s output (through views, casts
    and a bias add) feeds only the next step."""
    value = top
    while True:
        single_use(view, value, consumer, what)
        consumer = view.producer(value)
        if consumer is None or consumer is node:
            return
        value = view.data_input(consumer)
        if value is None:
            return


def bias_problem(view: GraphView, bias: Value, out: int, x: Value) -> str | None:
    """Why ``bias`` cannot be treated as a per-column vector of ``out`` entries added to ``x @ W``
    (a rewrite concatenates and pads it as ``[out]``), or None when it can."""
    if not view.is_constant(bias):
        return "is not constant"
    shape = tuple(view.constant_shape(bias))
    rank = view.rank(x)
    if int(np.prod(shape)) != out or not shape or shape[-1] != out or (len(shape) > 1 and (rank is None or len(shape) > rank)):
        return f"has shape {list(shape)}, not [{out}]"
    return None


#: the float types whose every value a float type holds (float16 and bfloat16 hold each other's
#: values only in part: neither is a pass-through for the other)
FLOAT_HOLDS = {
    "float16": {"float16"},
    "bfloat16": {"bfloat16"},
    "float32": {"float16", "bfloat16", "float32"},
    "float64": {"float16", "bfloat16", "float32", "float64"},
}


def lossy_cast(view: GraphView, top: Value, bottom: Value, into: str | None) -> Node | None:
    """The first node on the pass-through path from ``top`` up to ``bottom`` that loses information
    (a value held in an integer type, or in a float that holds the values of neither end: float16
    and bfloat16 do not hold each other's), or a ``top`` that does not hold ``bottom``'s values unless it is ``into`` (the dtype of the GEMM reading the path: a chain computed
    in another precision), else None. Unknown dtypes are no evidence either way."""
    reader, path, value, seen = view.value_dtype(top), [], top, 0
    while value is not None and value is not bottom and seen < 10_000:
        producer = view.producer(value)
        source = view.data_input(producer) if producer is not None else None
        if source is None:
            break
        path.append((producer, source))
        value, seen = source, seen + 1
    if not path:
        return None
    if reader is not None and reader not in FLOAT_HOLDS:
        return path[0][0]
    low = view.value_dtype(path[-1][1])
    ends = [d for d in (reader, low) if d in FLOAT_HOLDS]
    for producer, source in path[:-1]:  # values strictly between top and bottom
        held = view.value_dtype(source)
        if held is not None and (held not in FLOAT_HOLDS or (ends and not any(end in FLOAT_HOLDS[held] for end in ends))):
            return view.producer(source)
    if reader in FLOAT_HOLDS and low in FLOAT_HOLDS and low not in FLOAT_HOLDS[reader] and reader != into:
        return path[0][0]
    return None


def check_casts(view: GraphView, top: Value, bottom: Value, into: str | None, what: str) -> None:
    """Reject when a cast between ``bottom`` and ``top`` changes values (see :func:`lossy_cast`)."""
    cast = lossy_cast(view, top, bottom, into)
    if cast is not None:
        raise Reject(
            f"'{view.name(cast)}' holds {what} as {view.value_dtype(view.output(cast))}: a cast through an integer type "
            "or to a lower precision is not a pass-through"
        )


def bias_getter(view: GraphView, projection: Projection) -> Callable[[], np.ndarray] | None:
    """The projection's bias as an ``[out]`` array getter (None without one); raises :class:`Reject`
    when it is not a per-column vector a rewrite can concatenate and pad."""
    if projection.bias is None:
        return None
    out = projection.shape[1]
    problem = bias_problem(view, projection.bias, out, projection.gemm.x)
    if problem:
        raise Reject(f"bias of '{view.name(projection.node)}' {problem}")
    getter = view.constant_array(projection.bias)
    return lambda: getter().reshape(out)


def zero_branch(graph: Emitter, add: Node, base: Value, branch: Value, stem: str) -> None:
    """The strip reference of an adapter with no single ``B`` to zero: ``add`` computes
    ``base + 0 * branch`` (the graph otherwise unchanged)."""
    with graph.at(add, stem):
        graph.redirect(graph.output(add), graph.add(base, graph.scale(branch, 0.0)))


def produced_by(view: GraphView, value: Value) -> str:
    producer = view.producer(value)
    return f"produced by node '{view.name(producer)}'" if producer is not None else "a graph input"


def matrix_shape(view: GraphView, gemm: Gemm, role: str) -> tuple[int, int]:
    """``[in, out]`` of a GEMM's constant weight; rejects a weight that is not 2-D."""
    if gemm.shape is None:
        shape = view.constant_shape(gemm.weight)
        raise Reject(f"{role} '{view.value_name(gemm.weight)}' of '{view.name(gemm.node)}' is not 2-D (shape {list(shape)})")
    return gemm.shape


def check_rank(rank: int, shape, where: str, max_rank_ratio: float) -> None:
    if rank > max_rank_ratio * min(shape):
        raise Reject(f"rank {rank} at '{where}' is not small relative to W {list(shape)} (limit {max_rank_ratio:g} x {min(shape)})")
