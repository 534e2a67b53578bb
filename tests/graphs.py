"""Hand-built onnx-ir graphs of LoRA projections, for the rule tests.

:func:`lora_projection_graph` builds one "layer slice": a set of projections ``y_i = x @ W_i (+ b_i)``
reading float activations, each optionally with an unfused LoRA chain
``s_i * ((x @ A_i) @ B_i)`` added to it, in the many spellings exporters produce (MatMul or Gemm,
bias Add in either order, scale as Mul or Div before or after B, Casts around the chain, weights
behind Transpose or Constant nodes...). It also builds the near-misses the detector must leave
alone (a nonlinearity in the chain, a non-constant weight, mismatched shapes...).

Weights are seeded numpy arrays in ``[in, out]`` layout; the builder returns them next to the
model so a test can build its own reference without going through the package. ``zero_b=True``
builds the same graph with the same weights except every B is zero: the independent reference
for the ``strip`` strategy.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import onnx
import onnx_ir as ir

OPSET = 18
IR_VERSION = 9
GEMM_OPS = ("MatMul", "Gemm")


@dataclasses.dataclass
class Proj:
    """One projection of the slice and its (optional) adapter."""

    name: str = "q_proj"
    out: int = 8
    rank: int | None = 2  # None: a plain projection with no adapter
    scale: float = 2.0
    bias: str | None = None  # None | "add" (Add(P, b)) | "add_rev" (Add(b, P)) | "gemm" (Gemm's C input)
    reads: str = "hidden"  # graph input the base projection reads
    # ---- near-misses (all default to a well-formed adapter) ----
    chain_reads: str | None = None  # graph input the chain reads (default: same as ``reads``)
    between: str | None = None  # a unary op ("Relu", "Tanh") between the A and B GEMMs
    graph_input: str | None = None  # "A" | "B" | "W": that weight is a graph input, not a constant
    b_out: int | None = None  # B's output width (default ``out``): != out makes shapes not line up
    z_extra_use: bool = False  # x @ A also feeds a ReduceSum that is a graph output
    base_extra_use: bool = False  # x @ W also feeds a ReduceSum that is a graph output
    add_to_input: bool = False  # no base projection: the chain is added to the raw input itself


@dataclasses.dataclass
class ProjWeights:
    """The numbers behind one projection, ``[in, out]`` layout, in the model's dtypes."""

    spec: Proj
    name: str
    W: np.ndarray | None
    A: np.ndarray | None
    B: np.ndarray | None
    scale: float
    bias: np.ndarray | None
    output: str


@dataclasses.dataclass
class LoraGraph:
    model: ir.Model
    projections: list[ProjWeights]

    @property
    def adapted(self) -> list[ProjWeights]:
        return [p for p in self.projections if p.A is not None]

    def proto(self) -> onnx.ModelProto:
        return ir.to_proto(self.model)


class GraphBuilder:
    """A few conveniences over onnx-ir for writing small graphs by hand."""

    def __init__(self, opset: int = OPSET):
        self.opset = opset
        self.inputs: list[ir.Value] = []
        self.outputs: list[ir.Value] = []
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []
        self._count = 0

    def input(self, name: str, shape: Sequence[int | str], dtype: np.dtype) -> ir.Value:
        value = ir.Value(name=name, shape=ir.Shape(list(shape)), type=ir.TensorType(ir.DataType.from_numpy(np.dtype(dtype))))
        self.inputs.append(value)
        return value

    def output(self, value: ir.Value, name: str, dtype: np.dtype, shape: Sequence[int | str]) -> ir.Value:
        value.name = name
        value.type = ir.TensorType(ir.DataType.from_numpy(np.dtype(dtype)))
        value.shape = ir.Shape(list(shape))
        self.outputs.append(value)
        return value

    def initializer(self, name: str, array: np.ndarray) -> ir.Value:
        tensor = ir.tensor(np.asarray(array), name=name)
        value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.initializers.append(value)
        return value

    def const(self, name: str, array: np.ndarray, form: str = "initializer") -> ir.Value:
        """``array`` as a graph value: an initializer, a Constant node, or Transpose(initializer of array.T)."""
        array = np.asarray(array)
        if form == "initializer":
            return self.initializer(name, array)
        if form == "constant":
            return self.op("Constant", [], f"{name}/Constant", value=ir.tensor(array, name=name))
        if form == "transpose":
            stored = self.initializer(f"{name}.stored_transposed", np.ascontiguousarray(array.T))
            return self.op("Transpose", [stored], f"{name}/Transpose", perm=[1, 0])
        raise ValueError(f"unknown constant form {form!r}")

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], name: str | None = None, _outputs: int = 1, **attributes):
        """One node; its output (or, with ``_outputs`` > 1, the list of its outputs)."""
        self._count += 1
        node = ir.node(op_type, list(inputs), attributes=attributes or None, num_outputs=_outputs, name=name or f"{op_type}_{self._count}")
        for i, output in enumerate(node.outputs):
            output.name = f"{node.name}_out" if _outputs == 1 else f"{node.name}_out{i}"
        self.nodes.append(node)
        return node.outputs[0] if _outputs == 1 else list(node.outputs)

    def model(self, name: str = "handbuilt") -> ir.Model:
        graph = ir.Graph(
            self.inputs,
            self.outputs,
            nodes=self.nodes,
            initializers=self.initializers,
            opset_imports={"": self.opset},
            name=name,
        )
        return ir.Model(graph, ir_version=IR_VERSION, producer_name="tests.graphs")


