"""Errors that map to zcompile's exit codes.

0 success, 1 verification (or a later gate) failed, 2 unusable input or missing dependency.
Every error carries a one-line message that names the file, node or tensor at fault.
"""

from __future__ import annotations


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class ZcompileError(Exception):
    """Base class: a user-facing error with an exit code and a one-line message."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class InputError(ZcompileError):
    """The input cannot be used: missing file, not ONNX, truncated, bad external data, opset."""

    exit_code = 2


class PlanError(InputError):
    """The sites cannot be planned with the strategy asked for (exit 2, like any unusable input)."""


class DependencyError(ZcompileError):
    """An optional dependency the requested feature needs is not installed."""

    exit_code = 2


class VerificationError(ZcompileError):
    """The rewritten model does not compute the same function as the original."""

    exit_code = 1

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report


class TargetError(ZcompileError):
    """The target cannot build or load the artifact (an op it does not support, a compiler error)."""

    exit_code = 2


class LatencyGateError(ZcompileError):
    """The fused model's latency overhead over the base model exceeds ``--max-overhead``."""

    exit_code = 1
