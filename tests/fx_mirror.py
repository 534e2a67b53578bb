"""The same hand-built graph in both IRs: an onnx-ir graph mirrored op for op into torch.fx.

For the front-end parity tests: each ONNX node becomes one ATen node of the same (sanitized)
name, initializers become buffers at the same module path (read by ``get_attr``), and every node
carries a real tensor as ``meta['val']`` computed while mirroring (so shapes are static: the
``seq`` axis takes the length given). Names decide nothing in the compiler, but they label its
reports; mirroring them lets a test compare the two front-ends' JSON after one name
normalisation (:func:`normalise`).

Only the ops the rule tests use are mirrored; anything else raises ``NotImplementedError``.
"""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir
import torch

aten = torch.ops.aten
_DTYPES = {ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16, ir.DataType.INT64: torch.int64, ir.DataType.BFLOAT16: torch.bfloat16}
_UNARY = {"Relu": aten.relu.default, "Tanh": aten.tanh.default, "Sigmoid": aten.sigmoid.default, "Neg": aten.neg.default}
_BINARY = {"Add": aten.add.Tensor, "Mul": aten.mul.Tensor, "Div": aten.div.Tensor, "Sub": aten.sub.Tensor}


def sanitize(name: str) -> str:
    """A name as an FX node name: every character that is not a letter, digit or ``_`` becomes ``_``."""
    text = re.sub(r"\W", "_", name)
    return f"n_{text}" if text[:1].isdigit() else text


def constant_name(name: str) -> str:
    """The FX node name of the constant (initializer or ``Constant`` output) called ``name``."""
    return "c_" + sanitize(name)


def _array(value: ir.Value) -> np.ndarray:
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    assert node is not None and node.op_type == "Constant", value
    return node.attributes["value"].value.numpy()


def _ints(value: ir.Value) -> list[int]:
    return [int(v) for v in np.atleast_1d(_array(value))]


class _Mirror:
    def __init__(self, model: ir.Model, seq: int, seed: int):
        self.model = model
        self.root = torch.nn.Module()
        self.graph = torch.fx.Graph()
        self.env: dict[int, torch.fx.Node] = {}
        self.seq = seq
        self.rng = torch.Generator().manual_seed(seed)

    def _set(self, value: ir.Value, node: torch.fx.Node, real: torch.Tensor) -> torch.fx.Node:
        node.meta["val"] = real
        self.env[id(value)] = node
        return node

    def _buffer(self, value: ir.Value, array: np.ndarray) -> torch.fx.Node:
        target = value.name
        *path, leaf = target.split(".")
        owner = self.root
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        owner.register_buffer(leaf, tensor)
        node = self.graph.create_node("get_attr", target, name=constant_name(target))
        return self._set(value, node, tensor)

    def value(self, value: ir.Value) -> torch.fx.Node:
        if id(value) not in self.env:
            assert value.const_value is not None, f"{value.name} is neither computed nor constant"
            self._buffer(value, value.const_value.numpy())
        return self.env[id(value)]

    def call(self, onnx_node: ir.Node, target, args, kwargs=None) -> None:
        kwargs = kwargs or {}
        fx_node = self.graph.create_node("call_function", target, tuple(args), kwargs, name=sanitize(onnx_node.name))
        if "/" in onnx_node.name:
            fx_node.meta["nn_module_stack"] = {"scope": (".".join(p for p in onnx_node.name.split("/")[:-1] if p), "Module")}
        real_args = torch.fx.node.map_arg(args, lambda n: n.meta["val"])
        real_kwargs = torch.fx.node.map_arg(kwargs, lambda n: n.meta["val"])
        self._set(onnx_node.outputs[0], fx_node, target(*real_args, **real_kwargs))

    def node(self, n: ir.Node) -> None:
        op, ins = n.op_type, n.inputs
        attrs = {k: a.value for k, a in n.attributes.items()}
        if op == "Constant":
            self._buffer(n.outputs[0], _array(n.outputs[0]))
        elif op == "MatMul":
            self.call(n, aten.matmul.default, [self.value(ins[0]), self.value(ins[1])])
        elif op == "Gemm":
            assert not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
            weight = self.value(ins[1])
            if not attrs.get("transB", 0):
                weight = self._aux(aten.t.default, [weight], f"{n.name}_t")
            args = [self.value(ins[0]), weight] + ([self.value(ins[2])] if len(ins) > 2 and ins[2] is not None else [])
            self.call(n, aten.linear.default, args)
        elif op in _BINARY:
            self.call(n, _BINARY[op], [self.value(ins[0]), self.value(ins[1])])
        elif op in _UNARY:
            self.call(n, _UNARY[op], [self.value(ins[0])])
        elif op == "Cast":
            self.call(n, aten._to_copy.default, [self.value(ins[0])], {"dtype": _DTYPES[ir.DataType(attrs["to"])]})
        elif op == "Identity":
            self.call(n, aten.clone.default, [self.value(ins[0])])
        elif op == "Transpose":
            self.call(n, aten.permute.default, [self.value(ins[0]), list(attrs["perm"])])
        elif op == "ReduceSum":
            self.call(n, aten.sum.dim_IntList, [self.value(ins[0]), _ints(ins[1]) if len(ins) > 1 else [-1], bool(attrs.get("keepdims", 1))])
        elif op == "Slice":
            (start,), (end,) = _ints(ins[1]), _ints(ins[2])
            (axis,) = _ints(ins[3]) if len(ins) > 3 else [0]
            (step,) = _ints(ins[4]) if len(ins) > 4 else [1]
            self.call(n, aten.slice.Tensor, [self.value(ins[0]), axis, start, min(end, 2**62), step])
        elif op == "Concat":
            self.call(n, aten.cat.default, [[self.value(v) for v in ins], attrs["axis"]])
        elif op == "Pad":
            pads = _ints(ins[1])
            rank = len(pads) // 2
            assert all(p == 0 for i, p in enumerate(pads) if i != 2 * rank - 1), "only last-axis end padding is mirrored"
            fill = float(_array(ins[2]).reshape(())) if len(ins) > 2 and ins[2] is not None else 0.0
            self.call(n, aten.constant_pad_nd.default, [self.value(ins[0]), [0, pads[2 * rank - 1]], fill])
        elif op == "Gather" and attrs.get("axis", 0) == 0:
            self.call(n, aten.embedding.default, [self.value(ins[0]), self.value(ins[1])])
        elif op == "Reshape":
            self.call(n, aten.reshape.default, [self.value(ins[0]), _ints(ins[1])])
        else:
            raise NotImplementedError(f"{op} is not mirrored into torch.fx")

    def _aux(self, target, args, name: str) -> torch.fx.Node:
        node = self.graph.create_node("call_function", target, tuple(args), {}, name=sanitize(name))
        node.meta["val"] = target(*torch.fx.node.map_arg(args, lambda a: a.meta["val"]))
        return node

    def build(self) -> torch.fx.GraphModule:
        for value in self.model.graph.inputs:
            dims = [d if isinstance(d, int) else self.seq for d in value.shape]
            dtype = _DTYPES[value.dtype]
            real = torch.randint(0, 8, dims, generator=self.rng) if dtype == torch.int64 else (torch.randn(dims, generator=self.rng) * 0.5).to(dtype)
            self._set(value, self.graph.create_node("placeholder", sanitize(value.name), name=sanitize(value.name)), real)
        for node in self.model.graph:
            self.node(node)
        self.graph.output(tuple(self.env[id(v)] for v in self.model.graph.outputs))
        return torch.fx.GraphModule(self.root, self.graph)


