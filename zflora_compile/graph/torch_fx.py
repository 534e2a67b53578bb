"""The graph view and the emitter over torch.fx (see :mod:`.protocol`).

Vocabulary: ATen graphs from ``torch.export``, before or after ``run_decompositions``. GEMMs are
``aten.linear`` (weight ``[out, in]``), ``mm`` / ``matmul`` (weight ``[in, out]``, possibly
``t``/``permute``/``transpose`` of an ``[out, in]`` constant), ``addmm`` (bias folded in) and
``bmm(view(expand(x)), view(expand(W)))`` (how ``linear`` on a non-contiguous input decomposes).
What is truly FX stays here: views that only flatten or unflatten leading axes (what
``run_decompositions`` writes around ``mm``) are looked through, shapes come from fake-tensor
metadata (``meta['val']``), and constants are parameters, buffers and lifted constants reached
through the program's signature (placeholders) or ``get_attr`` nodes. A value and the node that
computes it are the same ``fx.Node``.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import re
from typing import Callable

import numpy as np
import torch
from torch.fx import Node

from zflora_compile.graph.protocol import Gemm, Reject, last_axis_bounds
from zflora_compile.graph.records import LazyArray, clean_label

__all__ = ["FxConstants", "FxGraph", "GEMM_OPS", "op_name", "real_users", "torch_dtype_name", "tensor_meta"]

GEMM_OPS = ("linear", "mm", "addmm", "matmul", "bmm")
_CASTS = {"_to_copy", "to", "convert_element_type", "type_as"}
_IDENTITY = {"clone", "contiguous", "alias", "detach", "lift_fresh_copy"}
_VIEWS = {"view", "reshape", "_unsafe_view"}
_TRANSPOSES = {"t", "permute", "transpose", "numpy_T"}
_ASSERTS = {"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size", "_assert_async"}
_ACTIVATIONS = {
    "relu", "relu_", "gelu", "silu", "sigmoid", "tanh", "elu", "selu", "celu", "leaky_relu", "hardswish",
    "hardsigmoid", "hardtanh", "relu6", "softplus", "mish", "exp", "log", "abs", "prelu", "softsign", "erf",
}
_BIG = 2**62
aten = torch.ops.aten


def op_name(node) -> str:
    """``relu`` for ``aten.relu.default`` (call_function nodes on aten/prims ops), else ''."""
    if not isinstance(node, Node) or node.op != "call_function":
        return ""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        namespace, _, name = target._schema.name.partition("::")
        return name if namespace in ("aten", "prims") else ""
    return ""


def is_assert(node: Node) -> bool:
    return op_name(node) in _ASSERTS


def real_users(node: Node) -> list[Node]:
    """Users that consume the value (metadata assertions do not)."""
    return [u for u in node.users if not is_assert(u)]


def torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tensor_meta(node) -> torch.Tensor | None:
    """The fake (or real) tensor ``meta['val']`` of a node, or None."""
    if not isinstance(node, Node):
        return None
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def _last_dim(node) -> int | None:
    val = tensor_meta(node)
    if val is None or val.dim() == 0 or not isinstance(val.shape[-1], int):
        return None
    return int(val.shape[-1])


def _is_cast(node: Node) -> bool:
    name = op_name(node)
    if name in _CASTS:
        return True
    return name == "dropout" and (len(node.args) > 2 and node.args[2] is False or (len(node.args) > 1 and node.args[1] == 0))


def _keeps_last_axis(node: Node) -> bool:
    """A view whose input and output have the same static last axis: only leading axes change."""
    return op_name(node) in _VIEWS and _last_dim(node) is not None and _last_dim(node) == _last_dim(node.args[0])


def _rank(node) -> int:
    val = tensor_meta(node)
    return -1 if val is None else val.dim()


def _flattens(node: Node) -> bool:
    """A leading-axis view that does not add axes (``[B, S, d] -> [B*S, d]``: what feeds ``mm``)."""
    return _keeps_last_axis(node) and _rank(node.args[0]) >= _rank(node)


def _unflattens(node: Node) -> bool:
    """A leading-axis view that adds axes (``[B*S, d] -> [B, S, d]``: what follows ``mm``)."""
    return _keeps_last_axis(node) and _rank(node.args[0]) < _rank(node)


class FxConstants:
    """Resolves graph nodes that are compile-time constants to tensors (lazily)."""

    def __init__(self, gm: torch.fx.GraphModule, placeholders: dict[str, Callable[[], torch.Tensor]] | None = None):
        self.gm = gm
        self.placeholders = placeholders or {}

    def source(self, node) -> Node | None:
        """The placeholder/get_attr a constant expression starts from, or None."""
        while isinstance(node, Node):
            if node.op == "placeholder":
                return node if node.name in self.placeholders else None
            if node.op == "get_attr":
                return node
            name = op_name(node)
            if name in _TRANSPOSES or name in _IDENTITY or _is_cast(node):
                node = node.args[0]
                continue
            return None
        return None

    def is_constant(self, node) -> bool:
        return self.source(node) is not None

    def getter(self, node: Node) -> Callable[[], torch.Tensor]:
        """A function computing ``node``'s value (for a node with :meth:`is_constant`)."""
        if node.op == "placeholder":
            return self.placeholders[node.name]
        if node.op == "get_attr":
            return lambda t=node.target: functools.reduce(getattr, t.split("."), self.gm).detach()
        inner = self.getter(node.args[0])
        name = op_name(node)
        if name in _IDENTITY:
            return inner
        if name in ("t", "numpy_T"):
            return lambda: inner().t()
        if name == "transpose":
            return lambda d0=node.args[1], d1=node.args[2]: inner().transpose(d0, d1)
        if name == "permute":
            return lambda dims=tuple(node.args[1]): inner().permute(dims)
        out = tensor_meta(node)
        if out is not None:
            return lambda dtype=out.dtype: inner().to(dtype)
        dtype = node.kwargs.get("dtype") or (node.args[1] if len(node.args) > 1 and isinstance(node.args[1], torch.dtype) else None)
        return (lambda: inner().to(dtype)) if dtype is not None else inner

    def shape_dtype(self, node: Node) -> tuple[tuple[int, ...], torch.dtype]:
        val = tensor_meta(node)
        if val is not None and all(isinstance(d, int) for d in val.shape):
            return tuple(val.shape), val.dtype
        value = self.getter(node)()
        return tuple(value.shape), value.dtype


