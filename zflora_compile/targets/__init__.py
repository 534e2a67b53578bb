"""Targets turn a verified rewritten ONNX model into a deployable artifact for a runtime."""

from __future__ import annotations

from zflora_compile.errors import InputError
from zflora_compile.targets.base import Target
from zflora_compile.targets.ort import OrtTarget

TARGETS: dict[str, type[Target]] = {"ort": OrtTarget}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]()
    except KeyError:
        raise InputError(f"unknown target '{name}' (available: {', '.join(sorted(TARGETS))})") from None