def to_fx(model: ir.Model, seq: int = 5, seed: int = 0) -> torch.fx.GraphModule:
    """``model`` mirrored into an ATen GraphModule (see the module docstring)."""
    return _Mirror(model, seq, seed).build()


def example_inputs(gm: torch.fx.GraphModule) -> list[torch.Tensor]:
    """The inputs the mirror computed its ``meta['val']`` with."""
    return [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]


def op_words(reason: str) -> str:
    """A reason with its op names lower-cased: each IR names its ops in its own vocabulary
    (``'Relu' node`` in ONNX, ``'relu' node`` in ATen)."""
    return re.sub(r"'(\w+)' node", lambda m: f"'{m.group(1).lower()}' node", reason)


#: report fields that hold graph names (every other string is a label, a family, a dtype...)
NAME_FIELDS = {"input", "output", "nodes", "node", "lane", "reason"}


def normalise(data, model: ir.Model, field: str = ""):
    """An ONNX front-end report (sites / rejections / plan JSON) in the mirror's FX vocabulary: each
    value named by the node producing it (constants as :func:`constant_name`), names sanitized."""
    producer = {o.name: n.name for n in model.graph for o in n.outputs if o.name and n.op_type != "Constant"}
    constants = set(model.graph.initializers) | {o.name for n in model.graph if n.op_type == "Constant" for o in n.outputs}
    names = set(producer) | constants | {n.name for n in model.graph} | {v.name for v in model.graph.inputs}

    def spell(name: str) -> str:
        return constant_name(name) if name in constants else sanitize(producer.get(name, name))

    def fix(text: str) -> str:
        if field == "reason":
            for name in sorted(names, key=len, reverse=True):
                text = text.replace(f"'{name}'", f"'{spell(name)}'")
            return op_words(text)
        return spell(text) if text in names and field in NAME_FIELDS else text

    if isinstance(data, dict):
        return {k: normalise(v, model, k) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [normalise(v, model, field) for v in data]
    return fix(data) if isinstance(data, str) else data
