"""The interface every target implements.

A target turns a verified ONNX model into a deployable artifact (:meth:`Target.build`), loads
that artifact for a fixed input shape (:meth:`Target.load`) and runs it. The latency gate and
the artifact check drive every target through these two calls only.
"""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np

from zflora_compile.errors import DependencyError


@dataclasses.dataclass(frozen=True)
class Shape:
    """One input shape a model is built or run for: ``seq`` new tokens after ``past`` cached ones."""

    name: str
    seq: int
    past: int

    def describe(self) -> str:
        if self.name == "static":
            return "the model's static input shapes"
        return f"{self.name} ({self.seq} token(s), past {self.past})"


@dataclasses.dataclass
class TargetOptions:
    """Options shared by targets; each target reads the ones it understands and states its defaults."""

    precision: str | None = None  # fp32 / fp16 / bf16; None: the target's default
    # ORT
    ort_provider: str | None = None  # None: CUDA when onnxruntime-gpu sees a GPU, else CPU
    threads: int | None = None
    # QNN (HTP)
    soc_model: str = "60"
    htp_arch: str = "73"
    # TensorRT
    seq_range: tuple[int, int, int] = (1, 128, 512)  # min / opt / max new tokens
    past_range: tuple[int, int, int] = (0, 128, 512)  # min / opt / max cached tokens
    refit: bool = False
    workspace_gib: float = 4.0


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


class Target(abc.ABC):
    """Builds and runs the deployable artifact of a verified ONNX model."""

    name: str = ""
    #: extra/packages needed, shown when they are missing
    install_hint: str = ""
    #: tolerance (atol, rtol) for comparing the artifact's outputs with ONNX Runtime CPU
    artifact_tolerance: tuple[float, float] = (1e-4, 1e-4)

    def __init__(self, options: TargetOptions | None = None):
        self.options = options or TargetOptions()

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

    @abc.abstractmethod
    def load(self, out_dir: Path, model_path: Path, shape: Shape) -> Loaded:
        """Load the artifact built into ``out_dir`` (from ``model_path``) to run inputs of ``shape``."""
