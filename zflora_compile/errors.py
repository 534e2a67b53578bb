"""Errors that map to zcompile's exit codes.

0 success, 1 verification (or a later gate) failed, 2 unusable input or missing dependency,
4 latency gate inconclusive (the interval straddles the threshold).
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


class UnrecognizedAdapterError(InputError):
    """``strip`` cannot derive the base model: an adapter-shaped structure no family recognises
    (exit 2; nothing is written; the report lists every one with its reason)."""


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


class LatencyInconclusive(LatencyGateError):
    """The latency gate cannot decide: the interval of the fused/base ratio straddles the
    threshold after the rounds the budget allowed (exit 4; the output is written, like a failed gate)."""

    exit_code = 4


class EnvironmentProblem(ZcompileError):
    """The machine refused: a full disk, a read-only filesystem, a path under a regular file,
    a permission (exit 2, like any unusable input). The message names the path and the errno."""

    exit_code = 2

    @classmethod
    def from_os_error(cls, error: OSError, path=None, doing: str = "") -> "EnvironmentProblem":
        import errno as errno_names

        where = error.filename if error.filename is not None else path
        name = errno_names.errorcode.get(error.errno, str(error.errno)) if error.errno else "no errno"
        reason = error.strerror or first_line(error)
        what = f" while {doing}" if doing else ""
        return cls(f"{where}: {reason} ({name}){what}" if where is not None else f"{reason} ({name}){what}")


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP: raised by zcompile's signal handlers so every ``finally`` and
    ``with`` block on the way out removes its temporary files (exit 128 + the signal number)."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        self.exit_code = 128 + signum
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        super().__init__(f"interrupted ({name})")
