"""The interface every target implements.

A target turns a verified ONNX model into a deployable artifact (:meth:`Target.build`), loads
that artifact for a fixed input shape (:meth:`Target.load`) and runs it. The latency gate and
the artifact check drive every target through these two calls only.
"""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np

from zflora_compile.errors import DependencyError, InputError, TargetError


@dataclasses.dataclass(frozen=True)
class Shape:
    """One input shape a model is built or run for: ``seq`` new tokens after ``past`` cached ones."""

    name: str
    seq: int
    past: int
    #: why the shape is smaller than asked (the model's position range), "" when it is not
    clamped: str = dataclasses.field(default="", compare=False)

    def describe(self) -> str:
        if self.name == "static":
            return "the model's static input shapes"
        return f"{self.name} ({self.seq} token(s), past {self.past})"


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of a target that has none of its own."""


def or_list(items) -> str:
    """``a, b or c``."""
    items = [str(i) for i in items]
    return " or ".join([", ".join(items[:-1]), items[-1]]) if len(items) > 1 else "".join(items)


def check_precision(target: str, precision: str | None, allowed: tuple[str, ...]) -> None:
    """``precision`` must be one the target builds (``allowed``; empty: the model's own precision)."""
    if precision is None:
        return
    if not allowed:
        raise InputError(f"target '{target}' runs the model in its own precision; --precision {precision} does not apply to it")
    if precision not in allowed:
        raise TargetError(f"target '{target}' supports --precision {or_list(allowed)}, not {precision}")


class CannotRunHere(DependencyError):
    """The runtime on this machine has no kernel for an op of the model (ONNX Runtime CPU and
    bfloat16): nothing that runs the model can run here; ``--no-verify`` compiles without running it."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


@dataclasses.dataclass
class Loaded:
    """An artifact loaded for one input shape: ``run(feeds)`` returns the outputs in graph order.

    ``timed(feeds)`` runs once and returns its latency in ms when the target times on the
    device (TensorRT: CUDA events); ``None`` means the caller times the call on the host.
    """

    run: Runner
    output_names: list[str]
    timed: Callable[[dict[str, np.ndarray]], float] | None = None
    description: str = ""
    #: ``prepare(feeds)`` binds the inputs (and outputs) once and returns a call that runs with
    #: them: what a latency measurement times (no copies in the timed region); None: time ``run``
    prepare: Callable[[dict[str, np.ndarray]], Callable[[], object]] | None = None


class Target(abc.ABC):
    """Builds and runs the deployable artifact of a verified model.

    A target owns its options (``Options``, a dataclass that validates itself), its command-line
    flags (:meth:`add_arguments`, :meth:`options_from_args`), the precisions it builds, the
    tolerance of its artifact check and whether its timings come from an emulator.
    """

    name: ClassVar[str] = ""
    #: one line for ``--target``'s help
    summary: ClassVar[str] = ""
    #: its options dataclass; ``Options()`` gives the defaults
    Options: ClassVar[type] = NoOptions
    #: the model forms it builds from: "onnx" (a file), room for a torch program target
    accepts: ClassVar[tuple[str, ...]] = ("onnx",)
    #: precisions ``--precision`` may ask for, the default first; empty: the model's own precision
    precisions: ClassVar[tuple[str, ...]] = ()
    #: extra/packages needed, shown when they are missing
    install_hint: ClassVar[str] = ""
    #: the least tolerance (atol, rtol) of the artifact check, for the target's own kernels (fp16
    #: arithmetic on an NPU); each output's tolerance is the larger of this and the one its dtype
    #: and the model's quantization call for (:func:`zflora_compile.targets.check.output_tolerances`)
    artifact_tolerance: ClassVar[tuple[float, float]] = (0.0, 0.0)
    #: why the target widens the check (shown in the report); "" when it does not
    artifact_tolerance_why: ClassVar[str] = ""
    #: whether the artifact runs on an emulator here, so its timings are not device latencies
    emulated: bool = False
    #: False for a target that builds nothing (``onnx``): no artifact check then
    builds_artifact: ClassVar[bool] = True

    def __init__(self, options=None):
        options = self.Options() if options is None else options
        if not isinstance(options, self.Options):
            raise InputError(f"target '{self.name}' takes {self.Options.__name__}, not {type(options).__name__}")
        self.options = options

    @classmethod
    def add_arguments(cls, group) -> None:
        """Add this target's own flags to ``group`` (an argparse argument group)."""

    @classmethod
    def options_from_args(cls, args):
        """This target's options from parsed flags (``args.precision`` and its own flags)."""
        check_precision(cls.name, args.precision, cls.precisions)
        return cls.Options()

    @classmethod
    def missing_dependency(cls) -> str | None:
        """Why this target cannot run here (a one-line reason), or ``None`` when it can."""
        return None

    def check_available(self) -> None:
        reason = self.missing_dependency()
        if reason:
            raise DependencyError(f"target '{self.name}' is not available: {reason}. {self.install_hint}")

    @abc.abstractmethod
    def build(self, model_path: Path, out_dir: Path, shapes: list[Shape]) -> dict:
        """Write the artifact(s) of ``model_path`` into ``out_dir``; return the report's ``target`` section.

        ``shapes`` are the input shapes the artifact must serve (targets that need static shapes
        build one artifact per shape; dynamic-shape targets cover them all).
        """

    def regional_artifact(self, out_dir: Path) -> Path | None:
        """The artifact as an ONNX model that ONNX Runtime CPU computes exactly as the target does,
        so that it can be checked region by region against ``model.onnx`` (``--verify regions``);
        None (the default) when there is none: the artifact is then checked whole."""
        return None

    @abc.abstractmethod
    def load(self, out_dir: Path, model_path: Path, shape: Shape, *, for_check: bool = False) -> Loaded:
        """Load the artifact built into ``out_dir`` (from ``model_path``) to run inputs of ``shape``;
        ``for_check``: loaded for the artifact check's few runs, not for timing (a target may then
        skip what only speeds up repeated runs, such as ONNX Runtime's weight prepacking)."""