_ONNX_DTYPE = {np.dtype("float32"): ir.DataType.FLOAT, np.dtype("float16"): ir.DataType.FLOAT16}


def lora_projection_graph(
    projections: Sequence[Proj] | None = None,
    *,
    in_features: int = 16,
    base_op: str = "MatMul",  # "MatMul" | "Gemm" (transB=1, weight stored [out, in])
    lowrank_op: str = "MatMul",  # "MatMul" | "Gemm" (transB=1) for both low-rank GEMMs
    scale_op: str | None = "Mul",  # "Mul" | "Div" | None (no scale node, s = 1)
    scale_pos: str = "after",  # "after" B | "between" A and B
    scale_const_first: bool = False,  # Mul(s, chain) / Div(c, chain)
    chain_first: bool = False,  # Add(chain, projection) instead of Add(projection, chain)
    dtype: str = "float32",  # the model's dtype (activations, base weights)
    chain_dtype: str | None = None,  # the chain's dtype; != dtype puts Casts around the chain
    weight_form: str = "initializer",  # "initializer" | "constant" | "transpose" (W, A, B and the scale)
    base_weight_form: str | None = None,  # override ``weight_form`` for the base weights W only
    activation_rank: int = 3,  # 3: [1, "seq", in]; 2: ["seq", in]
    site_outputs: bool = True,  # True: the site's Add output is a graph output; False: a Tanh reads it
    prefix: str = "layers.0.self_attn.",
    zero_b: bool = False,
    seed: int = 0,
) -> LoraGraph:
    """Projections reading float activations (``hidden``), with LoRA chains added to them."""
    projections = list(projections) if projections is not None else [Proj()]
    if "Gemm" in (base_op, lowrank_op) and activation_rank != 2:
        raise ValueError("Gemm needs 2-D activations: pass activation_rank=2")
    dtype_np = np.dtype(dtype)
    chain_np = np.dtype(chain_dtype or dtype)
    rng = np.random.default_rng(seed)
    gb = GraphBuilder()
    seq_shape = [1, "seq"] if activation_rank == 3 else ["seq"]
    inputs: dict[str, ir.Value] = {}

    def activation(name: str) -> ir.Value:
        if name not in inputs:
            inputs[name] = gb.input(name, [*seq_shape, in_features], dtype_np)
        return inputs[name]

    def weight(name: str, array: np.ndarray, op: str, force_input: bool, form: str = weight_form) -> ir.Value:
        """``array`` ([in, out]) as the second operand of ``op`` (Gemm: transB=1, so stored [out, in])."""
        operand = np.ascontiguousarray(array.T) if op == "Gemm" else array
        if force_input:
            return gb.input(name, list(operand.shape), operand.dtype)
        return gb.const(name, operand, form)

    def gemm(op: str, x: ir.Value, w: ir.Value, name: str, c: ir.Value | None = None) -> ir.Value:
        if op == "Gemm":
            return gb.op("Gemm", [x, w] if c is None else [x, w, c], name, transB=1)
        assert c is None
        return gb.op("MatMul", [x, w], name)

    def scalar(name: str, value: float) -> ir.Value:
        form = "constant" if weight_form == "constant" else "initializer"
        return gb.const(name, np.array(value, dtype=chain_np), form)

    def apply_scale(t: ir.Value, s: float, stem: str) -> ir.Value:
        if scale_op is None:
            return t
        if scale_op == "Mul":
            c = scalar(f"{stem}.scaling", s)
            return gb.op("Mul", [c, t] if scale_const_first else [t, c], f"{stem}/Mul")
        c = scalar(f"{stem}.inv_scaling", 1.0 / s)
        return gb.op("Div", [c, t] if scale_const_first else [t, c], f"{stem}/Div")

    built: list[ProjWeights] = []
    for p in projections:
        stem = prefix + p.name
        x = activation(p.reads)
        W = (rng.standard_normal((in_features, p.out)) / np.sqrt(in_features)).astype(dtype_np)
        bias = (rng.standard_normal(p.out) * 0.1).astype(dtype_np) if p.bias else None
        A = B = None
        if p.rank is not None:
            A = (rng.standard_normal((in_features, p.rank)) / np.sqrt(in_features)).astype(chain_np)
            B = (rng.standard_normal((p.rank, p.b_out or p.out)) * 0.3).astype(chain_np)
            if zero_b:
                B = np.zeros_like(B)

        # ---- base projection ----
        base = None
        if not p.add_to_input:
            w = weight(f"{stem}.weight", W, base_op, p.graph_input == "W", base_weight_form or weight_form)
            c = gb.initializer(f"{stem}.bias", bias) if p.bias == "gemm" else None
            if p.bias == "gemm" and base_op != "Gemm":
                raise ValueError("bias='gemm' needs base_op='Gemm'")
            base = gemm(base_op, x, w, f"{stem}/{base_op}", c)
            if p.base_extra_use:
                gb.output(gb.op("ReduceSum", [base], f"{stem}/ReduceSumBase", keepdims=1), f"{p.name}_base_sum", dtype_np, [1] * activation_rank)
            if p.bias in ("add", "add_rev"):
                b = gb.initializer(f"{stem}.bias", bias)
                base = gb.op("Add", [base, b] if p.bias == "add" else [b, base], f"{stem}/AddBias")
        else:
            W = None
            base = x

        # ---- low-rank chain ----
        if p.rank is None:
            y = base
        else:
            t = activation(p.chain_reads or p.reads)
            if chain_np != dtype_np:
                t = gb.op("Cast", [t], f"{stem}/lora_A/CastIn", to=_ONNX_DTYPE[chain_np])
            a = weight(f"{stem}.lora_A.default.weight", A, lowrank_op, p.graph_input == "A")
            z = gemm(lowrank_op, t, a, f"{stem}/lora_A/{lowrank_op}")
            if p.z_extra_use:
                gb.output(gb.op("ReduceSum", [z], f"{stem}/ReduceSumZ", keepdims=1), f"{p.name}_z_sum", chain_np, [1] * activation_rank)
            if p.between:
                z = gb.op(p.between, [z], f"{stem}/{p.between}")
            if scale_pos == "between":
                z = apply_scale(z, p.scale, stem)
            bw = weight(f"{stem}.lora_B.default.weight", B, lowrank_op, p.graph_input == "B")
            chain = gemm(lowrank_op, z, bw, f"{stem}/lora_B/{lowrank_op}")
            if scale_pos == "after":
                chain = apply_scale(chain, p.scale, stem)
            if chain_np != dtype_np:
                chain = gb.op("Cast", [chain], f"{stem}/lora_B/CastOut", to=_ONNX_DTYPE[dtype_np])
            y = gb.op("Add", [chain, base] if chain_first else [base, chain], f"{stem}/AddLoRA")
        if not site_outputs:
            y = gb.op("Tanh", [y], f"{stem}/Consumer")
        gb.output(y, p.name, dtype_np, [*seq_shape, p.out])
        built.append(ProjWeights(p, p.name, W, A, B, p.scale if scale_op else 1.0, bias, p.name))
    return LoraGraph(gb.model(), built)


def qkv(ranks=(2, 3, 4), outs=(16, 8, 24), scales=(2.0, 0.5, 1.75), biases=(None, None, None), **extra) -> list[Proj]:
    """Q, K, V reading the same input, with per-projection ranks / widths / scales (rank None: no adapter)."""
    return [
        Proj(name, out=o, rank=r, scale=s, bias=b, **extra)
        for name, o, r, s, b in zip(("q_proj", "k_proj", "v_proj"), outs, ranks, scales, biases)
    ]


def gemm_count(model: ir.Model | onnx.ModelProto) -> int:
    if isinstance(model, onnx.ModelProto):
        return sum(n.op_type in GEMM_OPS for n in model.graph.node)
    return sum(n.op_type in GEMM_OPS for n in model.graph.all_nodes())
