"""``onnx.checker`` on the input and on the rewritten model."""

from __future__ import annotations

from pathlib import Path

import onnx

from zflora_compile.errors import VerificationError, first_line

CHECKER_PASSED = "onnx.checker.check_model(full_check=True) passed"


def input_checker(path: Path) -> str:
    """``onnx.checker`` on the input file: :data:`CHECKER_PASSED`, or why it fails (the input's own
    fault: exporters write graphs ONNX Runtime runs that the checker refuses)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        return f"fails onnx.checker: {first_line(error)}"
    return CHECKER_PASSED


def output_checker(path: Path, input_result: str) -> str:
    """``onnx.checker`` on the rewritten model, held to what the input passed: a rewrite of an input
    that passes must pass (else ``VerificationError``); for an input that fails, the check is
    skipped and ONNX Runtime's verification is what proves the rewrite."""
    if input_result != CHECKER_PASSED:
        return f"skipped: the input model itself {input_result}"
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise VerificationError(f"rewritten model fails onnx.checker: {first_line(error)}") from None
    return CHECKER_PASSED
