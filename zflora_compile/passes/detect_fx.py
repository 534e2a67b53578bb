"""Structural LoRA detection in torch.fx graphs (torch.export programs and aten GraphModules).

The FX twin of :mod:`zflora_compile.passes.detect_onnx`. A LoRA site is ``aten.add(P, C)`` in
either operand order, where

- ``P = x @ W (+ bias)`` is a base projection: ``aten.linear`` (weight ``[out, in]``),
  ``aten.mm`` / ``aten.matmul`` (weight ``[in, out]``, possibly ``t``/``permute``/``transpose`` of an
  ``[out, in]`` constant) or ``aten.addmm`` (bias folded in), optionally followed by an
  ``aten.add`` of a constant bias;
- ``C = s * ((x @ A) @ B)``: two such GEMMs with constant ``A`` and ``B``, optional scalar
  ``mul``/``div`` (either operand order, before or after ``B``), optional dtype casts
  (``_to_copy``, ``to``) and views that only flatten/unflatten leading axes (what
  ``run_decompositions`` writes around ``mm``);
- both read the same tensor ``x`` (up to casts and leading-axis views) and the rank is small.

Constants are parameters, buffers and lifted constants reached through the program's
``graph_signature`` (placeholders), or ``get_attr`` nodes of a GraphModule. Names never decide
anything: the PEFT module path in the node's ``nn_module_stack`` only labels the site. Every add
with a low-rank chain on one side that fails a check becomes a :class:`Rejection`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable

import numpy as np
import torch
from torch.fx import Node

from zflora_compile.passes.detect_onnx import DEFAULT_MAX_RANK_RATIO, Detection, _clean_label, _NotACandidate, _Reject
from zflora_compile.graph.records import AdapterSite, Rejection

__all__ = ["DEFAULT_MAX_RANK_RATIO", "FxConstants", "FxLoraBinding", "detect_lora_fx", "op_name", "torch_dtype_name"]

_CASTS = {"_to_copy", "to", "convert_element_type", "type_as"}
_IDENTITY = {"clone", "contiguous", "alias", "detach", "lift_fresh_copy"}
_VIEWS = {"view", "reshape", "_unsafe_view"}
_TRANSPOSES = {"t", "permute", "transpose", "numpy_T"}
_GEMMS = {"linear", "mm", "addmm", "matmul"}
_ASSERTS = {"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size", "_assert_async"}
_ACTIVATIONS = {
    "relu", "relu_", "gelu", "silu", "sigmoid", "tanh", "elu", "selu", "celu", "leaky_relu", "hardswish",
    "hardsigmoid", "hardtanh", "relu6", "softplus", "mish", "exp", "log", "abs", "prelu", "softsign", "erf",
}


def op_name(node: Node) -> str:
    """``relu`` for ``aten.relu.default`` (call_function nodes on aten/prims ops), else ''."""
    if node.op != "call_function":
        return ""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        namespace, _, name = target._schema.name.partition("::")
        return name if namespace in ("aten", "prims") else ""
    return ""


def _is_assert(node: Node) -> bool:
    return op_name(node) in _ASSERTS


def real_users(node: Node) -> list[Node]:
    """Users that consume the value (metadata assertions do not)."""
    return [u for u in node.users if not _is_assert(u)]


def torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _val(node) -> torch.Tensor | None:
    if not isinstance(node, Node):
        return None
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def _same_last_dim(node: Node) -> bool:
    """A view whose input and output have the same (static) last axis: only leading axes change."""
    src, out = _val(node.args[0]) if node.args else None, _val(node)
    if src is None or out is None or src.dim() == 0 or out.dim() == 0:
        return False
    a, b = src.shape[-1], out.shape[-1]
    return isinstance(a, int) and isinstance(b, int) and a == b


def _is_cast(node: Node) -> bool:
    name = op_name(node)
    if name in _CASTS:
        return True
    return name == "dropout" and (len(node.args) > 2 and node.args[2] is False or (len(node.args) > 1 and node.args[1] == 0))


def peel(node, *, casts: bool = True):
    """Walk up through casts/identities and leading-axis views."""
    while isinstance(node, Node):
        name = op_name(node)
        if name in _IDENTITY or (casts and _is_cast(node)) or (name in _VIEWS and _same_last_dim(node)):
            node = node.args[0]
            continue
        return node
    return node


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

    def _attr(self, target: str) -> torch.Tensor:
        return functools.reduce(getattr, target.split("."), self.gm)

    def getter(self, node: Node) -> Callable[[], torch.Tensor]:
        """A function computing ``node``'s value (for a node with :meth:`is_constant`)."""
        if node.op == "placeholder":
            return self.placeholders[node.name]
        if node.op == "get_attr":
            return lambda t=node.target: self._attr(t).detach()
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
        out = _val(node)
        if out is not None:
            return lambda dtype=out.dtype: inner().to(dtype)
        dtype = node.kwargs.get("dtype") or (node.args[1] if len(node.args) > 1 and isinstance(node.args[1], torch.dtype) else None)
        return (lambda: inner().to(dtype)) if dtype is not None else inner

    def shape_dtype(self, node: Node) -> tuple[tuple[int, ...], torch.dtype]:
        val = _val(node)
        if val is not None and all(isinstance(d, int) for d in val.shape):
            return tuple(val.shape), val.dtype
        value = self.getter(node)()
        return tuple(value.shape), value.dtype