def _to_numpy(getter: Callable[[], torch.Tensor], transposed: bool) -> Callable[[], np.ndarray]:
    """An ``[in, out]`` numpy array (bfloat16 comes back as float32: exact; the planner casts)."""

    def compute() -> np.ndarray:
        value = getter().detach()
        if transposed:
            value = value.t()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return np.ascontiguousarray(value.cpu().numpy())

    return compute


def to_torch(array) -> torch.Tensor:
    """A plan's array (LazyArray or ndarray) as a tensor (bfloat16 goes through float32: exact)."""
    value = array.numpy() if isinstance(array, LazyArray) else np.asarray(array)
    if value.dtype.name == "bfloat16":
        return torch.from_numpy(value.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(value))


def _dim_key(dim) -> str:
    """A dimension as text: an int, or a symbolic size's expression (read without a guard)."""
    return str(dim.node.expr) if isinstance(dim, torch.SymInt) else str(int(dim))


def _same_dims(a, b) -> bool:
    """Shapes equal as written (never compares a symbolic size with a number: that would add a
    guard to the program's shape environment, e.g. ``seq != 8``, and the rewritten program would
    refuse that length)."""
    return len(a) == len(b) and all(_dim_key(x) == _dim_key(y) for x, y in zip(a, b))


def _through_broadcast(node):
    """Up through ``view``/``expand`` that keep the last two axes: the batch broadcast of
    ``bmm(view(expand(x)), view(expand(W)))``, how ``matmul`` of an N-D input decomposes (a view
    that regroups the matrix itself, like per-head weights ``W.view(H, in, out)``, is not one)."""
    while isinstance(node, Node) and op_name(node) in (*_VIEWS, "expand"):
        out, src = tensor_meta(node), tensor_meta(node.args[0])
        if out is None or src is None or src.dim() < 2 or not _same_dims(out.shape[-2:], src.shape[-2:]):
            break
        node = node.args[0]
    return node


