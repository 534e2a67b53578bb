"""ONNX Runtime (CPU): the embedded default target.

The artifact is the rewritten ``model.onnx`` itself; building it means proving ONNX Runtime
loads it with full graph optimizations on this machine's providers.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from zflora_compile.errors import VerificationError
from zflora_compile.targets.base import Target


class OrtTarget(Target):
    name = "ort"

    def build(self, model_path: Path, out_dir: Path) -> dict:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # noqa: BLE001
            raise VerificationError(f"{model_path}: ONNX Runtime cannot load the rewritten model: {str(error).splitlines()[0]}") from None
        return {
            "name": self.name,
            "runtime": f"onnxruntime {ort.__version__}",
            "providers": session.get_providers(),
            "artifacts": [model_path.name],
        }
