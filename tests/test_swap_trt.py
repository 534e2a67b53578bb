"""TensorRT refit on swap: ``--refit`` marks only the adapter-owned weights refittable
(``BuilderFlag.REFIT_INDIVIDUAL``, never ``REFIT``) and ``swap --format trt`` refits ``model.plan``.

What runs here: the names ``--refit`` marks are exactly the record's adapter-owned tensors (widened
weights, low-rank constants; no base weight), a model without a record is refused, and ``swap
--format trt`` without a ``model.plan`` exits 2 writing nothing. The engine build and refit need
TensorRT and a CUDA GPU: that test skips with the reason where they are missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from zflora_compile.targets.trt import TrtTarget, refittable_names

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_llama_lora.onnx"
TRT_MISSING = TrtTarget.missing_dependency()


def test_refit_marks_only_the_adapter_owned_weights(tmp_path):
    from zflora_compile.build import compile_file
    from zflora_compile.options import CompileOptions

    compile_file(EXAMPLE, tmp_path / "f", CompileOptions(max_rank=16))
    model = tmp_path / "f" / "model.onnx"
    names = refittable_names(model)
    record = json.loads({p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}["zflora.compiled"])
    groups = record["compilations"][-1]["groups"]
    assert sorted(names) == sorted([g["weight"] for g in groups] + [g["lowrank"] for g in groups])
    assert refittable_names(EXAMPLE) == []  # nothing compiled: --refit refuses (no weight to mark)


def test_swap_format_trt_needs_a_plan(tmp_path, capsys):
    from zflora_compile.build import compile_file
    from zflora_compile.cli import main
    from zflora_compile.options import CompileOptions

    compile_file(EXAMPLE, tmp_path / "f", CompileOptions())
    code = main(["swap", str(tmp_path / "f"), "--adapter", str(EXAMPLE), "-o", str(tmp_path / "out"), "--format", "trt"])
    err = capsys.readouterr().err
    assert code == 2 and "no model.plan beside" in err and not (tmp_path / "out").exists()


@pytest.mark.skipif(TRT_MISSING is not None, reason=f"TensorRT target unavailable here: {TRT_MISSING}")
def test_refit_on_swap_equals_a_from_scratch_engine(tmp_path, capsys):
    pytest.importorskip("peft")
    from test_swap import export, peft_lora

    from zflora_compile.cli import main
    from zflora_compile.targets.trt import TrtOptions

    a = export(peft_lora(r=4, seed=1), tmp_path / "a.onnx")
    b = peft_lora(r=8, seed=2)
    b.save_pretrained(tmp_path / "b")
    flags = ["--target", "trt", "--precision", "fp32", "--trt-seq", "1,8,16", "--trt-past", "0,8,16", "--refit"]
    assert main([str(a), "-o", str(tmp_path / "fa"), "--max-rank", "8", *flags]) == 0
    assert main(["swap", str(tmp_path / "fa"), "--adapter", str(tmp_path / "b"), "-o", str(tmp_path / "s"), "--format", "trt"]) == 0
    assert main([str(export(b, tmp_path / "b.onnx")), "-o", str(tmp_path / "fb"), *flags]) == 0
    target = TrtTarget(TrtOptions(precision="fp32", seq_range=(1, 8, 16), past_range=(0, 8, 16), refit=True))
    feeds = {"input_ids": np.arange(6, dtype=np.int64).reshape(1, 6), "attention_mask": np.ones((1, 6), np.int64)}
    got = target.load(tmp_path / "s", tmp_path / "s" / "model.onnx", None).run(feeds)[0]
    want = target.load(tmp_path / "fb", tmp_path / "fb" / "model.onnx", None).run(feeds)[0]
    before = target.load(tmp_path / "fa", tmp_path / "fa" / "model.onnx", None).run(feeds)[0]
    assert np.abs(want - before).max() > 1e-3
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=0)  # TF32 GEMMs
