"""Structural LoRA detection in ONNX graphs (onnx-ir).

A LoRA site is ``Add(P, C)`` in either operand order, where

- ``P = x @ W (+ bias)`` is a base projection: ``MatMul`` or ``Gemm`` with a constant 2-D weight,
  optionally followed by an ``Add`` of a constant bias;
- ``C = s * ((x @ A) @ B)`` is a low-rank chain: two ``MatMul``/``Gemm`` with constant ``A: [in, r]``
  and ``B: [r, out]``, optional constant scalar ``Mul``/``Div`` (either operand order, before or
  after ``B``), optional ``Cast``/``Identity``;
- both read the same tensor ``x`` (up to ``Cast``/``Identity``) and ``r`` is small relative to
  ``in`` and ``out``.

Names never decide anything; they only label sites. Every ``Add`` that has a low-rank chain on
one side but fails a check becomes a :class:`Rejection` with the reason, and is left alone.
"""

from __future__ import annotations

import ast
import dataclasses
import re

import numpy as np
import onnx_ir as ir

from zflora_compile.passes.onnx_constants import (
    constant_dtype,
    constant_getter,
    constant_shape,
    is_constant,
    scalar_value,
)
from zflora_compile.graph.records import DEFAULT_MAX_RANK_RATIO, AdapterSite, Detection, Rejection

_PASS_THROUGH = {"Cast", "Identity"}
_GEMM_OPS = {"MatMul", "Gemm"}


@dataclasses.dataclass
class OnnxLoraBinding:
    """What the ONNX rewriter needs to apply a plan to one site."""

    add: ir.Node
    base: ir.Node
    base_input: ir.Value
    base_output: ir.Value  # after the bias Add when there is one
    weight: ir.Value
    weight_transposed: bool  # Gemm with transB=1: the weight input is [out, in]
    bias_add: ir.Node | None
    chain_nodes: list[ir.Node]
    lowrank_b: ir.Node  # the GEMM applying B; zeroing its weight disables the adapter


class _NotACandidate(Exception):
    """The structure is not shaped like an adapter at all: nothing to report."""


class _Reject(Exception):
    """The structure is shaped like an adapter but a check failed: reported with the reason."""


def _node_label(node: ir.Node | None) -> str:
    return (node.name or node.op_type) if node is not None else "<graph input>"


def _peel_pass_through(value: ir.Value) -> ir.Value:
    node = value.producer()
    while node is not None and node.op_type in _PASS_THROUGH and node.domain == "":
        value = node.inputs[0]
        node = value.producer()
    return value


def _scale_of(node: ir.Node) -> tuple[ir.Value, float] | None:
    """For ``Mul``/``Div`` by a constant scalar: (the other operand, the factor it applies)."""
    if node.op_type not in ("Mul", "Div") or node.domain != "" or len(node.inputs) != 2:
        return None
    left, right = node.inputs
    orders = [(left, right), (right, left)] if node.op_type == "Mul" else [(left, right)]
    for data, factor in orders:
        if is_constant(data):
            continue
        value = scalar_value(factor)
        if value is None:
            continue
        if node.op_type == "Div":
            return (data, 1.0 / value) if value != 0 else None
        return data, value
    return None


def _walk_back(value: ir.Value, nodes: list[ir.Node]) -> tuple[ir.Value, float]:
    """Walk up through Cast/Identity and scalar Mul/Div; return the value reached and the scale."""
    scale = 1.0
    while True:
        node = value.producer()
        if node is None or node.domain != "":
            return value, scale
        if node.op_type in _PASS_THROUGH:
            nodes.append(node)
            value = node.inputs[0]
            continue
        scaled = _scale_of(node)
        if scaled is None:
            return value, scale
        nodes.append(node)
        value, scale = scaled[0], scale * scaled[1]


_ACTIVATIONS = {
    "Relu", "LeakyRelu", "PRelu", "Tanh", "Sigmoid", "HardSigmoid", "HardSwish", "Gelu", "Erf",
    "Elu", "Selu", "Celu", "Softplus", "Softsign", "Mish", "Exp", "Log", "Abs", "ThresholdedRelu",
}


