"""Static-shape preparation for targets that compile one graph per input shape (QNN HTP).

Every step is exact (the prepared graph computes the same function for the frozen shape):

- ``freeze_inputs``: each symbolic input dimension gets its value for the shape; then
  onnxscript's optimizer folds what became constant (shape arithmetic, mask index grids).
- ``constants_last``: ``Mul(c, x) -> Mul(x, c)`` and ``Add(c, x) -> Add(x, c)`` for a constant
  ``c`` (commutative; the HTP backend fails to allocate some constant-first elementwise ops).
- ``gather_nd_identity``: ``GatherND(data, idx)`` whose constant ``idx`` enumerates every
  position of ``data`` in row-major order (``batch_dims = 0``) is ``Reshape(data, idx.shape[:-1])``.
  The exporters build causal masks this way; QNN has no GatherND.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxscript.optimizer


def freeze_inputs(model: ir.Model, symbols: dict[str, int]) -> None:
    for value in model.graph.inputs:
        if value.shape is None:
            continue
        value.shape = ir.Shape([d if isinstance(d, int) else symbols.get(str(d), 1) for d in value.shape])
    onnxscript.optimizer.optimize(model)


def constants_last(model: ir.Model) -> int:
    swapped = 0
    for node in model.graph.all_nodes():
        if node.op_type in ("Mul", "Add") and node.domain == "" and len(node.inputs) == 2:
            first, second = node.inputs
            if first is not None and second is not None and first.const_value is not None and second.const_value is None:
                node.replace_input_with(0, second)
                node.replace_input_with(1, first)
                swapped += 1
    return swapped


def gather_nd_identity(model: ir.Model) -> int:
    rewritten = 0
    for node in list(model.graph):
        if node.op_type != "GatherND" or node.domain != "" or node.attributes.get_int("batch_dims", 0) != 0:
            continue
        data, indices = node.inputs
        if indices is None or indices.const_value is None or data.shape is None or not all(isinstance(d, int) for d in data.shape):
            continue
        index = indices.const_value.numpy()
        dims = [int(d) for d in data.shape]
        if index.shape[-1] != len(dims):
            continue
        grid = np.stack(np.meshgrid(*[np.arange(d) for d in dims], indexing="ij"), axis=-1).reshape(-1, len(dims))
        if not np.array_equal(index.reshape(-1, len(dims)), grid):
            continue
        shape = ir.Value(name=f"{node.name}_reshape_shape", const_value=ir.tensor(np.array(index.shape[:-1], dtype=np.int64)))
        model.graph.register_initializer(shape)
        reshape = ir.node("Reshape", [data, shape], name=f"{node.name}_as_reshape")
        model.graph.insert_before(node, reshape)
        reshape.outputs[0].shape = ir.Shape(list(index.shape[:-1]))
        reshape.outputs[0].dtype = data.dtype
        node.outputs[0].replace_all_uses_with(reshape.outputs[0], replace_graph_outputs=True)
        model.graph.remove(node, safe=True)
        rewritten += 1
    return rewritten


def prepare_static(model: ir.Model, symbols: dict[str, int]) -> dict[str, int]:
    """All the steps above, in order; returns how often each rewrite fired."""
    freeze_inputs(model, symbols)
    return {"gather_nd_identity": gather_nd_identity(model), "constants_last": constants_last(model)}
