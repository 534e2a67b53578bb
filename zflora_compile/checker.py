"""``onnx.checker`` on the input and on the rewritten model, as far as it can check them.

Exporters for ONNX Runtime write ONNX Runtime's own operators: in ``com.microsoft`` (which the
checker skips: it knows no schema there) and, from onnxruntime-genai's builder, in the *default*
domain (``SimplifiedLayerNormalization``, ``SkipSimplifiedLayerNormalization``), where the checker
refuses the whole model ("No Op registered"). Such a node must not block a compile: the checker
runs on a copy of the graph in which every default-domain node without an ONNX schema is moved to
a private domain (so the checker types and checks everything around it), and ONNX Runtime, which
the verification loads anyway, judges those nodes. The copy is read without external data; its
externally stored weights become typed graph inputs of the same name and shape, so a model of
any size is checked in a few MB.
"""

from __future__ import annotations

import collections
from pathlib import Path

import onnx

from zflora_compile.errors import VerificationError, first_line

CHECKER_PASSED = "onnx.checker.check_model(full_check=True) passed"
#: where the checked copy puts default-domain nodes that have no ONNX schema
UNCHECKED_DOMAIN = "ai.zflora.left_to_onnxruntime"


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield from _graphs(sub)


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def checkable_copy(path: Path) -> tuple[onnx.ModelProto, collections.Counter]:
    """The model at ``path`` as the checker can judge it, and the op types left to ONNX Runtime
    (default-domain nodes without an ONNX schema at the model's opset) with their counts."""
    model = onnx.load(str(path), load_external_data=False)
    opset = _default_opset(model)
    left: collections.Counter = collections.Counter()
    for graph in _graphs(model.graph):
        for node in graph.node:
            if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type, max_inclusive_version=opset, domain=""):
                left[node.op_type] += 1
                node.domain = UNCHECKED_DOMAIN
    if left:
        model.opset_import.append(onnx.helper.make_opsetid(UNCHECKED_DOMAIN, 1))
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        declared = {i.name for i in model.graph.input}
        for tensor in external:
            if tensor.name not in declared:
                model.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        keep = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return model, left


def _left_note(left: collections.Counter) -> str:
    if not left:
        return ""
    ops = ", ".join(f"{op} x{n}" for op, n in sorted(left.items()))
    return f"; {sum(left.values())} node(s) of ONNX Runtime's own default-domain operators left to ONNX Runtime ({ops})"


def _check(path: Path) -> str:
    """:data:`CHECKER_PASSED` (with what was left to ONNX Runtime); raises the checker's error.

    Intermediate shapes an exporter recorded (``value_info``) are hints: where they contradict
    ONNX's own inference (onnxruntime-genai's builder records rank-0 shapes for 1-element
    constants), the model is checked again without them and the note says so."""
    model, left = checkable_copy(path)
    try:
        onnx.checker.check_model(model, full_check=True)
        return CHECKER_PASSED + _left_note(left)
    except onnx.shape_inference.InferenceError as error:
        if not any(len(g.value_info) for g in _graphs(model.graph)):
            raise
        for graph in _graphs(model.graph):
            del graph.value_info[:]
        onnx.checker.check_model(model, full_check=True)
        return CHECKER_PASSED + _left_note(left) + f"; without the model's recorded intermediate shapes, which contradict inference ({first_line(error)})"


def input_checker(path: Path) -> str:
    """``onnx.checker`` on the input file: :data:`CHECKER_PASSED`, or why it fails (the input's own
    fault: exporters write graphs ONNX Runtime runs that the checker refuses)."""
    try:
        return _check(path)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        return f"fails onnx.checker: {first_line(error)}"


def output_checker(path: Path, input_result: str) -> str:
    """``onnx.checker`` on the rewritten model, held to what the input passed: a rewrite of an input
    that passes must pass (else ``VerificationError``); for an input that fails, the check is
    skipped and ONNX Runtime's verification is what proves the rewrite."""
    if not input_result.startswith(CHECKER_PASSED):
        return f"skipped: the input model itself {input_result}"
    try:
        return _check(path)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise VerificationError(f"rewritten model fails onnx.checker: {first_line(error)}") from None