def _activation_input(node: ir.Node | None) -> ir.Value | None:
    """The input of an elementwise nonlinearity (incl. SiLU as ``Mul(t, Sigmoid(t))``), or None."""
    if node is None or node.domain not in ("", "com.microsoft"):
        return None
    if node.op_type in _ACTIVATIONS or (node.domain == "com.microsoft" and node.op_type in ("FastGelu", "QuickGelu", "BiasGelu")):
        return node.inputs[0]
    if node.op_type == "Mul" and len(node.inputs) == 2:
        for data, gate in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
            producer = gate.producer() if gate is not None else None
            if producer is not None and producer.op_type == "Sigmoid" and producer.inputs[0] is data:
                return data
    return None


def _gemm_operands(node: ir.Node) -> tuple[ir.Value, ir.Value, bool, ir.Value | None]:
    """(x, weight, weight_is_transposed, bias) of a MatMul or a plain Gemm."""
    if node.op_type == "MatMul":
        return node.inputs[0], node.inputs[1], False, None
    attrs = {k: a.value for k, a in node.attributes.items()}
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
        raise _Reject(f"Gemm node '{_node_label(node)}' has transA or alpha != 1")
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and attrs.get("beta", 1.0) != 1.0:
        raise _Reject(f"Gemm node '{_node_label(node)}' has beta != 1")
    return node.inputs[0], node.inputs[1], bool(attrs.get("transB", 0)), bias


def _is_gemm(node: ir.Node | None) -> bool:
    return node is not None and node.op_type in _GEMM_OPS and node.domain == ""


def _single_use(value: ir.Value, consumer: ir.Node, what: str) -> None:
    users = {id(user) for user, _ in value.uses()}
    if users != {id(consumer)} or value.is_graph_output():
        others = [_node_label(u) for u, _ in value.uses() if u is not consumer]
        where = f"node '{others[0]}'" if others else "a graph output"
        raise _Reject(f"{what} '{value.name}' is also used by {where}")


@dataclasses.dataclass
class _Chain:
    a_node: ir.Node
    b_node: ir.Node
    a: ir.Value
    b: ir.Value
    a_transposed: bool
    b_transposed: bool
    scale: float
    source: ir.Value
    nodes: list[ir.Node]


def _match_chain(value: ir.Value) -> _Chain:
    """``s * ((x @ A) @ B)`` ending at ``value``; raises _NotACandidate or _Reject."""
    nodes: list[ir.Node] = []
    reached, scale_after = _walk_back(value, nodes)
    b_node = reached.producer()
    if not _is_gemm(b_node):
        raise _NotACandidate
    z, b, b_t, b_bias = _gemm_operands(b_node)
    nodes.append(b_node)
    reached, scale_between = _walk_back(z, nodes)
    a_node = reached.producer()
    if not _is_gemm(a_node):
        inner = _activation_input(a_node)
        if inner is not None and _is_gemm(_walk_back(inner, [])[0].producer()):
            raise _Reject(
                f"'{a_node.op_type}' node '{_node_label(a_node)}' sits between the low-rank GEMMs "
                f"'{_node_label(_walk_back(inner, [])[0].producer())}' and '{_node_label(b_node)}' (not linear)"
            )
        raise _NotACandidate
    x, a, a_t, a_bias = _gemm_operands(a_node)
    nodes.append(a_node)
    if a_bias is not None or b_bias is not None:
        raise _Reject(f"low-rank GEMM '{_node_label(a_node if a_bias else b_node)}' has a bias")
    for weight, node, role in ((a, a_node, "A"), (b, b_node, "B")):
        if not is_constant(weight):
            producer = weight.producer()
            by = f"produced by node '{_node_label(producer)}'" if producer else "a graph input"
            raise _Reject(f"low-rank {role} '{weight.name}' of '{_node_label(node)}' is not constant ({by})")
    return _Chain(a_node, b_node, a, b, a_t, b_t, scale_after * scale_between, _peel_pass_through(x), nodes)


