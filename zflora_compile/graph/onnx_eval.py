"""Evaluate one region of an onnx-ir graph in ONNX Runtime: the nodes that compute ``output`` from
the values fed in, with the initializers they read (nothing else of the model is serialized).

Used to compute the dense update ``dW`` of a linear adapter branch from an identity probe, and to
check that the branch is linear (:mod:`zflora_compile.families.linear`).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from zflora_compile.errors import first_line


class RegionError(Exception):
    """The region cannot be evaluated on its own (it reads a graph input, or ONNX Runtime refused)."""


def region_nodes(feeds: list[ir.Value], output: ir.Value) -> tuple[list[ir.Node], list[ir.Value], list[ir.Value]]:
    """The nodes between ``feeds`` and ``output`` (graph order), the initializers they read, and the
    graph inputs they read only through ``Shape`` / ``Size`` (their sizes, never their values)."""
    fed = {id(v) for v in feeds}
    nodes: dict[int, ir.Node] = {}
    constants: dict[int, ir.Value] = {}
    shaped: dict[int, ir.Value] = {}
    stack = [(output, False)]
    while stack:
        value, for_shape = stack.pop()
        if value is None or id(value) in fed:
            continue
        node = value.producer()
        if node is None:
            if value.const_value is not None and not value.is_graph_input():  # a default a caller may override: no constant
                constants[id(value)] = value
            elif for_shape:
                shaped[id(value)] = value
            else:
                raise RegionError(f"it reads graph input '{value.name}'")
            continue
        if id(node) in nodes:
            continue
        nodes[id(node)] = node
        sizes_only = node.op_type in ("Shape", "Size") and node.domain in ("", "ai.onnx")
        stack.extend((v, sizes_only) for v in node.inputs)
    graph = output.graph
    order = {id(n): i for i, n in enumerate(graph)} if graph is not None else {}
    return sorted(nodes.values(), key=lambda n: order.get(id(n), 0)), list(constants.values()), list(shaped.values())


def _stand_in(value: ir.Value, sizes: dict[str, int]) -> np.ndarray:
    """Zeros shaped like graph input ``value``, its symbolic axes sized as the fed values' are."""
    if value.shape is None or value.dtype is None:
        raise RegionError(f"it reads the shape of graph input '{value.name}', which has no recorded shape")
    dims = []
    for dim in value.shape:
        if isinstance(dim, int):
            dims.append(dim)
        elif getattr(dim, "value", None) in sizes:
            dims.append(sizes[dim.value])
        else:
            raise RegionError(f"it reads the shape of graph input '{value.name}', whose axis '{dim}' the fed values do not size")
    return np.zeros(dims, dtype=value.dtype.numpy())


def _value_info(value: ir.Value, *, dynamic: bool) -> onnx.ValueInfoProto:
    elem = int(value.dtype) if value.dtype is not None else 0
    if value.shape is None or elem == 0:
        return onnx.helper.make_empty_tensor_value_info(value.name) if elem == 0 else onnx.helper.make_tensor_value_info(value.name, elem, None)
    dims = [None if dynamic or not isinstance(d, int) else d for d in value.shape]
    return onnx.helper.make_tensor_value_info(value.name, elem, dims)


def evaluate(model: ir.Model, feeds: list[tuple[ir.Value, np.ndarray]], output: ir.Value) -> np.ndarray:
    """``output`` computed from ``feeds`` (pairs of value and array) by the region between them."""
    import onnxruntime as ort

    nodes, constants, shaped = region_nodes([v for v, _ in feeds], output)
    sizes = {}
    for value, array in feeds:  # symbolic axes of what is fed, sized by the arrays
        for dim, size in zip(value.shape or [], array.shape):
            if not isinstance(dim, int) and getattr(dim, "value", None):
                sizes[dim.value] = size
    feeds = [*feeds, *((value, _stand_in(value, sizes)) for value in shaped)]
    initializers = []
    for value in constants:
        array = value.const_value.numpy()  # external data read here: the region is run from bytes
        if array.dtype.name == "bfloat16":
            tensor = ir.serde.serialize_tensor(ir.tensor(array, name=value.name))
        else:
            tensor = onnx.numpy_helper.from_array(np.asarray(array), name=value.name)
        initializers.append(tensor)
    inputs = []
    for value, array in feeds:
        elem = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        inputs.append(onnx.helper.make_tensor_value_info(value.name, elem, [None] * array.ndim))
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(n) for n in nodes], "region", inputs, [_value_info(output, dynamic=True)], initializer=initializers
    )
    opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()]
    proto = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=max(model.ir_version or 8, 8))
    proto.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return np.asarray(session.run([output.name], {v.name: a for v, a in feeds})[0])
    except Exception as error:  # noqa: BLE001 - ONNX Runtime raises its own types
        raise RegionError(f"ONNX Runtime cannot run it on its own: {first_line(error)}") from None
