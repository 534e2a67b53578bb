"""benchmarks/compile_scale.py and its model builder, benchmarks/scale_models.py.

- The builder's ONNX decoder (tiny config, fp32, weights generated in many small chunks) computes
  the logits of a transformers ``LlamaForCausalLM`` + PEFT LoRA holding the same numbers, and the
  adapter matters (disabling it changes the logits); ``zcompile inspect`` finds 7 sites per layer.
- ``--quick`` runs end to end: every run is recorded with its exit code, the OS's peak RSS and
  the report's timings; the work directory is removed.
- The watchdog kills a child over the RSS limit and records it; a size that does not fit on the
  disk is refused before anything is built.

No assertion on timings.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("rich")
ort = pytest.importorskip("onnxruntime")

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPT = BENCH / "compile_scale.py"
sys.path.insert(0, str(BENCH))

import compile_scale  # noqa: E402
import scale_models as sm  # noqa: E402


def onnx_logits(path: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).astype(np.int64)
    return session.run(["logits"], {"input_ids": ids, "attention_mask": mask, "position_ids": positions})[0]


def test_builder_matches_transformers(tmp_path, monkeypatch):
    monkeypatch.setattr(sm, "CHUNK_ELEMENTS", 1000)  # every matrix written in several chunks
    cfg = sm.SIZES["tiny"].with_(dtype="float32")
    path = sm.build_onnx(cfg, tmp_path / "model")
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    ids = np.random.default_rng(3).integers(0, cfg.vocab, size=(2, 11)).astype(np.int64)
    mask = np.ones_like(ids)
    got = onnx_logits(path, ids, mask)
    model = sm.build_peft_model(cfg)
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
        with model.disable_adapter():
            base = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    assert got.shape == (2, 11, cfg.vocab)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert np.abs(want - base).max() > 1e-3  # B is nonzero: the adapter changes the logits


def test_fp16_build_is_close_and_detected(tmp_path):
    cfg = sm.SIZES["tiny"]
    path = sm.build_onnx(cfg, tmp_path / "model")
    ids = np.random.default_rng(4).integers(0, cfg.vocab, size=(1, 9)).astype(np.int64)
    got = onnx_logits(path, ids, np.ones_like(ids))
    assert got.dtype == np.float16
    with torch.no_grad():
        want = sm.build_peft_model(cfg.with_(dtype="float32"))(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(got.astype(np.float32), want, atol=5e-3)
    exe = compile_scale.zcompile_exe()
    listing = json.loads(subprocess.run([*exe, "inspect", "--json", str(path)], capture_output=True, text=True, check=True).stdout)
    sites = listing["sites"]
    assert len(sites) == 7 * cfg.layers
    assert len(listing["unrecognized"]) == 0


def test_every_value_has_a_known_shape(tmp_path):
    """Like an exporter's graph, every intermediate has a shape with named or fixed axes (the mask's
    ``Range`` and GQA's ``Reshape`` with -1 are declared): verification region by region needs them."""
    import onnx

    path = sm.build_onnx(sm.SIZES["tiny"], tmp_path / "model")
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False), strict_mode=True)
    unknown = [
        v.name
        for v in inferred.graph.value_info
        if any(not (d.dim_value or (d.dim_param and not d.dim_param.startswith("unk"))) for d in v.type.tensor_type.shape.dim)
    ]
    assert not unknown and len(inferred.graph.value_info) > 100


def test_generation_is_a_function_of_name_and_shape(monkeypatch):
    """Chunk i of a tensor is seeded by (seed, crc32(name), i) and the cut depends only on the
    shape: every reader (the ONNX writer, the PyTorch filler) gets the same numbers."""
    cfg = sm.SIZES["tiny"]
    monkeypatch.setattr(sm, "CHUNK_ELEMENTS", 1000)
    spec = sm.TensorSpec("lm_head.weight", (64, 256))
    chunks = list(sm.tensor_chunks(spec, cfg))
    assert len(chunks) > 1 and all(c.dtype == np.float16 for c in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks), sm.tensor_array(spec, cfg))
    other = sm.tensor_array(sm.TensorSpec("model.norm.weight", (64,), "norm"), cfg)
    assert float(np.mean(other)) == pytest.approx(1.0, abs=0.02)
    assert float(np.std(chunks[0].astype(np.float32))) == pytest.approx(0.02, rel=0.2)


def test_quick_run(tmp_path):
    out = tmp_path / "results" / "compile_scale.json"
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--workdir", str(work), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    results = json.loads(out.read_text())
    assert results["benchmark"] == "compile_scale" and results["settings"]["quick"] is True
    for key in ("platform", "cpu_model", "logical_cores", "memory_gib"):
        assert key in results["machine"]
    assert {"zflora_compile", "onnxruntime", "torch"} <= set(results["versions"])
    assert results["verify_modes"][0] == "default" and len(results["verify_modes"]) >= 2
    (entry,) = results["sizes"]
    assert entry["size"] == "tiny" and entry["parameters"] > 0
    assert entry["build"]["exit_code"] == 0 and entry["build"]["disk_bytes"] > entry["weight_bytes"]
    assert entry["copy"]["exit_code"] == 0 and entry["copy"]["bytes"] >= entry["weight_bytes"]
    runs = entry["runs"]
    assert {(r["strategy"], r["verify"]) for r in runs} == {(s, m) for s in ("fuse", "merge", "strip") for m in results["verify_modes"]}
    for run in runs:
        assert run["exit_code"] == 0 and run["killed"] is None, run["log_tail"]
        assert run["max_rss_gib"] > 0 and run["rss_source"] == "/usr/bin/time -v"
        assert run["timings_s"]["total"] > 0 and run["output_bytes"] > 0 and "model.onnx" in run["output_files"]
        assert run["growth_ratio"] > 0
        assert run["rss_timeline"] and set(run["step_peak_rss_gib"]) == set(run["timings_s"]) - {"total"}
    peft = entry["peft_alternative"]
    assert peft["exit_code"] == 0 and peft["max_rss_gib"] > 0 and peft["phases_s"]["export_s"] > 0
    assert not list(work.glob("compile-scale-*")), "the work directory was left behind"
    assert "saved" in proc.stdout


def guard_args(**changes) -> argparse.Namespace:
    defaults = dict(rss_limit_gib=20.0, min_available_gib=0.0, min_free_disk_gib=0.0, poll_s=0.05, timeout_s=120.0, keep=False, target="ort")
    return argparse.Namespace(**{**defaults, **changes})


def test_guard_kills_over_the_rss_limit(tmp_path):
    hog = "import time; x = bytearray(400 * 2**20); time.sleep(30)"
    run = compile_scale.run_guarded([sys.executable, "-c", hog], guard_args(rss_limit_gib=0.2), disk=tmp_path, log=tmp_path / "hog.log")
    assert run["killed"] and run["killed"].startswith("killed at") and "limit 0.2 GiB" in run["killed"]
    assert run["exit_code"] != 0 and run["wall_s"] < 30


def test_refuses_a_size_that_does_not_fit(tmp_path):
    from rich.console import Console

    args = guard_args(min_free_disk_gib=1e9, build_only=False, dtype="float16", workdir=tmp_path)
    entry = compile_scale.measure_size("tiny", tmp_path, args, ["default"], Console(file=io.StringIO()))
    assert "needs" in entry["refused"] and "free" in entry["refused"]
    assert "build" not in entry and not list(tmp_path.iterdir())