def _matrix_shape(value: ir.Value, transposed: bool, role: str, node: ir.Node) -> tuple[int, int]:
    shape = constant_shape(value)
    if len(shape) != 2:
        raise _Reject(f"{role} '{value.name}' of '{_node_label(node)}' is not 2-D (shape {list(shape)})")
    return (shape[1], shape[0]) if transposed else (shape[0], shape[1])


def _oriented(getter, transposed: bool):
    return (lambda: np.ascontiguousarray(getter().T)) if transposed else getter


_SCOPE_STRIP = re.compile(r"(^|\.)(base_model\.model|base_layer|lora_[AB]\.[^.]+|default)(?=\.|$)")


def _label(node: ir.Node, weight: ir.Value) -> str:
    """A human label for reports: the module path the exporter recorded, else a node/weight name."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            parts = ast.literal_eval(scopes)
            module = next((p for p in reversed(parts[:-1]) if p), "")
        except (ValueError, SyntaxError):
            module = ""
        if module:
            return _clean_label(module)
    name = node.name or ""
    if "/" in name:
        return _clean_label(".".join(p for p in name.split("/")[:-1] if p))
    root = weight
    while root.producer() is not None and root.producer().op_type in ("Transpose", "Cast", "Identity"):
        root = root.producer().inputs[0]
    return _clean_label(root.name or name)


def _clean_label(text: str) -> str:
    text = re.sub(r"\.weight$", "", text)
    text = _SCOPE_STRIP.sub("", text)
    while re.match(r"^(m|model)\.model\.", text):
        text = text.split(".", 1)[1]
    return text.strip(".")


@dataclasses.dataclass
class _Projection:
    """``x @ W (+ bias)``: a MatMul/Gemm with a constant weight, optionally followed by a bias Add."""

    node: ir.Node
    x: ir.Value
    weight: ir.Value
    transposed: bool
    bias: ir.Value | None
    bias_add: ir.Node | None

    @property
    def output(self) -> ir.Value:
        """The projection's result (after the bias Add when there is one)."""
        return (self.bias_add or self.node).outputs[0]


def _match_projection(base_value: ir.Value) -> _Projection:
    """The projection producing ``base_value``; raises _Reject when it is something else."""
    bias = None
    bias_add = None
    producer = base_value.producer()
    if producer is not None and producer.op_type == "Add" and producer.domain == "":
        for data, const in ((producer.inputs[0], producer.inputs[1]), (producer.inputs[1], producer.inputs[0])):
            if not is_constant(data) and is_constant(const) and _is_gemm(data.producer()):
                bias_add, bias = producer, const
                _single_use(data, producer, "base projection output")
                producer = data.producer()
                break
    if not _is_gemm(producer):
        what = f"'{producer.op_type}' node '{_node_label(producer)}'" if producer else "a graph input"
        raise _Reject(f"low-rank chain is added to {what}, not to a projection with a constant weight")
    base = producer
    x, w, w_t, gemm_bias = _gemm_operands(base)
    if gemm_bias is not None:
        if bias is not None:
            raise _Reject(f"base projection '{_node_label(base)}' has two biases")
        bias = gemm_bias
    if not is_constant(w):
        producer_w = w.producer()
        by = f"produced by node '{_node_label(producer_w)}'" if producer_w else "a graph input"
        raise _Reject(f"base weight '{w.name}' of '{_node_label(base)}' is not constant ({by})")
    if bias is not None and not is_constant(bias):
        raise _Reject(f"bias of '{_node_label(base)}' is not constant")
    return _Projection(base, x, w, w_t, bias, bias_add)


