"""Targets turn a verified rewritten ONNX model into a deployable artifact for a runtime.

``ort`` (ONNX Runtime; CPU here, CUDA with onnxruntime-gpu), ``qnn`` (Qualcomm HTP through
onnxruntime-qnn, optional extra), ``trt`` (TensorRT, optional extra). Each module imports its
runtime only when used, so a missing optional runtime fails only the target that needs it.
"""

from __future__ import annotations

from zflora_compile.errors import InputError
from zflora_compile.targets.base import Loaded, Shape, Target, TargetOptions
from zflora_compile.targets.ort import OrtTarget
from zflora_compile.targets.qnn import QnnTarget
from zflora_compile.targets.trt import TrtTarget

TARGETS: dict[str, type[Target]] = {"ort": OrtTarget, "qnn": QnnTarget, "trt": TrtTarget}

__all__ = ["TARGETS", "Loaded", "Shape", "Target", "TargetOptions", "get_target"]


def get_target(name: str, options: TargetOptions | None = None) -> Target:
    """The target called ``name``; raises ``DependencyError`` (exit 2) when its runtime is missing."""
    try:
        target = TARGETS[name](options)
    except KeyError:
        raise InputError(f"unknown target '{name}' (available: {', '.join(sorted(TARGETS))})") from None
    target.check_available()
    return target
