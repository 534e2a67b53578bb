"""The verifier feeds what a real caller may feed: every value of a bool switch (both decoders of
an ``If``), and random values for inputs that carry a default initializer (adapter weights a
runtime binds). Each test builds a rewrite that is wrong only where the old verifier did not look,
and checks that verification now fails there."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from zflora_compile.verify import verify_models

RNG = np.random.default_rng(0)


def _save(model: onnx.ModelProto, path) -> str:
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return str(path)


def _branch(name: str, weight: str) -> onnx.GraphProto:
    node = helper.make_node("MatMul", ["x", weight], [f"{name}_y"])
    return helper.make_graph([node], name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, ["batch", 8])])


def _if_model(then_weight: np.ndarray, else_weight: np.ndarray) -> onnx.ModelProto:
    """``y = use_cache_branch ? x @ W_then : x @ W_else`` (both weights outer-scope initializers)."""
    node = helper.make_node("If", ["use_cache_branch"], ["y"], then_branch=_branch("then", "w_then"), else_branch=_branch("else", "w_else"))
    graph = helper.make_graph(
        [node],
        "switch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]), helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(then_weight, "w_then"), numpy_helper.from_array(else_weight, "w_else")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_both_values_of_a_bool_switch_are_verified(tmp_path):
    w_then, w_else = (RNG.standard_normal((8, 8)).astype(np.float32) for _ in range(2))
    original = _save(_if_model(w_then, w_else), tmp_path / "original.onnx")
    same = _save(_if_model(w_then, w_else), tmp_path / "same.onnx")
    wrong_else = _save(_if_model(w_then, w_else + 0.1), tmp_path / "wrong.onnx")

    result = verify_models(original, same, None)
    assert result["passed"]
    names = [c["case"] for c in result["cases"]]
    assert any("use_cache_branch=True" in n for n in names) and any("use_cache_branch=False" in n for n in names)

    result = verify_models(original, wrong_else, None)
    assert not result["passed"]
    failed = [c["case"] for c in result["cases"] if not all(o["passed"] for o in c["outputs"].values())]
    assert failed and all("use_cache_branch=False" in n for n in failed)


def _adapter_model(a: np.ndarray, b: np.ndarray, *, as_inputs: bool) -> onnx.ModelProto:
    """``y = x @ W + (x @ A) @ B`` with A and B graph inputs carrying default initializers
    (``as_inputs``), as Olive's ExtractAdapters writes them, or plain constants."""
    w = np.eye(8, dtype=np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["base"]),
        helper.make_node("MatMul", ["x", "lora_A"], ["z"]),
        helper.make_node("MatMul", ["z", "lora_B"], ["delta"]),
        helper.make_node("Add", ["base", "delta"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])]
    if as_inputs:
        inputs += [
            helper.make_tensor_value_info("lora_A", TensorProto.FLOAT, [8, "rank"]),
            helper.make_tensor_value_info("lora_B", TensorProto.FLOAT, ["rank", 8]),
        ]
    graph = helper.make_graph(
        nodes,
        "adapter",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(a, "lora_A"), numpy_helper.from_array(b, "lora_B")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_defaulted_inputs_are_fed_random_values(tmp_path):
    empty_a, empty_b = np.zeros((8, 0), np.float32), np.zeros((0, 8), np.float32)
    original = _save(_adapter_model(empty_a, empty_b, as_inputs=True), tmp_path / "original.onnx")
    switchable = _save(_adapter_model(empty_a, empty_b, as_inputs=True), tmp_path / "same.onnx")
    frozen = _save(_adapter_model(empty_a, empty_b, as_inputs=False), tmp_path / "frozen.onnx")

    result = verify_models(original, switchable, None)
    assert result["passed"]
    fed = [c for c in result["cases"] if c["case"].endswith("defaulted inputs fed")]
    assert fed and all(c["inputs"]["lora_A"][1] > 0 for c in fed)  # a real rank, not the empty default

    result = verify_models(original, frozen, None)  # the adapter frozen as (empty) constants: deaf to a bound adapter
    assert not result["passed"]
    failures = [o.get("reason", "") for c in result["cases"] for o in c["outputs"].values() if not o["passed"]]
    assert failures and all("'lora_A' of the original is no input of the rewritten model" in r for r in failures)
