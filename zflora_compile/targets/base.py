"""The interface every target implements."""

from __future__ import annotations

import abc
from pathlib import Path


class Target(abc.ABC):
    """Builds the deployable artifact of a verified ONNX model inside the output directory."""

    name: str = ""

    @abc.abstractmethod
    def build(self, model_path: Path, out_dir: Path) -> dict:
        """Build the artifact(s) next to ``model_path``; return the report's ``target`` section."""
