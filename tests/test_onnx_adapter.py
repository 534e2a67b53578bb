"""ONNX Runtime adapter files: ``compile --adapter-inputs`` and ``swap --format onnx_adapter``.

The compile keeps the fused layout's adapter-owned tensors as graph inputs with defaults and writes
``adapter.onnx_adapter``; ``swap --format onnx_adapter`` writes only the new adapter's file. One
ONNX Runtime session of the compiled model, bound per run with
``RunOptions.add_active_adapter(LoraAdapter)``, then equals the from-scratch compile of each adapter
(max |diff| <= 1e-5); without an active adapter it runs the compiled one. A model compiled without
``--adapter-inputs`` is refused (exit 2, the tensor named, nothing written).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from test_swap import ATOL, cli, compiled, export, feeds, logits, peft_lora, refused  # noqa: E402


def session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def bound(sess, adapter_file) -> np.ndarray:
    adapter = ort.LoraAdapter()
    adapter.Load(str(adapter_file))
    run_options = ort.RunOptions()
    run_options.add_active_adapter(adapter)
    return sess.run(None, feeds(), run_options)[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx_adapter")
    a = export(peft_lora(r=4, seed=1), root / "a.onnx")
    b = peft_lora(r=8, seed=2, rank_pattern={"k_proj": 2}, use_rslora=True)
    b.save_pretrained(root / "b_peft")
    c = export(peft_lora(r=6, seed=3), root / "c.onnx")
    return {
        "a": a,
        "root": root,
        "b_peft": root / "b_peft",
        "c": c,
        "scratch_b": compiled(export(b, root / "b.onnx"), root / "fb"),
        "scratch_c": compiled(c, root / "fc"),
    }


def test_compile_and_swap_adapter_files(models, capsys, tmp_path):
    code, _, err = cli(capsys, models["a"], "-o", tmp_path / "fa", "--max-rank", "8", "--adapter-inputs")
    assert code == 0, err
    model = tmp_path / "fa" / "model.onnx"
    assert (tmp_path / "fa" / "adapter.onnx_adapter").is_file()
    sess = session(model)
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]  # the adapter inputs have defaults
    overridable = {i.name for i in sess.get_overridable_initializers()}
    assert any(n.endswith("fused_weight") for n in overridable) and any(n.endswith("lowrank_weight") for n in overridable)
    default = sess.run(None, feeds())[0]
    np.testing.assert_allclose(bound(sess, tmp_path / "fa" / "adapter.onnx_adapter"), default, atol=ATOL, rtol=0)
    for name, adapter in (("b", models["b_peft"]), ("c", models["c"])):
        out = tmp_path / f"ad_{name}"
        code, _, err = cli(capsys, "swap", model, "--adapter", adapter, "-o", out, "--format", "onnx_adapter")
        assert code == 0, err
        assert sorted(p.name for p in out.iterdir()) == ["adapter.onnx_adapter", "report.json"]
        want = logits(models[f"scratch_{name}"])
        assert np.abs(want - default).max() > 1e-3
        np.testing.assert_allclose(bound(sess, out / "adapter.onnx_adapter"), want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(sess.run(None, feeds())[0], default, atol=0, rtol=0)  # no adapter bound: the compiled one


def test_model_without_adapter_inputs_is_refused(models, capsys, tmp_path):
    fused = compiled(models["a"], tmp_path / "fa", max_rank=8)
    line = refused(capsys, tmp_path, fused, models["b_peft"], "--format", "onnx_adapter")
    assert "is no graph input (compile with --adapter-inputs)" in line and "fused_weight" in line
