"""The graph view and the emitter over onnx-ir (see :mod:`.protocol`).

Vocabulary: GEMMs are ``MatMul``, plain ``Gemm`` (``transA=0``, ``alpha=1``; ``transB=1`` means a
``[out, in]`` weight; ``C`` is its bias) and ONNX Runtime's ``com.microsoft::FusedMatMul``
(``transA=0``, ``transBatchA=0``, ``transBatchB=0``; ``transB=1`` means a ``[out, in]`` weight), which
its offline optimizer writes for ``alpha * (x @ W)``: the view reads it as ``x @ (alpha * W)``, so
:meth:`OnnxGraph.weight` hands out ``alpha * W`` and :meth:`OnnxGraph.replace_weight` writes a plain
weight and resets ``alpha`` to 1 (the scale is accounted for exactly once, in the weight); casts
are ``Cast``/``Identity``; scales are ``Mul``/``Div`` by a constant scalar; the last axis is cut by
``Slice``, joined by ``Concat``, extended by ``Pad``; embeddings are ``Gather(table, ids, axis=0)``.
Constants are initializers or ``Constant`` nodes, behind layout ops (:mod:`.onnx_constants`),
evaluated lazily. Only the default domain is matched, ``FusedMatMul`` (and a few activations) aside;
new GEMMs are always plain ``MatMul``.

Quantized projections are seen apart from :meth:`OnnxGraph.gemm` (no family may fold or measure
their weights as floats): :meth:`OnnxGraph.quantized_gemm` reads ONNX Runtime's
``com.microsoft::MatMulNBits`` (constant packed ``B [N, k_blocks, blob]``, ``scales``, optional
``zero_points`` and ``bias``; attributes ``K``, ``N``, ``bits``, ``block_size``, ``accuracy_level``) and
``MatMul(x, DequantizeLinear(q, scale, zero_point))`` of constants (QDQ). Graph inputs are never
constants (:mod:`.onnx_constants`); :meth:`OnnxGraph.runtime_weight` says what such a weight is.
The emitter builds what a run-time fusion needs: ``Concat`` of weights, ``Pad``, and MatMulNBits
nodes packed along ``N`` (:meth:`OnnxGraph.nbits_project`).
"""

from __future__ import annotations

import ast
import collections
import contextlib

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from zflora_compile.graph import onnx_eval
from zflora_compile.graph.onnx_constants import constant_dtype, constant_getter, constant_shape, is_constant, scalar_value
from zflora_compile.graph.protocol import Gemm, Projection, Reject, last_axis_bounds
from zflora_compile.graph.records import LazyArray, clean_label, numpy_dtype

GEMM_OPS = ("MatMul", "Gemm", "FusedMatMul")  # FusedMatMul in com.microsoft, the others in the default domain
_MS = "com.microsoft"
#: FusedMatMul attributes that make it something other than ``x @ W`` (or ``x @ W^T``) for a 2-D constant W
_FUSED_LAYOUT = ("transA", "transBatchA", "transBatchB")
_PASS_THROUGH = {"Cast", "Identity"}
_ACTIVATIONS = {
    "Relu", "LeakyRelu", "PRelu", "Tanh", "Sigmoid", "HardSigmoid", "HardSwish", "Gelu", "Erf",
    "Elu", "Selu", "Celu", "Softplus", "Softsign", "Mish", "Exp", "Log", "Abs", "ThresholdedRelu",
}
_PREFIX = "zflora"
#: ops whose output has their first input's element type
_SAME_TYPE = (
    "Identity", "Relu", "Neg", "Mul", "Div", "Add", "Sub", "MatMul", "Gemm", "Slice", "Concat", "Reshape",
    "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Gather", "Split", "Pad",
)


def _default(node: ir.Node | None, *ops: str) -> bool:
    return node is not None and node.domain == "" and node.op_type in ops


def _fused(node: ir.Node | None) -> bool:
    return node is not None and node.domain == _MS and node.op_type == "FusedMatMul"


def _is_gemm(node: ir.Node | None) -> bool:
    return _default(node, "MatMul", "Gemm") or _fused(node)


def _nbits(node: ir.Node | None) -> bool:
    return node is not None and node.domain == _MS and node.op_type == "MatMulNBits"


#: MatMulNBits operands after the activation: packed B, scales, zero_points, g_idx, bias
_NBITS_OPERANDS = ("B", "scales", "zero_points", "g_idx", "bias")


def _attrs(node: ir.Node) -> dict:
    return {k: a.value for k, a in node.attributes.items()}


def _alpha(node: ir.Node) -> float:
    """A FusedMatMul's ``alpha`` (1 for any other node)."""
    attr = node.attributes.get("alpha") if _fused(node) else None
    return 1.0 if attr is None else float(attr.value)