@dataclasses.dataclass
class _Gemm:
    node: Node
    kind: str  # linear | mm | addmm | matmul
    x: Node
    weight: Node
    weight_index: int
    bias: Node | None

    @property
    def transposed(self) -> bool:
        """The weight operand is ``[out, in]`` (``linear``), not ``[in, out]``."""
        return self.kind == "linear"


def _gemm(node) -> _Gemm | None:
    if not isinstance(node, Node):
        return None
    name = op_name(node)
    if name not in _GEMMS:
        return None
    args = node.args
    if name == "linear":
        bias = args[2] if len(args) > 2 else node.kwargs.get("bias")
        return _Gemm(node, name, args[0], args[1], 1, bias)
    if name == "addmm":
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            raise _Reject(f"addmm node '{node.name}' has alpha or beta != 1")
        return _Gemm(node, name, args[1], args[2], 2, args[0])
    weight = _val(args[1])
    if name == "matmul" and (weight is None or weight.dim() != 2):
        return None
    return _Gemm(node, name, args[0], args[1], 1, None)


def _label_of(node: Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1]
    path = path[0] if isinstance(path, tuple) else str(path)
    return _clean_label(re.sub(r"^L__self__\.?", "", path))


def _scalar(value, constants: FxConstants) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Node) and constants.is_constant(value):
        shape, _ = constants.shape_dtype(value)
        if int(np.prod(shape)) == 1:
            return float(constants.getter(value)().reshape(()).item())
    return None


def _scale_of(node: Node, constants: FxConstants) -> tuple[Node, float] | None:
    name = op_name(node)
    if name not in ("mul", "div") or len(node.args) != 2:
        return None
    if name == "div" and node.kwargs.get("rounding_mode") is not None:
        return None
    left, right = node.args
    orders = [(left, right), (right, left)] if name == "mul" else [(left, right)]
    for data, factor in orders:
        if not isinstance(data, Node) or constants.is_constant(data):
            continue
        value = _scalar(factor, constants)
        if value is None:
            continue
        if name == "div":
            return (data, 1.0 / value) if value != 0 else None
        return data, value
    return None


def _walk_back(node, constants: FxConstants, nodes: list[Node]) -> tuple[Node, float]:
    scale = 1.0
    while isinstance(node, Node):
        name = op_name(node)
        if name in _IDENTITY or _is_cast(node) or (name in _VIEWS and _same_last_dim(node)):
            nodes.append(node)
            node = node.args[0]
            continue
        scaled = _scale_of(node, constants)
        if scaled is None:
            break
        nodes.append(node)
        node, scale = scaled[0], scale * scaled[1]
    return node, scale