def _match_site(add: ir.Node, base_value: ir.Value, chain: _Chain, max_rank_ratio: float, index: int) -> AdapterSite:
    projection = _match_projection(base_value)
    base, x, w, w_t, bias, bias_add = (
        projection.node, projection.x, projection.weight, projection.transposed, projection.bias, projection.bias_add,
    )
    base_nodes = [bias_add] if bias_add is not None else []
    if _peel_pass_through(x) is not chain.source:
        raise _Reject(
            f"low-rank chain reads '{chain.source.name}' but the projection '{_node_label(base)}' "
            f"it is added to reads '{_peel_pass_through(x).name}'"
        )
    _single_use(base.outputs[0], bias_add or add, "base projection output")
    # chain nodes were collected walking backwards: nodes[i] feeds nodes[i-1], nodes[0] feeds the Add
    for i, chain_node in enumerate(chain.nodes):
        _single_use(chain_node.outputs[0], chain.nodes[i - 1] if i else add, "low-rank intermediate")
    in_w, out_w = _matrix_shape(w, w_t, "weight", base)
    in_a, rank = _matrix_shape(chain.a, chain.a_transposed, "A", chain.a_node)
    rank_b, out_b = _matrix_shape(chain.b, chain.b_transposed, "B", chain.b_node)
    if (in_a, rank_b, out_b) != (in_w, rank, out_w):
        raise _Reject(
            f"shapes do not line up at '{_node_label(add)}': W [{in_w}, {out_w}], "
            f"A [{in_a}, {rank}], B [{rank_b}, {out_b}]"
        )
    if rank > max_rank_ratio * min(in_w, out_w):
        raise _Reject(
            f"rank {rank} is not small relative to W [{in_w}, {out_w}] "
            f"(limit {max_rank_ratio:g} x {min(in_w, out_w)})"
        )
    if bias is not None:
        bias_shape = constant_shape(bias)
        if int(np.prod(bias_shape)) != out_w or (bias_shape and bias_shape[-1] != out_w):
            raise _Reject(f"bias of '{_node_label(base)}' has shape {list(bias_shape)}, not [{out_w}]")
    out = add.outputs[0]
    label = _label(base, w)
    dtype = constant_dtype(w)
    bias_getter = constant_getter(bias) if bias is not None else None
    binding = OnnxLoraBinding(
        add=add,
        base=base,
        base_input=x,
        base_output=(bias_add or base).outputs[0],
        weight=w,
        weight_transposed=w_t,
        bias_add=bias_add,
        chain_nodes=list(chain.nodes),
        lowrank_b=chain.b_node,
    )
    return AdapterSite(
        site_id=f"lora{index}",
        family="lora",
        label=label,
        input_name=x.name or "",
        output_name=out.name or "",
        in_features=in_w,
        out_features=out_w,
        rank=rank,
        scale=chain.scale,
        dtype=dtype,
        has_bias=bias is not None,
        nodes=[_node_label(n) for n in [base, *base_nodes, *reversed(chain.nodes), add]],
        weight=_oriented(constant_getter(w), w_t),
        lora_a=_oriented(constant_getter(chain.a), chain.a_transposed),
        lora_b=_oriented(constant_getter(chain.b), chain.b_transposed),
        bias=(lambda g=bias_getter, n=out_w: g().reshape(n)) if bias_getter else None,
        binding=binding,
    )


def detect_lora(graph: ir.Graph, *, max_rank_ratio: float = DEFAULT_MAX_RANK_RATIO) -> Detection:
    """Find every LoRA site in ``graph`` (see the module docstring for the pattern)."""
    sites: list[AdapterSite] = []
    rejections: list[Rejection] = []
    for node in graph:
        if node.op_type != "Add" or node.domain != "" or len(node.inputs) != 2:
            continue
        reasons = []
        for base_index, chain_index in ((0, 1), (1, 0)):
            try:
                chain = _match_chain(node.inputs[chain_index])
                site = _match_site(node, node.inputs[base_index], chain, max_rank_ratio, len(sites))
            except _NotACandidate:
                continue
            except _Reject as reject:
                reasons.append(str(reject))
                continue
            sites.append(site)
            break
        else:
            if reasons:
                rejections.append(Rejection(node=_node_label(node), reason=reasons[0]))
    _assign_groups(sites)
    return Detection(sites, rejections)


def _assign_groups(sites: list[AdapterSite]) -> None:
    """Sites whose base projections read the same tensor form one group (QKV, gate/up)."""
    by_input: dict[int, list[AdapterSite]] = {}
    for site in sites:
        by_input.setdefault(id(site.binding.base_input), []).append(site)
    for number, members in enumerate(by_input.values()):
        for site in members:
            site.group = f"g{number}"