def _int_list(value: ir.Value | None) -> list[int] | None:
    getter = constant_getter(value) if value is not None else None
    return None if getter is None else [int(v) for v in np.atleast_1d(getter())]


class OnnxGraph:
    """An onnx-ir model as a :class:`~.protocol.GraphView` and an :class:`~.protocol.Emitter`."""

    ir = "onnx"
    requires_shapes = False

    def __init__(self, model: ir.Model, graph: ir.Graph | None = None):
        """A view of ``graph``: the model's main graph, or one of its subgraphs (an ``If`` branch, a
        ``Loop`` body), whose nodes may read values of enclosing graphs. New initializers go to the
        main graph, which every subgraph may read; new names are unique across the whole model."""
        self.model = model
        self.graph = model.graph if graph is None else graph
        self._anchor: ir.Node | None = None
        self._taken: set[str] | None = None
        self._redirected: dict[int, ir.Value] = {}  # id(old) -> new, for handles a plan still holds

    # ------------------------------------------------------------------ counts
    def op_counts(self) -> dict[str, int]:
        return dict(sorted(collections.Counter(n.op_type for n in self.graph.all_nodes()).items()))

    def gemm_count(self) -> int:
        """GEMMs: MatMul, Gemm, FusedMatMul and ONNX Runtime's quantized MatMulNBits."""
        return sum(1 for node in self.graph.all_nodes() if _is_gemm(node) or _nbits(node))

    # ------------------------------------------------------------------ structure
    def nodes(self):
        return iter(list(self.graph))

    def adds(self):
        for node in list(self.graph):
            if _default(node, "Add") and len(node.inputs) == 2:
                yield node, list(node.inputs)

    def muls(self):
        for node in list(self.graph):
            if _default(node, "Mul") and len(node.inputs) == 2:
                yield node, list(node.inputs)

    def producer(self, value):
        return value.producer() if isinstance(value, ir.Value) else None

    def inputs(self, node):
        return [v for v in node.inputs if v is not None]

    def is_shape(self, value) -> bool:
        """A tensor's sizes, not its values: the output of ``Shape`` / ``Size``."""
        return _default(self.producer(value), "Shape", "Size")

    def binary(self, node):
        """``(kind, left, right)`` for an elementwise Add / Sub / Mul / Div of the default domain, else None."""
        kinds = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div"}
        if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in kinds or len(node.inputs) != 2:
            return None
        return kinds[node.op_type], node.inputs[0], node.inputs[1]

    def op(self, node) -> str:
        return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"

    def output(self, node):
        return node.outputs[0]

    def data_input(self, node):
        return next((v for v in node.inputs if v is not None and not is_constant(v)), None)

    def users(self, value):
        return [user for user, _ in value.uses()]

    def successors(self, node):
        return [user for output in node.outputs for user, _ in output.uses()]

    def is_graph_output(self, value) -> bool:
        return value.is_graph_output()

    def order(self) -> dict[int, int]:
        return {id(node): i for i, node in enumerate(self.graph)}

    # ------------------------------------------------------------------ names
    def name(self, node) -> str:
        return (node.name or node.op_type) if node is not None else "<graph input>"

    def value_name(self, value) -> str:
        return value.name or ""

    def describe(self, value) -> str:
        node = self.producer(value)
        return f"'{node.op_type}' node '{self.name(node)}'" if node is not None else "a graph input"

    def label(self, node, weight=None) -> str:
        """The module path the exporter recorded, else the node's name scope, else the weight's name."""
        scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
        if scopes:
            try:
                parts = ast.literal_eval(scopes)
                module = next((p for p in reversed(parts[:-1]) if p), "")
            except (ValueError, SyntaxError):
                module = ""
            if module:
                return clean_label(module)
        name = node.name or ""
        if "/" in name:
            return clean_label(".".join(p for p in name.split("/")[:-1] if p))
        if weight is None:
            return ""
        root = weight
        while root.producer() is not None and root.producer().op_type in ("Transpose", "Cast", "Identity"):
            root = root.producer().inputs[0]
        return clean_label(root.name or name)

    # ------------------------------------------------------------------ arithmetic
    def peel(self, value, *, casts: bool = True):
        """Up through ``Cast``/``Identity`` (``casts=False``: nothing; ONNX has no leading-axis views)."""
        if not casts:
            return value
        node = value.producer()
        while _default(node, *_PASS_THROUGH):
            value = node.inputs[0]
            node = value.producer()
        return value

    def _scale_of(self, node: ir.Node):
        if not _default(node, "Mul", "Div") or len(node.inputs) != 2:
            return None
        left, right = node.inputs
        orders = [(left, right), (right, left)] if node.op_type == "Mul" else [(left, right)]
        for data, factor in orders:
            if is_constant(data) or len(constant_shape(factor) if is_constant(factor) else ()) > max(1, self.rank(data) or 0):
                continue  # a "scale" of higher rank than the data broadcasts it up: not a scale
            value = scalar_value(factor)
            if value is None:
                continue
            if node.op_type == "Div":
                return (data, 1.0 / value) if value != 0 else None
            return data, value
        return None

    def walk_back(self, value):
        nodes, scale = [], 1.0
        while True:
            node = value.producer()
            if node is None or node.domain != "":
                return value, scale, nodes
            if node.op_type in _PASS_THROUGH:
                nodes.append(node)
                value = node.inputs[0]
                continue
            scaled = self._scale_of(node)
            if scaled is None:
                return value, scale, nodes
            nodes.append(node)
            value, scale = scaled[0], scale * scaled[1]

    def gemm(self, value):
        node = self.producer(value)
        if not _is_gemm(node) or len(node.inputs) < 2:
            return None
        x, weight, bias, transposed = node.inputs[0], node.inputs[1], None, False
        if _fused(node):
            attrs = {k: a.value for k, a in node.attributes.items()}
            layout = [k for k in _FUSED_LAYOUT if attrs.get(k, 0)]
            if layout:
                if weight is None or not is_constant(weight):
                    return None  # an activation product (attention) in another layout: no projection
                raise Reject(f"FusedMatMul node '{self.name(node)}' has {', '.join(f'{k}=1' for k in layout)}: not x @ W")
            transposed = bool(attrs.get("transB", 0))
        if node.op_type == "Gemm":
            attrs = {k: a.value for k, a in node.attributes.items()}
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
                raise Reject(f"Gemm node '{self.name(node)}' has transA or alpha != 1")
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            if bias is not None and attrs.get("beta", 1.0) != 1.0:
                raise Reject(f"Gemm node '{self.name(node)}' has beta != 1")
            transposed = bool(attrs.get("transB", 0))
        shape = None
        if is_constant(weight):
            stored = constant_shape(weight)
            if len(stored) == 2:
                shape = (stored[1], stored[0]) if transposed else (stored[0], stored[1])
        return Gemm(node, node.op_type, x, node.outputs[0], weight, bias, shape, transposed, 1, x)

    def _lossless_source(self, value):
        """Up through Cast/Identity while every step keeps ``value``'s dtype."""
        dtype = self.value_dtype(value)
        node = value.producer()
        while _default(node, *_PASS_THROUGH) and dtype is not None and self.value_dtype(node.inputs[0]) == dtype:
            value = node.inputs[0]
            node = value.producer()
        return value

    def gemm_readers(self, value):
        """The GEMMs reading ``value`` up to casts that keep its dtype (a no-op Cast, an Identity)."""
        source = self._lossless_source(value)
        dtype = self.value_dtype(source)
        readers, frontier = [], [source]
        while frontier:
            current = frontier.pop(0)
            for user, index in current.uses():
                if index == 0 and _default(user, *_PASS_THROUGH):
                    if dtype is not None and self.value_dtype(user.outputs[0]) == dtype:
                        frontier.append(user.outputs[0])
                elif index == 0 and _is_gemm(user):
                    try:
                        readers.append(self.gemm(user.outputs[0]))
                    except Reject:
                        continue
        return readers

    def bias_add(self, value):
        node = self.producer(value)
        if not _default(node, "Add") or len(node.inputs) != 2:
            return None
        for data, const in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
            if not is_constant(data) and is_constant(const):
                return data, const, node
        return None

    def activation_input(self, value):
        node = self.producer(value)
        if node is None or node.domain not in ("", "com.microsoft"):
            return None
        if (node.domain == "" and node.op_type in _ACTIVATIONS) or (node.domain == "com.microsoft" and node.op_type in ("FastGelu", "QuickGelu", "BiasGelu")):
            return node.inputs[0]
        if _default(node, "Mul") and len(node.inputs) == 2:  # SiLU as Mul(t, Sigmoid(t))
            for data, gate in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
                producer = gate.producer() if gate is not None else None
                if _default(producer, "Sigmoid") and producer.inputs[0] is data:
                    return data
        return None

    # ------------------------------------------------------------------ quantized projections, run-time weights
    def quantized_gemm(self, value):
        """A ``Gemm`` record (``kind`` "MatMulNBits" or "QDQ") for ``value`` computed by a quantized
        projection whose parameters are all constant: ``MatMulNBits(x, B, scales[, zero_points][, g_idx][, bias])``
        (``shape`` ``(K, N)``, ``weight`` the packed B, ``bias`` its bias operand) or ``MatMul(x,
        DequantizeLinear(q, scale[, zero_point]))`` with a 2-D ``q`` (``shape`` ``q``'s); else None."""
        node = self.producer(value)
        if _nbits(node) and len(node.inputs) >= 3 and node.outputs[0] is value:
            params = [v for v in node.inputs[1:] if v is not None]
            attrs = _attrs(node)
            if not all(is_constant(v) for v in params) or "K" not in attrs or "N" not in attrs:
                return None
            bias = node.inputs[5] if len(node.inputs) > 5 else None
            return Gemm(node, "MatMulNBits", node.inputs[0], value, node.inputs[1], bias, (int(attrs["K"]), int(attrs["N"])), False, 1, node.inputs[0])
        if _default(node, "MatMul") and len(node.inputs) == 2:
            weight = node.inputs[1]
            dq = self.producer(weight)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in ("", _MS):
                return None
            if not all(v is None or is_constant(v) for v in dq.inputs):
                return None
            shape = constant_shape(dq.inputs[0])
            if len(shape) != 2:
                return None
            return Gemm(node, "QDQ", node.inputs[0], value, weight, None, (int(shape[0]), int(shape[1])), False, 1, node.inputs[0])
        return None

    def quantized_projection(self, value):
        """The quantized projection producing ``value`` (a :class:`~.protocol.Projection` whose
        ``gemm`` comes from :meth:`quantized_gemm`), optionally followed by an add of a constant
        bias; None when ``value`` is anything else."""
        reached, bias, bias_add = value, None, None
        found = self.bias_add(value)
        if found is not None and self.quantized_gemm(found[0]) is not None:
            reached, bias, bias_add = found
        gemm = self.quantized_gemm(reached)
        if gemm is None:
            return None
        if gemm.bias is not None:
            if bias is not None:
                return None  # two biases: not a projection this view rewrites
            bias = gemm.bias
        return Projection(gemm, value if bias_add is not None else gemm.out, bias, bias_add)

    def nbits_key(self, gemm: Gemm):
        """What two MatMulNBits must share to be packed into one along ``N`` (bit-exact: each output
        column is computed from its own rows of B, scales and zero points): ``K``, ``bits``,
        ``block_size``, ``accuracy_level``, the per-row shapes and dtypes of the packed operands,
        and the same ``g_idx``; None for anything that is not a packable MatMulNBits."""
        node = gemm.node
        if not _nbits(node):
            return None
        attrs = _attrs(node)
        if len(node.inputs) > 4 and node.inputs[4] is not None:
            return None  # g_idx (act-order) reorders K: not packed
        rows = []
        for value in node.inputs[1:4]:
            if value is None:
                rows.append(None)
                continue
            shape = constant_shape(value)
            n = int(attrs["N"])
            if not shape or shape[0] != n and int(np.prod(shape)) % n:
                return None
            rows.append((len(shape), int(np.prod(shape)) // n, constant_dtype(value)))
        return (int(attrs["K"]), int(attrs.get("bits", 4)), int(attrs.get("block_size", 0)), int(attrs.get("accuracy_level", 0)), *rows)

    def quantization(self, gemm: Gemm) -> dict:
        """How a quantized GEMM (:meth:`quantized_gemm`) stores its weight, for reports."""
        if gemm.kind == "MatMulNBits":
            attrs = _attrs(gemm.node)
            return {"op": "MatMulNBits", "bits": int(attrs.get("bits", 4)), "block_size": int(attrs.get("block_size", 0)), "accuracy_level": int(attrs.get("accuracy_level", 0))}
        dq = self.producer(gemm.weight)
        return {"op": "DequantizeLinear", "weight_dtype": constant_dtype(dq.inputs[0])}

    def qdq_key(self, gemm: Gemm):
        """What two ``MatMul(x, DequantizeLinear(q, scale[, zero_point]))`` must share to be packed along
        ``N`` (``q [K, N]``; ``scale`` / ``zero_point`` blocked along K, ``[K / block, N]``, or per column,
        ``[N]`` with ``axis=1``): K, the attributes and dtypes; None for any other layout."""
        dq = self.producer(gemm.weight) if gemm.weight is not None else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in ("", _MS) or gemm.kind not in ("MatMul", "QDQ"):
            return None
        if not all(v is None or is_constant(v) for v in dq.inputs):
            return None
        attrs = _attrs(dq)
        q = constant_shape(dq.inputs[0])
        if len(q) != 2:
            return None
        axis, block = int(attrs.get("axis", 1)), int(attrs.get("block_size", 0))
        layouts = []
        for value in dq.inputs[1:]:
            if value is None:
                layouts.append(None)
                continue
            shape = constant_shape(value)
            if block and axis in (0, -2) and len(shape) == 2 and shape[1] == q[1]:
                layouts.append(("blocked", shape[0], constant_dtype(value)))
            elif not block and axis in (1, -1) and len(shape) == 1 and shape[0] == q[1]:
                layouts.append(("column", constant_dtype(value)))
            else:
                return None
        return (q[0], constant_dtype(dq.inputs[0]), dq.domain, axis, block, *layouts)

    def runtime_weight(self, gemm: Gemm):
        """``(kind, dims)`` for a GEMM's weight that is not a constant but a caller-fed value: "graph
        input" (Olive's ExtractAdapters, ONNX Runtime's multi-LoRA; a default initializer only makes
        it optional) or "dequantized" (``DequantizeLinear`` of constants); ``dims`` ``[in, out]``, a
        symbolic axis by its name (None when unnamed). None for anything else, or a transposed layout."""
        weight = gemm.weight
        if weight is None or gemm.transposed or _fused(gemm.node) or gemm.kind != "MatMul":
            return None
        source = weight
        while _default(source.producer(), "Cast", "Identity") and self.producer(source) is not None:
            source = source.producer().inputs[0]  # fed in another dtype and cast: still the caller's
        if source.is_graph_input():
            kind = "graph input"
            if weight.shape is None:
                weight = source
        else:
            dq = self.producer(weight)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in ("", _MS) or not all(v is None or is_constant(v) for v in dq.inputs):
                return None
            kind = "dequantized"
        shape = weight.shape if weight.shape is not None else (constant_shape(self.producer(weight).inputs[0]) if kind == "dequantized" else None)
        if shape is None or len(shape) != 2:
            return None
        dims = [int(d) if isinstance(d, int) else (getattr(d, "value", None) if not isinstance(d, str) else d) for d in shape]
        return kind, dims

    # ------------------------------------------------------------------ constants
    def is_constant(self, value) -> bool:
        return is_constant(value)

    def constant_array(self, value, *, transposed: bool = False):
        getter = constant_getter(value)
        return (lambda: np.ascontiguousarray(getter().T)) if transposed else getter

    def weight(self, gemm: Gemm):
        """The GEMM's constant weight as an ``[in, out]`` array getter; a FusedMatMul's ``alpha`` (read
        now, not when the getter runs: a rewrite resets it) is part of the weight, ``alpha * W``
        computed in float64 and handed out in W's dtype (float32 where W is narrower)."""
        getter = self.constant_array(gemm.weight, transposed=gemm.transposed)
        alpha = _alpha(gemm.node)
        if alpha == 1.0:
            return getter

        def scaled(getter=getter, alpha=alpha):
            stored = getter()
            dtype = stored.dtype if stored.dtype in (np.float32, np.float64) else np.dtype(np.float32)
            return (stored.astype(np.float64) * alpha).astype(dtype)

        return scaled

    def constant_shape(self, value):
        return constant_shape(value)

    def dtype(self, value) -> str:
        return constant_dtype(value)

    # ------------------------------------------------------------------ shapes and the last axis
    def last_dim(self, value):
        """The static last axis of ``value``: recorded, else read off a GEMM's constant weight or a
        last-axis slice (hand-built and partly inferred graphs leave intermediate shapes out)."""
        shape = value.shape if isinstance(value, ir.Value) else None
        if shape is not None and len(shape) and isinstance(shape[-1], int):
            return int(shape[-1])
        if shape is not None and len(shape) == 0:
            return None
        try:
            gemm = self.gemm(value)
        except Reject:
            gemm = None
        if gemm is not None:
            return gemm.shape[1] if gemm.shape is not None else None
        cut = self.last_axis_slice(value)
        return None if cut is None else cut[2] - cut[1]

    def value_dtype(self, value):
        """numpy name of ``value``'s element type: recorded, else a Cast's target, else its input's
        through ops whose output has their input's type."""
        while isinstance(value, ir.Value):
            if value.dtype is not None:
                return value.dtype.numpy().name
            node = value.producer()
            if _default(node, "Cast"):
                return ir.DataType(node.attributes["to"].value).numpy().name
            if not (_default(node, *_SAME_TYPE) or _fused(node)):
                return None
            value = node.inputs[0]
        return None

    def leading_shape(self, value):
        shape = value.shape if isinstance(value, ir.Value) else None
        return None if shape is None or len(shape) == 0 else [str(d) for d in shape[:-1]]

    def rank(self, value):
        shape = value.shape if isinstance(value, ir.Value) else None
        return None if shape is None else len(shape)

    def dims(self, value):
        """``value``'s shape: ints where static, None where symbolic; None when unknown."""
        shape = value.shape if isinstance(value, ir.Value) else None
        return None if shape is None else [d if isinstance(d, int) else None for d in shape]

    def evaluate(self, feeds, output):
        """``output`` computed from ``feeds`` ((value, array) pairs) in ONNX Runtime, by the region
        between them alone (:mod:`.onnx_eval`); raises ``RegionError``."""
        return onnx_eval.evaluate(self.model, feeds, output)

    def shape_key(self, value):
        """ONNX shapes are advisory (exporters leave them stale or missing): not used for checks."""
        return None

    def last_axis_slice(self, value):
        node = self.producer(value)
        if not _default(node, "Slice") or len(node.inputs) < 3:
            return None
        data = node.inputs[0]
        width = self.last_dim(data)
        starts, ends = _int_list(node.inputs[1]), _int_list(node.inputs[2])
        axes = _int_list(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else [0]
        steps = _int_list(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
        if width is None or None in (starts, ends, axes, steps) or not (len(starts) == len(ends) == len(axes) == len(steps) == 1):
            return None
        if axes[0] not in (-1, len(data.shape) - 1) or steps[0] != 1:
            return None
        return (data, *last_axis_bounds(starts[0], ends[0], width))

    def last_axis_concat(self, node):
        if not _default(node, "Concat") or node.attributes.get("axis") is None:
            return None
        axis = node.attributes["axis"].value
        shape = node.outputs[0].shape or next((v.shape for v in node.inputs if v is not None and v.shape is not None), None)
        if axis != -1 and (shape is None or axis != len(shape) - 1):
            return None
        return list(node.inputs)

    def last_axis_pad(self, node):
        """``(data, r)`` for a constant zero ``Pad`` of ``r`` lanes at the end of the last axis only."""
        if not _default(node, "Pad") or len(node.inputs) < 2:
            return None
        mode = node.attributes.get("mode")
        if mode is not None and mode.value != "constant":
            return None
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            getter = constant_getter(node.inputs[2])
            if getter is None or np.any(getter() != 0):
                return None
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            return None
        pads = _int_list(node.inputs[1])
        shape = node.inputs[0].shape or node.outputs[0].shape
        if pads is None or shape is None or len(pads) != 2 * len(shape):
            return None
        rank = len(shape)
        if any(p != 0 for i, p in enumerate(pads) if i != 2 * rank - 1):
            return None
        return node.inputs[0], pads[2 * rank - 1]

    def embedding(self, value):
        node = self.producer(value)
        if not _default(node, "Gather"):
            return None
        axis = node.attributes.get("axis")
        if axis is not None and axis.value != 0:
            return None
        return node.inputs[0], node.inputs[1], node

    # ================================================================== emitter
    def _name(self, base: str) -> str:
        if self._taken is None:
            main = self.model.graph
            self._taken = {v.name for v in main.initializers.values()}
            for graph in self.model.graphs():  # every graph's inputs: a loop body's iteration inputs too
                self._taken |= {v.name for v in graph.inputs}
            for node in main.all_nodes():
                self._taken.update(o.name for o in node.outputs if o.name)
                if node.name:
                    self._taken.add(node.name)
        name, n = base, 1
        while name in self._taken:
            n += 1
            name = f"{base}_{n}"
        self._taken.add(name)
        return name

    @contextlib.contextmanager
    def at(self, node, stem: str = ""):
        saved = self._anchor, getattr(self, "_stem", "")
        self._anchor, self._stem = node, f"{_PREFIX}.{stem}" if stem else _PREFIX
        try:
            yield self
        finally:
            self._anchor, self._stem = saved

    def _node(self, op: str, inputs, what: str, num_outputs: int = 1, domain: str = "", **attrs):
        name = f"{self._stem}/{what}"
        node = ir.node(op, inputs, attributes=attrs or None, domain=domain, num_outputs=num_outputs, name=self._name(name))
        for i, output in enumerate(node.outputs):
            output.name = self._name(f"{name}_out{i}" if num_outputs > 1 else f"{name}_out")
        self.graph.insert_before(self._anchor, node)
        return node

    def constant(self, name: str, array):
        name = self._name(f"{self._stem}.{name}")
        if isinstance(array, LazyArray):
            tensor = ir.LazyTensor(lambda a=array: ir.tensor(a.numpy()), dtype=ir.DataType.from_numpy(array.dtype), shape=ir.Shape(array.shape), name=name)
        else:
            tensor = ir.tensor(np.asarray(array), name=name)
        value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.model.graph.register_initializer(value)
        return value

    def resolve(self, value):
        """What ``value`` now is: a plan's handles may name values an earlier rewrite redirected
        (a LoRA add a lane host reads); reading the old one would revive the replaced subgraph."""
        seen = 0
        while isinstance(value, ir.Value) and id(value) in self._redirected and seen < 10_000:
            value, seen = self._redirected[id(value)], seen + 1
        return value

    def project(self, x, array, like=None, bias=None, name: str = "weight"):
        """``x @ array (+ bias)`` as a ``MatMul`` (and an ``Add``) reading new initializers."""
        x = self.resolve(x)
        out = self._node("MatMul", [x, self.constant(name, array)], "MatMul").outputs[0]
        return out if bias is None else self.add(out, self.constant(f"{name}_bias", bias))

    def matmul(self, a, b):
        """``a @ b`` of two values (a weight fed at run time)."""
        return self._node("MatMul", [self.resolve(a), self.resolve(b)], "MatMul").outputs[0]

    def concat_axis(self, values, axis: int):
        """``Concat`` of values (run-time weights) along ``axis``."""
        return self._node("Concat", [self.resolve(v) for v in values], "Concat", axis=axis).outputs[0]

    def pad_columns(self, value, before: int, after: int):
        """A 2-D ``value`` with ``before`` zero columns in front and ``after`` behind (``Pad``)."""
        pads = self.constant("pads", np.asarray([0, before, 0, after], dtype=np.int64))
        return self._node("Pad", [self.resolve(value), pads], "Pad", mode="constant").outputs[0]

    def nbits_project(self, x, gemms: list[Gemm]):
        """``x @ [W_1 | .. | W_n]`` as one ``MatMulNBits``: the packed B, scales, zero points and biases
        of ``gemms`` (MatMulNBits with equal :meth:`nbits_key`) concatenated along ``N``, row by row,
        as new initializers; one GEMM reads ``x`` with ``N = sum N_i``. A missing bias is zeros."""
        first = gemms[0].node
        attrs = _attrs(first)
        ns = [int(_attrs(g.node)["N"]) for g in gemms]
        inputs = [self.resolve(x)]
        for index, role in enumerate(_NBITS_OPERANDS[:3], start=1):
            values = [g.node.inputs[index] if len(g.node.inputs) > index else None for g in gemms]
            if values[0] is None:
                inputs.append(None)
                continue
            getters = [constant_getter(v) for v in values]
            shapes = [constant_shape(v) for v in values]
            one_d = len(shapes[0]) == 1
            rows = [int(np.prod(s)) // n for s, n in zip(shapes, ns)]
            tail = tuple(shapes[0][1:]) if not one_d else ()
            shape = (sum(ns) * rows[0],) if one_d else (sum(ns), *tail)
            dtype = numpy_dtype(constant_dtype(values[0]))

            def packed(getters=getters, ns=ns, shape=shape):
                return np.concatenate([np.asarray(get()).reshape(n, -1) for get, n in zip(getters, ns)], axis=0).reshape(shape)

            inputs.append(self.constant(f"packed_{role}", LazyArray(shape, dtype, packed)))
        biases = [g.node.inputs[5] if len(g.node.inputs) > 5 else None for g in gemms]
        if any(b is not None for b in biases):
            while len(inputs) < 5:
                inputs.append(None)
            scale_dtype = np.dtype(constant_dtype(first.inputs[2]))

            def bias(biases=[constant_getter(b) if b is not None else None for b in biases], ns=ns, dtype=scale_dtype):
                return np.concatenate([np.asarray(get()).reshape(n).astype(dtype) if get else np.zeros(n, dtype) for get, n in zip(biases, ns)])

            inputs.append(self.constant("packed_bias", LazyArray((sum(ns),), scale_dtype, bias)))
        while inputs and inputs[-1] is None:
            inputs.pop()
        kept = {k: v for k, v in attrs.items() if k != "N"}
        if _MS not in self.model.opset_imports:
            self.model.opset_imports[_MS] = 1
        return self._node("MatMulNBits", inputs, "MatMulNBits", domain=_MS, N=sum(ns), **kept).outputs[0]

    def qdq_project(self, x, gemms: list[Gemm]):
        """``x @ DequantizeLinear([q_1 | .. | q_n], [scale_i], [zero_point_i])``: the quantized weights of
        ``gemms`` (equal :meth:`qdq_key`) and their scales and zero points concatenated along ``N`` as
        new initializers (each column keeps its own numbers: ONNX Runtime fuses the pair into one
        MatMulNBits as it did each original)."""
        dqs = [self.producer(g.weight) for g in gemms]
        inputs = []
        for index in range(len(dqs[0].inputs)):
            values = [dq.inputs[index] for dq in dqs]
            if values[0] is None:
                inputs.append(None)
                continue
            getters = [constant_getter(v) for v in values]
            shapes = [constant_shape(v) for v in values]
            shape = (*shapes[0][:-1], sum(sh[-1] for sh in shapes))
            dtype = numpy_dtype(constant_dtype(values[0]))

            def packed(getters=getters):
                return np.concatenate([np.asarray(get()) for get in getters], axis=-1)

            inputs.append(self.constant(f"packed_{('q', 'scale', 'zero_point')[index]}", LazyArray(shape, dtype, packed)))
        first = dqs[0]
        weight = self._node("DequantizeLinear", inputs, "DequantizeLinear", domain=first.domain, **_attrs(first)).outputs[0]
        return self.matmul(x, weight)

    def nbits_apply(self, x, gemm: Gemm):
        """The MatMulNBits ``gemm`` (constants and attributes unchanged) applied to ``x``."""
        return self._node("MatMulNBits", [self.resolve(x), *gemm.node.inputs[1:]], "MatMulNBits", domain=_MS, **_attrs(gemm.node)).outputs[0]

    def add(self, a, b):
        return self._node("Add", [self.resolve(a), self.resolve(b)], "Add").outputs[0]

    def scale(self, value, factor):
        """``value * factor``: a float (a scalar of ``value``'s element type), or a per-column
        vector (an array or LazyArray of the last axis' width) as a new initializer."""
        value = self.resolve(value)
        if isinstance(factor, (int, float)):
            dtype = numpy_dtype(self.value_dtype(value) or "float32")
            factor = np.asarray(factor, dtype=dtype)
        return self._node("Mul", [value, self.constant("factor", factor)], "Mul").outputs[0]

    def split_last(self, value, sizes):
        value = self.resolve(value)
        if len(sizes) == 1:
            return [value]
        split = self.constant("split_sizes", np.asarray(sizes, dtype=np.int64))
        return list(self._node("Split", [value, split], "Split", num_outputs=len(sizes), axis=-1).outputs)

    def regroup(self, value, sizes: list[int], leading: int):
        """The last axis split into ``sizes`` (``[.., g*s] -> [.., g, s]``); ``leading``: the axes before it."""
        target = self.constant("regroup_shape", np.asarray([0] * leading + list(sizes), dtype=np.int64))
        return self._node("Reshape", [self.resolve(value), target], "Reshape").outputs[0]

    def swap_last(self, value, leading: int):
        """The last two axes swapped; ``leading``: the axes before them."""
        perm = [*range(leading), leading + 1, leading]
        return self._node("Transpose", [self.resolve(value)], "Transpose", perm=perm).outputs[0]

    def flatten_last(self, value, count: int, leading: int):
        """The last ``count`` axes as one (``[.., g, s] -> [.., g*s]``); ``leading``: the axes before them."""
        target = self.constant("flatten_shape", np.asarray([0] * leading + [-1], dtype=np.int64))
        return self._node("Reshape", [self.resolve(value), target], "Reshape").outputs[0]

    def concat_last(self, values):
        return self._node("Concat", [self.resolve(v) for v in values], "Concat", axis=-1).outputs[0]

    def gather(self, table, ids):
        return self._node("Gather", [self.resolve(table), self.resolve(ids)], "Gather", axis=0).outputs[0]

    def replace_weight(self, gemm: Gemm, array, name: str = "weight") -> None:
        """The GEMM reads ``array`` (``[in, out]``; stored transposed for ``Gemm``/``FusedMatMul``
        with ``transB=1``); ``array`` is the whole weight (:meth:`weight` included a FusedMatMul's
        ``alpha``), so a FusedMatMul's ``alpha`` becomes 1."""
        if gemm.transposed:
            array = _transposed(array)
        gemm.node.replace_input_with(1, self.constant(name, array))
        if _fused(gemm.node) and _alpha(gemm.node) != 1.0:
            gemm.node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)

    def redirect(self, old, new) -> None:
        """Every use of ``old`` (graph outputs included, which keep their names) reads ``new``."""
        new = self.resolve(new)
        if new is old:
            return
        if old.is_graph_output() and new.is_graph_output():  # two outputs keep two names: a copy for the old one
            with self.at(old.producer() or self.graph[0]):
                new = self._node("Identity", [new], "Identity").outputs[0]
        self._redirected[id(old)] = new
        was_output_name = old.name if old.is_graph_output() else None
        if new.type is None:
            new.type = old.type
        if new.shape is None:
            new.shape = old.shape
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        if was_output_name is not None:
            old.name = f"{was_output_name}.{_PREFIX}_replaced"
            new.name = was_output_name

    def cleanup(self) -> None:
        """Dead-node and unused-initializer removal, then a topological sort."""
        common_passes.RemoveUnusedNodesPass()(self.model)
        common_passes.TopologicalSortPass()(self.model)


def _transposed(array):
    if isinstance(array, LazyArray):
        return LazyArray(array.shape[::-1], array.dtype, lambda a=array: np.ascontiguousarray(a.numpy().T))
    return np.ascontiguousarray(np.asarray(array).T)
