"""``zcompile swap``: a fused model with another adapter equals a from-scratch compile of that adapter.

Per family with a fused form (LoRA, DoRA, BD-LoRA, GAWS, FFA / FBA / FFBA, zFLoRA): compile model A
(``--strategy fuse``), swap in adapter B (a PEFT directory, B's ONNX export, or B's saved zflora
adapter), and compare with ``compile B`` in ONNX Runtime on seeded inputs: max |diff| <= 1e-5 (the
same constants in the same graph: in practice 0). Each case also checks that B changes the
outputs (|A - B| > 1e-3), so a swap that left A's adapter would fail. Refusals (rank over the
compiled lanes, another base, a merged model, a module with no site, a site with no module) exit 2
with one line naming the tensor / module and write nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from zflora_compile import zoo  # noqa: E402
from zflora_compile.build import compile_file  # noqa: E402
from zflora_compile.cli import main  # noqa: E402
from zflora_compile.options import CompileOptions  # noqa: E402

ATOL = 1e-5
LAYERS = 1


def feeds(seq: int = 6, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, 128, size=(1, seq)).astype(np.int64), "attention_mask": np.ones((1, seq), np.int64)}


def logits(path) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds())[0]


def compiled(source: Path, out: Path, **options) -> Path:
    compile_file(source, out, CompileOptions(**options))
    return out / "model.onnx"


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def peft_lora(r=4, seed=1, **kw):
    """A PEFT LoRA on the seed-0 base; the adapter drawn from ``seed``."""
    model = zoo.build_lora_model(r=r, num_hidden_layers=LAYERS, **kw)
    zoo._randomize_lora(model, seed)
    return model


def peft_variant(kind, seed, r=4):
    model = zoo.build_peft_variant(kind, num_hidden_layers=LAYERS, r=r)
    zoo._randomize_adapter(model, seed)
    return model


def export(model, path: Path) -> Path:
    return zoo.export_onnx(model, path)


def assert_swap_equals_scratch(capsys, tmp: Path, fused_a: Path, adapter, scratch_b: Path, *extra) -> dict:
    code, out, err = cli(capsys, "swap", fused_a, "--adapter", adapter, "-o", tmp / "swapped", *extra)
    assert code == 0, err
    got, want, before = logits(tmp / "swapped" / "model.onnx"), logits(scratch_b), logits(fused_a)
    assert np.abs(want - before).max() > 1e-3  # B is another adapter than A
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    report = json.loads((tmp / "swapped" / "report.json").read_text())
    assert report["verification"]["passed"] is True
    return report


# ---------------------------------------------------------------- LoRA


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    a = export(peft_lora(r=4, seed=1), root / "a.onnx")
    b_model = peft_lora(r=4, seed=2, rank_pattern={"q_proj": 2, "down_proj": 3}, alpha_pattern={"v_proj": 3, "o_proj": 5}, use_rslora=True)
    b_model.save_pretrained(root / "b_peft")
    b = export(b_model, root / "b.onnx")
    return {"a": a, "fused_a": compiled(a, root / "fa"), "b": b, "peft_b": root / "b_peft", "scratch_b": compiled(b, root / "fb"), "root": root}


def test_peft_dir_with_patterns_and_rslora(lora, capsys, tmp_path):
    report = assert_swap_equals_scratch(capsys, tmp_path, lora["fused_a"], lora["peft_b"], lora["scratch_b"])
    assert "merged into its base lanes" in report["verification"]["reference"]
    assert report["adapter"]["kind"] == "PEFT" and len(report["swapped"]) == 8  # 4 groups: weight + low-rank each


def test_onnx_adapted_model(lora, capsys, tmp_path):
    report = assert_swap_equals_scratch(capsys, tmp_path, lora["fused_a"], lora["b"], lora["scratch_b"])
    assert report["verification"]["reference"].startswith("the new adapter's ONNX model")


def test_output_directory_of_a_compile_and_json(lora, capsys, tmp_path):
    code, out, _ = cli(capsys, "swap", lora["fused_a"].parent, "--adapter", lora["peft_b"], "-o", tmp_path / "s", "--json")
    assert code == 0 and json.loads(out)["status"] == "ok"


def test_swap_is_faster_than_a_compile(lora, tmp_path):
    import time

    from zflora_compile.swap import swap_file

    start = time.perf_counter()
    compile_file(lora["b"], tmp_path / "c", CompileOptions())
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    swap_file(lora["fused_a"], lora["peft_b"], tmp_path / "s", verify=False)
    assert time.perf_counter() - start < compile_s


# ---------------------------------------------------------------- refusals (exit 2, one line, nothing written)


def refused(capsys, tmp, fused, adapter, *extra) -> str:
    out = tmp / "refused"
    code, _, err = cli(capsys, "swap", fused, "--adapter", adapter, "-o", out, *extra)
    assert code == 2, err
    assert not out.exists() and not [p for p in tmp.iterdir() if p.name.startswith(".refused")]
    lines = err.strip().splitlines()
    assert len(lines) == 1
    return lines[0]


def test_rank_over_the_compiled_lanes(lora, capsys, tmp_path):
    big = peft_lora(r=8, seed=3)
    big.save_pretrained(tmp_path / "big")
    line = refused(capsys, tmp_path, lora["fused_a"], tmp_path / "big")
    assert "has 12 adapter lane(s)" in line and "needs 24 (q_proj 8 + k_proj 8 + v_proj 8)" in line and "--max-rank 8" in line


def test_other_base_names_the_tensor(lora, capsys, tmp_path):
    other = zoo.build_lora_model(r=4, num_hidden_layers=LAYERS, seed=9)
    path = export(other, tmp_path / "other.onnx")
    line = refused(capsys, tmp_path, lora["fused_a"], path)
    assert "differs from the compiled model's base lanes" in line and "q_proj" in line and "fused_weight" in line


def test_merged_model(lora, capsys, tmp_path):
    merged = compiled(lora["a"], tmp_path / "merged", strategy="merge")
    line = refused(capsys, tmp_path, merged, lora["peft_b"])
    assert "merged" in line and "not separable" in line


def test_module_with_no_site(capsys, tmp_path):
    a = export(peft_lora(r=4, seed=1, targets=["q_proj", "v_proj"]), tmp_path / "a.onnx")
    fused = compiled(a, tmp_path / "fa")
    peft_lora(r=4, seed=2, targets=["q_proj", "v_proj", "o_proj"]).save_pretrained(tmp_path / "more")
    line = refused(capsys, tmp_path, fused, tmp_path / "more")
    assert "module 'model.layers.0.self_attn.o_proj'" in line and "has no site" in line
    peft_lora(r=4, seed=2, targets=["q_proj"]).save_pretrained(tmp_path / "fewer")
    line = refused(capsys, tmp_path, fused, tmp_path / "fewer")
    assert "compiled site 'model.layers.0.self_attn.v_proj'" in line and "no counterpart" in line


def test_not_a_compiled_model(lora, capsys, tmp_path):
    line = refused(capsys, tmp_path, lora["a"], lora["peft_b"])
    assert "not compiled" in line


# ---------------------------------------------------------------- DoRA and BD-LoRA (PEFT variants)


@pytest.mark.parametrize("kind", ["dora", "bdlora"])
def test_peft_variant(kind, capsys, tmp_path):
    a = export(peft_variant(kind, seed=1), tmp_path / "a.onnx")
    b_model = peft_variant(kind, seed=2)
    b_model.save_pretrained(tmp_path / "b_peft")
    b = export(b_model, tmp_path / "b.onnx")
    fused, scratch = compiled(a, tmp_path / "fa"), compiled(b, tmp_path / "fb")
    for name, adapter in (("from_peft", tmp_path / "b_peft"), ("from_onnx", b)):
        (tmp_path / name).mkdir()
        assert_swap_equals_scratch(capsys, tmp_path / name, fused, adapter, scratch)


def test_strip_of_a_swapped_model_is_the_base(lora, capsys, tmp_path):
    code, _, err = cli(capsys, "swap", lora["fused_a"], "--adapter", lora["peft_b"], "-o", tmp_path / "s")
    assert code == 0, err
    stripped = compiled(tmp_path / "s" / "model.onnx", tmp_path / "strip", strategy="strip")
    base = compiled(lora["a"], tmp_path / "base", strategy="strip")
    np.testing.assert_allclose(logits(stripped), logits(base), atol=ATOL, rtol=0)
    record = json.loads(__import__("onnx").load(str(tmp_path / "s" / "model.onnx")).metadata_props[0].value)
    assert [e["strategy"] for e in record["compilations"]] == ["fuse", "swap"]


def test_peft_config_that_contradicts_its_tensors(lora, capsys, tmp_path):
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(lora["peft_b"], edited)
    config = json.loads((edited / "adapter_config.json").read_text())
    config["target_modules"] = [t for t in config["target_modules"] if t != "o_proj"]
    (edited / "adapter_config.json").write_text(json.dumps(config))
    line = refused(capsys, tmp_path, lora["fused_a"], edited)
    assert "module 'model.layers.0.self_attn.o_proj'" in line and "not among the target_modules" in line
    config = json.loads((lora["peft_b"] / "adapter_config.json").read_text())
    config["rank_pattern"] = {"q_proj": 3}  # the tensors say 2
    (edited / "adapter_config.json").write_text(json.dumps(config))
    line = refused(capsys, tmp_path, lora["fused_a"], edited)
    assert "lora_A has rank 2, adapter_config.json says 3" in line