def _module_label(node: Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1]
    path = path[0] if isinstance(path, tuple) else str(path)
    return clean_label(re.sub(r"^L__self__\.?", "", path))


class FxGraph:
    """A torch.fx GraphModule as a :class:`~.protocol.GraphView` and an :class:`~.protocol.Emitter`.

    ``add_constant(name, tensor) -> Node`` adds a weight to the program (a parameter placeholder
    of an ExportedProgram, a ``get_attr`` of a GraphModule); None for detection only.
    """

    ir = "fx"
    requires_shapes = True

    def __init__(self, gm: torch.fx.GraphModule, constants: FxConstants, add_constant=None):
        self.gm = gm
        self.graph = gm.graph
        self.constants = constants
        self.add_constant = add_constant
        self._like: Node | None = None
        self._stem = "zflora"
        self._redirected: dict[int, Node] = {}  # id(old) -> new, for handles a plan still holds

    def gemm_count(self) -> int:
        return sum(1 for node in self.graph.nodes if op_name(node) in GEMM_OPS)

    # ------------------------------------------------------------------ structure
    def nodes(self):
        return iter(list(self.graph.nodes))

    def adds(self):
        """``add`` and PEFT's in-place ``+=`` (``add_``), with alpha 1."""
        for node in list(self.graph.nodes):
            if op_name(node) in ("add", "add_") and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1:
                yield node, list(node.args)

    def muls(self):
        for node in list(self.graph.nodes):
            if op_name(node) in ("mul", "mul_") and len(node.args) == 2:
                yield node, list(node.args)

    def inputs(self, node):
        return list(node.all_input_nodes)

    def is_shape(self, value) -> bool:
        """A size, not tensor data: a node whose value is a (symbolic) integer (``sym_size``, and
        arithmetic on sizes)."""
        return isinstance(value, Node) and value.op != "placeholder" and "val" in value.meta and not isinstance(value.meta["val"], torch.Tensor)

    def binary(self, node):
        """``(kind, left, right)`` for ``add`` / ``sub`` / ``mul`` / ``div`` (in place or not, alpha 1,
        no rounding mode); operands are nodes or Python numbers."""
        kinds = {"add": "add", "add_": "add", "sub": "sub", "sub_": "sub", "mul": "mul", "mul_": "mul", "div": "div", "div_": "div"}
        name = op_name(node)
        if name not in kinds or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1 or node.kwargs.get("rounding_mode") is not None:
            return None
        return kinds[name], node.args[0], node.args[1]

    def op(self, node) -> str:
        return op_name(node) or node.op

    def dims(self, value):
        """``value``'s shape from its fake tensor: ints where static, None where symbolic."""
        val = tensor_meta(value)
        return None if val is None else [d if isinstance(d, int) else None for d in val.shape]

    def evaluate(self, feeds, output):
        """``output`` computed from ``feeds`` ((node, array) pairs) by running the nodes between
        them in eager PyTorch; raises ``RegionError``."""
        from zflora_compile.graph.onnx_eval import RegionError

        env = {id(node): to_torch(array) for node, array in feeds}
        sizes = {}  # the symbols of the fed values' shapes, sized by the arrays
        for node, array in feeds:
            val = tensor_meta(node)
            for dim, size in zip(val.shape if val is not None else (), np.shape(array)):
                if isinstance(dim, torch.SymInt) and dim.node.expr.is_Symbol:
                    sizes[dim.node.expr] = int(size)
        needed, stack = {}, [output]
        while stack:
            node = stack.pop()
            if id(node) in env or id(node) in needed:
                continue
            if self.constants.is_constant(node):
                env[id(node)] = self.constants.getter(node)()
                continue
            if self.is_shape(node):  # a size: from the fed shapes' symbols, not from what it reads
                val = node.meta["val"]
                expr = val.node.expr.subs(sizes) if isinstance(val, torch.SymInt) else val
                if getattr(expr, "free_symbols", None):
                    raise RegionError(f"size '{node.name}' depends on an axis the fed values do not size")
                env[id(node)] = int(expr) if isinstance(val, torch.SymInt) else val
                continue
            if node.op != "call_function":
                raise RegionError(f"it reads {self.describe(node)}")
            needed[id(node)] = node
            stack.extend(node.all_input_nodes)
        order = self.order()
        try:
            with torch.no_grad():
                for node in sorted(needed.values(), key=lambda n: order[id(n)]):
                    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: env[id(n)])
                    env[id(node)] = node.target(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any op may refuse the probe's shape
            raise RegionError(f"PyTorch cannot run it on its own: {str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}") from None
        result = env[id(output)]
        return (result.float() if result.dtype == torch.bfloat16 else result).detach().cpu().numpy()

    def producer(self, value):
        return value if isinstance(value, Node) and value.op != "placeholder" else None

    def output(self, node):
        return node

    def data_input(self, node):
        return next((a for a in node.args if isinstance(a, Node) and not self.constants.is_constant(a)), None)

    def users(self, value):
        return real_users(value) if isinstance(value, Node) else []

    def successors(self, node):
        return list(node.users)

    def is_graph_output(self, value) -> bool:
        return isinstance(value, Node) and any(u.op == "output" for u in value.users)

    def order(self) -> dict[int, int]:
        return {id(node): i for i, node in enumerate(self.graph.nodes)}

    # ------------------------------------------------------------------ names
    def name(self, node) -> str:
        return node.name if isinstance(node, Node) else "<graph input>"

    def value_name(self, value) -> str:
        return value.name if isinstance(value, Node) else str(value)

    def describe(self, value) -> str:
        if not isinstance(value, Node):
            return "a constant"
        if value.op == "placeholder":
            return "a constant" if self.constants.is_constant(value) else "a graph input"
        return f"'{op_name(value) or value.op}' node '{value.name}'"

    def label(self, node, weight=None) -> str:
        """The PEFT / module path recorded in ``nn_module_stack``, else the weight's name."""
        label = _module_label(node) if isinstance(node, Node) else ""
        if label or weight is None:
            return label
        source = self.constants.source(weight)
        if source is None:
            return ""
        return clean_label(str(source.target if source.op == "get_attr" else source.name))

    # ------------------------------------------------------------------ arithmetic
    def peel(self, value, *, casts: bool = True):
        """Up through identities, flattening leading-axis views and (``casts``) dtype casts."""
        while isinstance(value, Node):
            if op_name(value) in _IDENTITY or (casts and _is_cast(value)) or _flattens(value):
                value = value.args[0]
                continue
            return value
        return value

    def _scalar(self, value) -> float | None:
        if isinstance(value, bool):
            return None
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, Node) and self.constants.is_constant(value):
            shape, _ = self.constants.shape_dtype(value)
            if int(np.prod(shape)) == 1:
                return float(self.constants.getter(value)().reshape(()).item())
        return None

    def _scale_of(self, node: Node):
        name = op_name(node)
        if name not in ("mul", "div") or len(node.args) != 2:
            return None
        if name == "div" and node.kwargs.get("rounding_mode") is not None:
            return None
        left, right = node.args
        orders = [(left, right), (right, left)] if name == "mul" else [(left, right)]
        for data, factor in orders:
            if not isinstance(data, Node) or self.constants.is_constant(data):
                continue
            if isinstance(factor, Node) and self.is_constant(factor) and len(self.constant_shape(factor)) > max(1, self.rank(data) or 0):
                continue  # a "scale" of higher rank than the data broadcasts it up: not a scale
            value = self._scalar(factor)
            if value is None:
                continue
            if name == "div":
                return (data, 1.0 / value) if value != 0 else None
            return data, value
        return None

    def walk_back(self, value):
        nodes, scale = [], 1.0
        while isinstance(value, Node):
            if op_name(value) in _IDENTITY or _is_cast(value) or _keeps_last_axis(value):
                nodes.append(value)
                value = value.args[0]
                continue
            scaled = self._scale_of(value)
            if scaled is None:
                break
            nodes.append(value)
            value, scale = scaled[0], scale * scaled[1]
        return value, scale, nodes

    def _nd_output(self, node: Node) -> Node:
        """The GEMM's result with its leading axes restored (the view after ``mm``, if any)."""
        while True:
            users = real_users(node)
            if len(users) == 1 and _unflattens(users[0]):
                node = users[0]
                continue
            return node

    def gemm(self, value):
        while isinstance(value, Node) and _unflattens(value):  # the N-D result of a 2-D GEMM
            value = value.args[0]
        if not isinstance(value, Node):
            return None
        name = op_name(value)
        args = value.args
        if name == "bmm":
            weight = _through_broadcast(args[1])
            val = tensor_meta(weight)
            if val is None or val.dim() != 2:
                return None
            x, bias, index = _through_broadcast(args[0]), None, 1
        elif name == "linear":
            x, weight, index = args[0], args[1], 1
            bias = args[2] if len(args) > 2 else value.kwargs.get("bias")
        elif name == "addmm":
            if value.kwargs.get("beta", 1) != 1 or value.kwargs.get("alpha", 1) != 1:
                raise Reject(f"addmm node '{value.name}' has alpha or beta != 1")
            x, weight, bias, index = args[1], args[2], args[0], 2
        elif name in ("mm", "matmul"):
            weight = args[1]
            val = tensor_meta(weight)
            if name == "matmul" and (val is None or val.dim() != 2):
                return None
            x, bias, index = args[0], None, 1
        else:
            return None
        transposed = name == "linear"
        shape = None
        if self.constants.is_constant(weight):
            stored, _ = self.constants.shape_dtype(weight)
            if len(stored) == 2:
                shape = (stored[1], stored[0]) if transposed else (stored[0], stored[1])
        return Gemm(value, name, self.peel(x, casts=False), self._nd_output(value), weight, bias, shape, transposed, index, x)

    def _lossless_source(self, value):
        """Up through identities, flattening views and casts, while every step keeps the dtype."""
        dtype = self.value_dtype(value)
        while isinstance(value, Node) and (op_name(value) in _IDENTITY or _is_cast(value) or _flattens(value)):
            if dtype is None or self.value_dtype(value.args[0]) != dtype:
                break
            value = value.args[0]
        return value

    def gemm_readers(self, value):
        """The GEMMs reading ``value`` up to views and casts that keep its dtype."""
        source = self._lossless_source(value)
        readers = []
        for node in self.graph.nodes:
            if op_name(node) in GEMM_OPS:
                try:
                    gemm = self.gemm(node)
                except Reject:
                    continue
                if gemm is not None and self._lossless_source(gemm.x) is source:
                    readers.append(gemm)
        return readers

    def bias_add(self, value):
        if op_name(value) != "add" or len(value.args) != 2:
            return None
        for data, const in ((value.args[0], value.args[1]), (value.args[1], value.args[0])):
            if isinstance(data, Node) and not self.constants.is_constant(data) and isinstance(const, Node) and self.constants.is_constant(const):
                return data, const, value
        return None

    def activation_input(self, value):
        name = op_name(value)
        if name in _ACTIVATIONS and value.args and isinstance(value.args[0], Node):
            return value.args[0]
        if name == "mul" and len(value.args) == 2:  # SiLU as x * sigmoid(x)
            for data, gate in ((value.args[0], value.args[1]), (value.args[1], value.args[0])):
                if op_name(gate) == "sigmoid" and gate.args[0] is data:
                    return data
        return None

    # ------------------------------------------------------------------ constants
    def quantized_gemm(self, value):
        """ATen programs carry no ONNX Runtime quantized GEMM (MatMulNBits, QDQ): None."""
        return None

    def quantized_projection(self, value):
        return None

    def runtime_weight(self, gemm):
        """A user input as a weight is not a form this front-end rewrites: None (the LoRA family
        rejects it as not constant)."""
        return None

    def is_constant(self, value) -> bool:
        return isinstance(value, Node) and self.constants.is_constant(value)

    def constant_array(self, value, *, transposed: bool = False):
        return _to_numpy(self.constants.getter(value), transposed)

    def weight(self, gemm: Gemm):
        return self.constant_array(gemm.weight, transposed=gemm.transposed)

    def constant_shape(self, value):
        return self.constants.shape_dtype(value)[0]

    def dtype(self, value) -> str:
        return torch_dtype_name(self.constants.shape_dtype(value)[1])

    # ------------------------------------------------------------------ shapes and the last axis
    def last_dim(self, value):
        return _last_dim(value)

    def value_dtype(self, value):
        val = tensor_meta(value)
        return None if val is None else torch_dtype_name(val.dtype)

    def rank(self, value):
        val = tensor_meta(value)
        return None if val is None else val.dim()

    def leading_shape(self, value):
        val = tensor_meta(value)
        return None if val is None else [str(d) for d in val.shape[:-1]]

    def shape_key(self, value):
        val = tensor_meta(value)
        return None if val is None else [str(d) for d in val.shape]

    def last_axis_slice(self, value):
        if op_name(value) != "slice":
            return None
        args = list(value.args) + [None] * (5 - len(value.args))
        data, dim, start, end, step = args[:5]
        dim = value.kwargs.get("dim", 0 if dim is None else dim)
        start = value.kwargs.get("start", 0 if start is None else start)
        end = value.kwargs.get("end", _BIG if end is None else end)
        step = value.kwargs.get("step", 1 if step is None else step)
        val, width = tensor_meta(data), _last_dim(data)
        if val is None or width is None or not all(isinstance(v, int) for v in (dim, start, end, step)):
            return None
        if dim not in (-1, val.dim() - 1) or step != 1:
            return None
        return (data, *last_axis_bounds(start, end, width))

    def last_axis_concat(self, node):
        if op_name(node) != "cat":
            return None
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        val = tensor_meta(node)
        if val is None or dim not in (-1, val.dim() - 1):
            return None
        return list(node.args[0])

    def last_axis_pad(self, node):
        name = op_name(node)
        if name not in ("constant_pad_nd", "pad"):
            return None
        pads = node.args[1] if len(node.args) > 1 else None
        value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
        if name == "pad":
            mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
            value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
            if mode != "constant":
                return None
        if not isinstance(pads, (list, tuple)) or len(pads) != 2 or pads[0] != 0 or value not in (None, 0, 0.0) or not isinstance(pads[1], int):
            return None
        return node.args[0], pads[1]

    def embedding(self, value):
        if op_name(value) != "embedding":
            return None
        return value.args[0], value.args[1], value

    # ================================================================== emitter
    @contextlib.contextmanager
    def at(self, node, stem: str = ""):
        saved = self._like, self._stem
        self._like = node
        self._stem = "zflora_" + "".join(c if c.isalnum() else "_" for c in stem).strip("_") if stem else "zflora"
        try:
            with self.graph.inserting_before(node):
                yield self
        finally:
            self._like, self._stem = saved

    def _call(self, target, args, kwargs=None, name: str | None = None) -> Node:
        """A call_function node at the insertion point, with ``meta['val']`` propagated."""
        kwargs = kwargs or {}
        node = self.graph.call_function(target, tuple(args), kwargs)
        if name:
            node.name = self.graph._graph_namespace.create_name(f"{self._stem}_{name}", node)
        missing = []

        def fake(arg):
            if isinstance(arg, Node):
                if "val" not in arg.meta:
                    missing.append(arg)
                return arg.meta.get("val")
            return arg

        fake_args, fake_kwargs = torch.fx.node.map_aggregate(args, fake), torch.fx.node.map_aggregate(kwargs, fake)
        if not missing:
            node.meta["val"] = target(*fake_args, **fake_kwargs)
        if self._like is not None:
            for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node", "custom"):
                if key in self._like.meta:
                    node.meta[key] = self._like.meta[key]
        return node

    def _dims(self, source: Node, shape) -> list:
        """``shape`` as view arguments: ints, or ``sym_size`` nodes of ``source`` for symbolic axes."""
        return [d if isinstance(d, int) else self._call(aten.sym_size.int, (source, axis)) for axis, d in enumerate(shape)]

    def constant(self, name: str, array) -> Node:
        return self.add_constant(f"{self._stem}_{name}", to_torch(array))

    def resolve(self, value):
        """What ``value`` now is: a plan's handles may name nodes an earlier rewrite redirected
        (a LoRA add a lane host reads); reading the old one would revive the replaced subgraph."""
        seen = 0
        while isinstance(value, Node) and id(value) in self._redirected and seen < 10_000:
            value, seen = self._redirected[id(value)], seen + 1
        return value

    def project(self, x, array, like: Gemm | None = None, bias=None, name: str = "weight"):
        """``x @ array (+ bias)``: ``aten.linear`` where ``like`` is one, else ``mm`` between views (ops
        that exist before and after ``run_decompositions``; a decomposed GEMM's own 2-D view of
        ``x`` is reused)."""
        x = self.resolve(x)
        bias = None if bias is None else self.constant(f"{name}_bias", bias)
        if like is not None and like.kind == "linear":
            weight = self.add_constant(f"{self._stem}_{name}", to_torch(array).t().contiguous())
            return self._call(aten.linear.default, (x, weight) if bias is None else (x, weight, bias))
        out = self._matmul(x, self.constant(name, array), like)
        return out if bias is None else self.add(out, bias)

    def _matmul(self, x, weight, like: Gemm | None = None):
        """``x @ weight`` for an N-D ``x`` and a 2-D ``[in, out]`` constant node."""
        x_val, rows = tensor_meta(x), tensor_meta(weight).shape[0]
        x2 = x
        if x_val.dim() != 2:
            raw = like.operand if like is not None and like.kind in ("mm", "addmm") and x is like.x else None
            if raw is not None and tensor_meta(raw) is not None and tensor_meta(raw).dim() == 2:
                x2 = raw
            else:
                view = aten.view.default if like is not None and like.kind in ("mm", "addmm") else aten.reshape.default
                x2 = self._call(view, (x, [-1, rows]))
        out = self._call(aten.mm.default, (x2, weight), name="mm")
        if x_val.dim() != 2:
            out = self._call(aten.view.default, (out, [*self._dims(x, x_val.shape[:-1]), tensor_meta(weight).shape[1]]))
        return out

    def add(self, a, b):
        return self._call(aten.add.Tensor, (self.resolve(a), self.resolve(b)))

    def scale(self, value, factor):
        """``value * factor``: a float, or a per-column vector (array or LazyArray) as a new constant."""
        factor = float(factor) if isinstance(factor, (int, float)) else self.constant("factor", factor)
        return self._call(aten.mul.Tensor, (self.resolve(value), factor))

    def split_last(self, value, sizes):
        value = self.resolve(value)
        if len(sizes) == 1:
            return [value]
        parts, offset = [], 0
        for size in sizes:
            parts.append(self._call(aten.slice.Tensor, (value, -1, offset, offset + size)))
            offset += size
        return parts

    def regroup(self, value, sizes: list[int], leading: int):
        """The last axis split into ``sizes`` (``[.., g*s] -> [.., g, s]``)."""
        value = self.resolve(value)
        shape = tensor_meta(value).shape
        return self._call(aten.reshape.default, (value, [*self._dims(value, shape[:-1]), *sizes]))

    def swap_last(self, value, leading: int):
        """The last two axes swapped."""
        return self._call(aten.transpose.int, (self.resolve(value), -1, -2))

    def flatten_last(self, value, count: int, leading: int):
        """The last ``count`` axes as one (``[.., g, s] -> [.., g*s]``)."""
        value = self.resolve(value)
        shape = tensor_meta(value).shape
        return self._call(aten.reshape.default, (value, [*self._dims(value, shape[:-count]), -1]))

    def concat_last(self, values):
        return self._call(aten.cat.default, ([self.resolve(v) for v in values], -1))

    def gather(self, table, ids):
        return self._call(aten.embedding.default, (self.resolve(table), self.resolve(ids)))

    def replace_weight(self, gemm: Gemm, array, name: str = "weight") -> None:
        """The GEMM reads ``array`` (``[in, out]``; stored ``[out, in]`` for ``linear``)."""
        tensor = to_torch(array)
        node = self.add_constant(f"{self._stem}_{name}", tensor.t().contiguous() if gemm.transposed else tensor)
        if gemm.kind == "bmm":  # bmm(view(expand(x)), view(expand(W))): replace W where the broadcast reads it
            reader = gemm.node.args[1]
            while isinstance(reader, Node) and reader.args and reader.args[0] is not gemm.weight:
                reader = reader.args[0]
            reader.replace_input_with(gemm.weight, node)
        else:
            gemm.node.update_arg(gemm.weight_index, node)

    def redirect(self, old, new) -> None:
        """Every use of ``old`` reads ``new`` (cast to ``old``'s dtype when they differ)."""
        new = self.resolve(new)
        if new is old:
            return
        want, have = tensor_meta(old), tensor_meta(new)
        if want is not None and have is not None and want.dtype != have.dtype:
            with self.graph.inserting_before(old):
                saved, self._like = self._like, old
                new = self._call(aten._to_copy.default, (new,), {"dtype": want.dtype})
                self._like = saved
        old.replace_all_uses_with(new)
        self._redirected[id(old)] = new
        if op_name(old).endswith("_") and not old.users:
            # an in-place op (PEFT's ``result += lora`` is ``add_``) would still mutate its input,
            # which is what its readers now read: it goes, and dead-code elimination (which keeps
            # impure nodes) can remove what fed it
            self.graph.erase_node(old)

    def cleanup(self) -> None:
        """Remove dead nodes, including metadata assertions that only check dead values."""
        while True:
            removed = False
            for node in reversed(list(self.graph.nodes)):
                if node.op in ("placeholder", "output", "get_attr"):
                    continue
                if is_assert(node):
                    target = node.args[0] if node.args else None
                    if isinstance(target, Node) and all(is_assert(u) for u in target.users) and not _needed(target):
                        self.graph.erase_node(node)
                        removed = True
                    continue
                if not node.users and not node.is_impure():
                    self.graph.erase_node(node)
                    removed = True
            if not removed:
                break
        _topological_order(self.graph)
        self.gm.recompile()


def _topological_order(graph: torch.fx.Graph) -> None:
    """Move nodes, in place and stably, so that every node comes after its inputs (a lane read may
    precede the host whose split now produces its lanes)."""
    position = {node: i for i, node in enumerate(graph.nodes)}
    if all(position[i] < position[node] for node in graph.nodes for i in node.all_input_nodes):
        return
    pending = {node: len(set(node.all_input_nodes)) for node in graph.nodes}
    ready = [(position[n], n) for n, count in pending.items() if count == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        _, node = heapq.heappop(ready)
        ordered.append(node)
        for user in node.users:
            pending[user] -= 1
            if pending[user] == 0:
                heapq.heappush(ready, (position[user], user))
    if len(ordered) != len(position):
        raise AssertionError("the rewritten FX graph has a cycle")
    for before, node in zip(ordered, ordered[1:]):
        before.append(node)


def _needed(node: Node) -> bool:
    """A value only asserted on is dead unless it is an input (asserting inputs is a guard)."""
    return node.op == "placeholder" or op_name(node) in ("sym_size",)