def _activation_input(node) -> Node | None:
    if not isinstance(node, Node):
        return None
    name = op_name(node)
    if name in _ACTIVATIONS and node.args and isinstance(node.args[0], Node):
        return node.args[0]
    if name == "mul" and len(node.args) == 2:  # SiLU as x * sigmoid(x)
        for data, gate in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
            if isinstance(gate, Node) and op_name(gate) == "sigmoid" and gate.args[0] is data:
                return data
    return None


@dataclasses.dataclass
class _Chain:
    a: _Gemm
    b: _Gemm
    scale: float
    source: Node
    nodes: list[Node]


def _match_chain(node, constants: FxConstants) -> _Chain:
    nodes: list[Node] = []
    reached, scale_after = _walk_back(node, constants, nodes)
    b = _gemm(reached)
    if b is None:
        raise _NotACandidate
    nodes.append(b.node)
    reached, scale_between = _walk_back(b.x, constants, nodes)
    a = _gemm(reached)
    if a is None:
        inner = _activation_input(reached)
        if inner is not None:
            below = _gemm(_walk_back(inner, constants, [])[0])
            if below is not None and constants.is_constant(below.weight):
                raise _Reject(f"'{op_name(reached)}' node '{reached.name}' sits between the low-rank GEMMs '{below.node.name}' and '{b.node.name}' (not linear)")
        raise _NotACandidate
    nodes.append(a.node)
    if a.bias is not None or b.bias is not None:
        raise _Reject(f"low-rank GEMM '{(a if a.bias is not None else b).node.name}' has a bias")
    for gemm, role in ((a, "A"), (b, "B")):
        if not constants.is_constant(gemm.weight):
            weight = gemm.weight
            by = "a graph input" if isinstance(weight, Node) and weight.op == "placeholder" else f"produced by node '{getattr(weight, 'name', weight)}'"
            raise _Reject(f"low-rank {role} '{getattr(weight, 'name', weight)}' of '{gemm.node.name}' is not constant ({by})")
    return _Chain(a, b, scale_after * scale_between, peel(a.x), nodes)


def _single_use(node: Node, consumer: Node, what: str) -> None:
    users = real_users(node)
    if users != [consumer]:
        others = [u.name for u in users if u is not consumer]
        raise _Reject(f"{what} '{node.name}' is also used by node '{others[0] if others else '?'}'")


def _matrix(constants: FxConstants, node: Node, transposed: bool, role: str, owner: Node) -> tuple[int, int]:
    shape, _ = constants.shape_dtype(node)
    if len(shape) != 2:
        raise _Reject(f"{role} '{node.name}' of '{owner.name}' is not 2-D (shape {list(shape)})")
    return (shape[1], shape[0]) if transposed else (shape[0], shape[1])


def _to_numpy(getter: Callable[[], torch.Tensor], transposed: bool) -> Callable[[], np.ndarray]:
    """``[in, out]`` numpy array (bfloat16 comes back as float32: exact, the planner casts)."""

    def compute() -> np.ndarray:
        value = getter().detach()
        if transposed:
            value = value.t()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return np.ascontiguousarray(value.cpu().numpy())

    return compute


def _shape_key(node) -> list[str] | None:
    val = _val(node)
    return None if val is None else [str(d) for d in val.shape]


@dataclasses.dataclass
class FxLoraBinding:
    """What the FX rewriter needs to apply a plan to one site."""

    add: Node
    base: Node  # the GEMM node
    base_kind: str  # linear | mm | addmm | matmul
    weight_index: int  # position of the weight operand in base.args
    base_input: Node  # the base GEMM's input, before leading-axis views (group key, fused input)
    base_output: Node  # the add operand on the base side (after the bias add when there is one)
    bias_add: Node | None
    chain_nodes: list[Node]
    lowrank_b: Node  # the GEMM applying B
    lowrank_b_index: int


@dataclasses.dataclass
class BaseProjection:
    """``x @ W (+ bias)``: the GEMM, and the add of a constant bias after it (if any)."""

    gemm: _Gemm
    bias_add: Node | None
    bias: Node | None  # the bias added after the GEMM, else the GEMM's own


