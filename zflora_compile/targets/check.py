"""The artifact check: a target's artifact must compute what the model it was built from computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from zflora_compile.targets.base import Shape, Target
from zflora_compile.verify import compare, input_specs, make_feeds, session


def check_artifact(target: Target, artifact_dir: Path, model_path: Path, shapes: list[Shape], vocab: int | None, seed: int) -> dict:
    """Run the target's artifact and ONNX Runtime CPU on the same inputs, for every shape it serves;
    returns the report's ``target.check`` section."""
    atol, rtol = target.artifact_tolerance
    reference = session(model_path)
    names = [o.name for o in reference.get_outputs()]
    specs = input_specs(model_path)
    cases, failure, worst = [], None, 0.0
    for shape in shapes:
        feeds = make_feeds(specs, vocab, seq=None if shape.name == "static" else shape.seq, past=shape.past, seed=seed)
        loaded = target.load(artifact_dir, model_path, shape)
        got = dict(zip(loaded.output_names, loaded.run(feeds)))
        outputs = {}
        for name, expected in zip(names, reference.run(names, feeds)):
            if name not in got:
                outputs[name] = {"passed": False, "reason": "missing from the artifact's outputs"}
            else:
                outputs[name] = compare(expected, np.asarray(got[name]).astype(expected.dtype, copy=False), atol, rtol)
                worst = max(worst, outputs[name].get("max_abs_diff", 0.0))
            if not outputs[name]["passed"] and failure is None:
                detail = outputs[name].get("reason") or f"max abs diff {outputs[name]['max_abs_diff']:.3g} > atol {atol:g} + rtol {rtol:g} * |ref|"
                failure = f"output '{name}' ({shape.describe()}): {detail}"
        cases.append({"shape": shape.name, "seq": shape.seq, "past": shape.past, "runs_on": loaded.description, "outputs": outputs})
    return {
        "passed": failure is None,
        "reference": "model.onnx on onnxruntime CPUExecutionProvider, same seeded inputs",
        "atol": atol,
        "rtol": rtol,
        "max_abs_diff": worst,
        "failure": failure,
        "cases": cases,
    }
