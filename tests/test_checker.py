"""The checker step: ONNX Runtime's default-domain operators (onnxruntime-genai's builder writes
them) never block a compile, and the checker still judges everything around them, external
weights included."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from zflora_compile.checker import CHECKER_PASSED, input_checker, output_checker
from zflora_compile.errors import VerificationError


def _model(weight_shape=(8, 8), *, ort_norm: bool = True, type_error: bool = False) -> onnx.ModelProto:
    nodes = []
    if ort_norm:
        nodes.append(helper.make_node("SimplifiedLayerNormalization", ["x", "gamma"], ["n"], epsilon=1e-5, axis=-1))
    else:
        nodes.append(helper.make_node("Identity", ["x"], ["n"]))
    nodes.append(helper.make_node("MatMul", ["n", "w"], ["y"]))
    if type_error:
        nodes.append(helper.make_node("Add", ["x", "ids"], ["z0"]))  # float + int64: a type error
        nodes.append(helper.make_node("Add", ["y", "z0"], ["z"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])] + ([helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 8])] if type_error else []),
        [helper.make_tensor_value_info("z" if type_error else "y", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(np.ones(8, np.float32), "gamma"), numpy_helper.from_array(np.ones(weight_shape, np.float32), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _save(model, path, external=False):
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("external", [False, True])
def test_ort_default_domain_ops_are_left_to_onnxruntime(tmp_path, external):
    path = _save(_model(), tmp_path / "m.onnx", external)
    with pytest.raises(onnx.checker.ValidationError, match="No Op registered for SimplifiedLayerNormalization"):
        onnx.checker.check_model(str(path), full_check=True)  # what users hit
    result = input_checker(path)
    assert result.startswith(CHECKER_PASSED)
    assert "left to ONNX Runtime (SimplifiedLayerNormalization x1)" in result
    assert output_checker(path, result).startswith(CHECKER_PASSED)


@pytest.mark.parametrize("external", [False, True])
def test_what_surrounds_them_is_still_checked(tmp_path, external):
    good = input_checker(_save(_model(), tmp_path / "good.onnx", external))
    bad = _save(_model(type_error=True), tmp_path / "bad.onnx", external)
    assert input_checker(bad).startswith("fails onnx.checker")
    with pytest.raises(VerificationError, match="rewritten model fails onnx.checker"):
        output_checker(bad, good)


def test_a_plain_model_reports_nothing_left(tmp_path):
    assert input_checker(_save(_model(ort_norm=False), tmp_path / "plain.onnx")) == CHECKER_PASSED