def match_base_projection(value: Node, constants: FxConstants, *, gemm_of: Callable[[Node], _Gemm | None] | None = None, one_bias: bool = True) -> BaseProjection:
    """The projection producing ``value``: a GEMM with a constant weight (``gemm_of`` recognises
    GEMMs), optionally followed by an add of a constant bias; raises _Reject when it is something
    else. ``one_bias``: reject a GEMM with its own bias that also gets an added one."""
    gemm_of = gemm_of or _gemm
    bias = bias_add = None
    reached = peel(value, casts=False)
    if op_name(reached) == "add" and len(reached.args) == 2:
        for data, const in ((reached.args[0], reached.args[1]), (reached.args[1], reached.args[0])):
            if isinstance(data, Node) and not constants.is_constant(data) and isinstance(const, Node) and constants.is_constant(const):
                if gemm_of(peel(data, casts=False)) is not None:
                    bias_add, bias = reached, const
                    reached = peel(data, casts=False)
                    break
    base = gemm_of(reached)
    if base is None:
        what = f"'{op_name(reached) or reached.op}' node '{reached.name}'" if isinstance(reached, Node) else "a constant"
        raise _Reject(f"low-rank chain is added to {what}, not to a projection with a constant weight")
    if base.bias is not None:
        if bias is not None and one_bias:
            raise _Reject(f"base projection '{base.node.name}' has two biases")
        bias = base.bias if bias is None else bias
    if not constants.is_constant(base.weight):
        weight = base.weight
        by = "a graph input" if isinstance(weight, Node) and weight.op == "placeholder" else f"produced by node '{getattr(weight, 'name', weight)}'"
        raise _Reject(f"base weight '{getattr(weight, 'name', weight)}' of '{base.node.name}' is not constant ({by})")
    for operand in (bias, base.bias):
        if operand is not None and not (isinstance(operand, Node) and constants.is_constant(operand)):
            raise _Reject(f"bias of '{base.node.name}' is not constant")
    return BaseProjection(base, bias_add, bias)


