"""Constant values in an onnx-ir graph, seen through the layout ops exporters put around weights.

A weight may reach a MatMul as an initializer, a ``Constant`` node, or behind ``Transpose``,
``Cast``, ``CastLike``, ``Identity``, ``Reshape``, ``Squeeze`` or ``Unsqueeze`` of a constant
(``torch.onnx.export(dynamo=True, optimize=False)`` writes ``MatMul(x, Transpose(W))``).
:func:`constant_array` evaluates those chains with numpy, lazily, without touching the graph.

A graph input is never a constant, with or without an initializer of the same name: that
initializer is only its default, which a caller may override at run time (Olive's
``ExtractAdapters`` and ONNX Runtime's multi-LoRA feed adapter weights that way, with empty
defaults). Folding, measuring or concatenating its default would freeze one adapter into the model.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_ir as ir

_LAYOUT_OPS = {"Transpose", "Cast", "CastLike", "Identity", "Reshape", "Squeeze", "Unsqueeze"}


def _attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _numpy_dtype(onnx_dtype: int) -> np.dtype:
    return ir.DataType(onnx_dtype).numpy()


def _constant_node_array(node: ir.Node) -> np.ndarray | None:
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        attr = node.attributes.get(key)
        if attr is None:
            continue
        if key == "value":
            return attr.value.numpy()
        dtype = np.float32 if "float" in key else np.int64
        return np.asarray(attr.value, dtype=dtype)
    return None


def constant_source(value: ir.Value | None) -> ir.Value | None:
    """The initializer or Constant output at the root of a layout-op chain, or None."""
    while value is not None:
        if value.is_graph_input():
            return None  # overridable at run time, whatever its default
        if value.const_value is not None:
            return value
        node = value.producer()
        if node is None:
            return None
        if node.op_type == "Constant" and node.domain == "":
            return value
        if node.op_type not in _LAYOUT_OPS or node.domain != "":
            return None
        value = node.inputs[0]
    return None


def is_constant(value: ir.Value | None) -> bool:
    return constant_getter(value) is not None


def constant_getter(value: ir.Value | None) -> Callable[[], np.ndarray] | None:
    """A function that evaluates ``value`` as a numpy array, or None when it is not constant."""
    if value is None or value.is_graph_input():
        return None  # a graph input is fed at run time, even where an initializer gives its default
    if value.const_value is not None:
        tensor = value.const_value
        return lambda: tensor.numpy()
    node = value.producer()
    if node is None or node.domain != "":
        return None
    if node.op_type == "Constant":
        array = _constant_node_array(node)
        return None if array is None else (lambda: array)
    if node.op_type not in _LAYOUT_OPS:
        return None
    inner = constant_getter(node.inputs[0])
    if inner is None:
        return None
    if node.op_type in ("Reshape", "Squeeze", "Unsqueeze") and len(node.inputs) > 1:
        operand = constant_getter(node.inputs[1])
        if operand is None:
            return None
    else:
        operand = None
    like = node.inputs[1] if node.op_type == "CastLike" else None
    if like is not None and like.dtype is None:
        return None
    return lambda: _apply_layout_op(node, inner(), operand() if operand else None, like)


def _apply_layout_op(node: ir.Node, array: np.ndarray, operand, like) -> np.ndarray:
    op = node.op_type
    if op == "Identity":
        return array
    if op == "Transpose":
        perm = _attr(node, "perm")
        return np.transpose(array, perm if perm is not None else None)
    if op == "Cast":
        return array.astype(_numpy_dtype(_attr(node, "to")))
    if op == "CastLike":
        return array.astype(like.dtype.numpy())
    if op == "Reshape":
        shape = [array.shape[i] if d == 0 else int(d) for i, d in enumerate(operand.tolist())]
        return array.reshape(shape)
    axes = operand if operand is not None else _attr(node, "axes")
    axes = None if axes is None else tuple(int(a) for a in np.atleast_1d(axes))
    if op == "Squeeze":
        return np.squeeze(array, axis=axes)
    return np.expand_dims(array, axis=axes)


def scalar_value(value: ir.Value | None) -> float | None:
    """The float value of a constant with exactly one element, or None."""
    if value is not None and value.shape is not None:
        if any(isinstance(d, int) and d != 1 for d in value.shape):
            return None
    getter = constant_getter(value)
    if getter is None:
        return None
    array = getter()
    return float(array.reshape(())) if array.size == 1 else None


def constant_shape(value: ir.Value) -> tuple[int, ...]:
    """Static shape of a constant value (evaluated only when the graph does not record it)."""
    shape = value.shape
    if shape is not None and all(isinstance(d, int) for d in shape):
        return tuple(int(d) for d in shape)
    root = constant_source(value)
    if root is value and root is not None and root.const_value is not None:
        return tuple(root.const_value.shape)
    return tuple(constant_getter(value)().shape)


def constant_dtype(value: ir.Value) -> str:
    """numpy name of a constant's element type ("float32", "float16", "bfloat16")."""
    dtype = value.dtype
    node = value.producer()
    while dtype is None and node is not None and node.op_type not in ("Cast", "Constant") and node.inputs:
        value = node.inputs[0]
        dtype, node = value.dtype, value.producer()
    if dtype is None:
        return constant_getter(value)().dtype.name
    return dtype.numpy().name
