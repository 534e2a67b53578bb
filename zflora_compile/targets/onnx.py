"""The ``onnx`` target: no engine; the verified ``model.onnx`` is the deliverable.

For a model whose engine is built elsewhere (TensorRT on the serving GPU, onnxruntime-genai's
builder, a QNN toolchain), or one too large for an engine build on this machine: an ONNX Runtime
CPU session of an fp16 model holds fp32 copies of its weights (about twice the model), which an
8B model does not fit in 24 GiB, while writing and regionally verifying it does. Nothing is built,
so there is no artifact to check; ``load`` runs ``model.onnx`` in ONNX Runtime on CPU, so the
latency gate still times base against fused where the machine can hold them.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from zflora_compile.targets.base import Loaded, Shape, Target, check_precision


class OnnxTarget(Target):
    name = "onnx"
    summary = "no engine: write the verified model.onnx only (build the engine elsewhere)"
    builds_artifact = False

    @classmethod
    def options_from_args(cls, args):
        check_precision(cls.name, args.precision, cls.precisions)
        return cls.Options()

    def build(self, model_path: Path, out_dir: Path, shapes: list[Shape]) -> dict:
        return {
            "name": self.name,
            "runtime": "none (no engine built)",
            "artifacts": [],
            "note": "no engine built: model.onnx (verified against the input) is the output",
        }

    def load(self, out_dir: Path, model_path: Path, shape: Shape, *, for_check: bool = False) -> Loaded:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        from zflora_compile.targets.ort import loaded_session

        return loaded_session(model_path, options, ["CPUExecutionProvider"])