def _match_site(add: Node, base_value, chain: _Chain, constants: FxConstants, max_rank_ratio: float, index: int) -> AdapterSite:
    if not isinstance(base_value, Node):
        raise _Reject(f"low-rank chain is added to a constant at '{add.name}', not to a projection")
    projection = match_base_projection(base_value, constants)
    base, bias, bias_add = projection.gemm, projection.bias, projection.bias_add
    base_nodes = [bias_add] if bias_add is not None else []
    x_source = peel(base.x)
    if x_source is not chain.source:
        raise _Reject(f"low-rank chain reads '{getattr(chain.source, 'name', chain.source)}' but the projection '{base.node.name}' it is added to reads '{getattr(x_source, 'name', x_source)}'")
    # everything between the base GEMM and the add feeds only the next step
    step = base_value
    path = []
    while step is not base.node:
        path.append(step)
        step = step.args[0] if step is not bias_add else next(a for a in step.args if isinstance(a, Node) and not constants.is_constant(a))
    consumers = [add, *path]
    _single_use(base.node, path[-1] if path else add, "base projection output")
    for node, consumer in zip(path, consumers):
        _single_use(node, consumer, "base projection output")
    for i, node in enumerate(chain.nodes):
        _single_use(node, chain.nodes[i - 1] if i else add, "low-rank intermediate")
    in_w, out_w = _matrix(constants, base.weight, base.transposed, "weight", base.node)
    in_a, rank = _matrix(constants, chain.a.weight, chain.a.transposed, "A", chain.a.node)
    rank_b, out_b = _matrix(constants, chain.b.weight, chain.b.transposed, "B", chain.b.node)
    if (in_a, rank_b, out_b) != (in_w, rank, out_w):
        raise _Reject(f"shapes do not line up at '{add.name}': W [{in_w}, {out_w}], A [{in_a}, {rank}], B [{rank_b}, {out_b}]")
    if rank > max_rank_ratio * min(in_w, out_w):
        raise _Reject(f"rank {rank} is not small relative to W [{in_w}, {out_w}] (limit {max_rank_ratio:g} x {min(in_w, out_w)})")
    bias_getter = None
    if bias is not None:
        bias_shape, _ = constants.shape_dtype(bias)
        if int(np.prod(bias_shape)) != out_w or (bias_shape and bias_shape[-1] != out_w):
            raise _Reject(f"bias of '{base.node.name}' has shape {list(bias_shape)}, not [{out_w}]")
        bias_getter = constants.getter(bias)
    base_input = peel(base.x, casts=False)
    x_shape, out_shape = _shape_key(base_input), _shape_key(add)
    if x_shape is None or out_shape is None:
        raise _Reject(f"no shape metadata (meta['val']) on '{base_input.name}' or '{add.name}'; export the graph with torch.export or run FakeTensorProp")
    if x_shape[:-1] != out_shape[:-1] or out_shape[-1] != str(out_w):
        raise _Reject(f"shape mismatch at '{add.name}': input {x_shape} but output {out_shape}")
    _, weight_dtype = constants.shape_dtype(base.weight)
    label = _label_of(add) or re.sub(r"\.base_layer$", "", _label_of(base.node))
    if not label:
        source = constants.source(base.weight)
        label = _clean_label(str(source.target if source.op == "get_attr" else source.name))
    binding = FxLoraBinding(
        add=add,
        base=base.node,
        base_kind=base.kind,
        weight_index=base.weight_index,
        base_input=base_input,
        base_output=base_value,
        bias_add=bias_add,
        chain_nodes=list(chain.nodes),
        lowrank_b=chain.b.node,
        lowrank_b_index=chain.b.weight_index,
    )
    return AdapterSite(
        site_id=f"lora{index}",
        family="lora",
        label=label,
        input_name=base_input.name,
        output_name=add.name,
        in_features=in_w,
        out_features=out_w,
        rank=rank,
        scale=chain.scale,
        dtype=torch_dtype_name(weight_dtype),
        has_bias=bias is not None,
        nodes=[n.name for n in [base.node, *base_nodes, *reversed(chain.nodes), add]],
        weight=_to_numpy(constants.getter(base.weight), base.transposed),
        lora_a=_to_numpy(constants.getter(chain.a.weight), chain.a.transposed),
        lora_b=_to_numpy(constants.getter(chain.b.weight), chain.b.transposed),
        bias=(lambda g=bias_getter, n=out_w: _to_numpy(g, False)().reshape(n)) if bias_getter else None,
        binding=binding,
    )


def detect_lora_fx(gm: torch.fx.GraphModule, constants: FxConstants, *, max_rank_ratio: float = DEFAULT_MAX_RANK_RATIO) -> Detection:
    """Every LoRA site in ``gm.graph`` (see the module docstring for the pattern)."""
    sites: list[AdapterSite] = []
    rejections: list[Rejection] = []
    for node in gm.graph.nodes:
        if op_name(node) != "add" or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
            continue
        reasons = []
        for base_index, chain_index in ((0, 1), (1, 0)):
            try:
                chain = _match_chain(node.args[chain_index], constants)
                site = _match_site(node, node.args[base_index], chain, constants, max_rank_ratio, len(sites))
            except _NotACandidate:
                continue
            except _Reject as reject:
                reasons.append(str(reject))
                continue
            sites.append(site)
            break
        else:
            if reasons:
                rejections.append(Rejection(node=node.name, reason=reasons[0], label=_label_of(node)))
    _assign_groups(sites)
    return Detection(sites, rejections)


def _assign_groups(sites: list[AdapterSite]) -> None:
    """Sites whose base projections read the same tensor (in the same dtype) form one group."""
    by_input: dict[tuple, list[AdapterSite]] = {}
    for site in sites:
        by_input.setdefault((id(site.binding.base_input), site.dtype), []).append(site)
    for number, members in enumerate(by_input.values()):
        for site in members:
            site.group = f"g{number}"
