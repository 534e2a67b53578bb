"""Targets turn a verified rewritten ONNX model into a deployable artifact for a runtime.

``ort`` (ONNX Runtime; CPU here, CUDA with onnxruntime-gpu), ``qnn`` (Qualcomm HTP through
onnxruntime-qnn, optional extra), ``trt`` (TensorRT, optional extra), ``onnx`` (no engine: the
verified model is the output). Each module imports its
runtime only when used, so a missing optional runtime fails only the target that needs it. Each
target class owns its options dataclass (``Target.Options``) and its command-line flags.
"""

from __future__ import annotations

from zflora_compile.errors import InputError
from zflora_compile.targets.base import Loaded, Shape, Target
from zflora_compile.targets.onnx import OnnxTarget
from zflora_compile.targets.ort import OrtOptions, OrtTarget
from zflora_compile.targets.qnn import QnnOptions, QnnTarget
from zflora_compile.targets.trt import TrtOptions, TrtTarget

TARGETS: dict[str, type[Target]] = {"ort": OrtTarget, "qnn": QnnTarget, "trt": TrtTarget, "onnx": OnnxTarget}

__all__ = ["TARGETS", "Loaded", "OrtOptions", "QnnOptions", "Shape", "Target", "TrtOptions", "get_target", "target_class"]


def target_class(name: str) -> type[Target]:
    """The target class registered as ``name``; an unknown name is an ``InputError`` (exit 2)."""
    try:
        return TARGETS[name]
    except KeyError:
        raise InputError(f"unknown target '{name}' (available: {', '.join(sorted(TARGETS))})") from None


def get_target(name: str, options=None) -> Target:
    """The target called ``name`` with ``options`` (its ``Options``; None: the defaults); raises
    ``DependencyError`` (exit 2) when its runtime is missing."""
    target = target_class(name)(options)
    target.check_available()
    return target
