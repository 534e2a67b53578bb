"""``zcompile swap`` on GAWS groups and the lane families (FFA, FBA, FFBA, zFLoRA): the swapped model
equals a from-scratch compile of the new adapter (ONNX Runtime, max |diff| <= 1e-5), from the new
adapter's ONNX export and from its saved zflora adapter directory; lanes over capacity, a lone GAWS
site (kept unfused, no record) and a family mismatch exit 2. Helpers: tests/test_swap.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_swap import ATOL, LAYERS, assert_swap_equals_scratch, cli, compiled, export, logits, peft_lora, refused  # noqa: E402
from zflora_compile import zoo  # noqa: E402


# ---------------------------------------------------------------- GAWS (grouped blocks)


def test_gaws(capsys, tmp_path):
    from zflora_compile.adapters.gaws import attach_gaws, randomize_gaws

    def model(seed, targets=("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
        return randomize_gaws(attach_gaws(zoo.build_base_model(num_hidden_layers=LAYERS), "gaws", targets=targets, diag=True), seed=seed).eval()

    a, b = export(model(1), tmp_path / "a.onnx"), export(model(2), tmp_path / "b.onnx")
    fused, scratch = compiled(a, tmp_path / "fa"), compiled(b, tmp_path / "fb")
    assert json.loads((tmp_path / "fa" / "report.json").read_text())["plan"]["fused_groups"]
    (tmp_path / "s").mkdir()
    assert_swap_equals_scratch(capsys, tmp_path / "s", fused, b, scratch)
    lone = export(model(3, targets=("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj")), tmp_path / "lone.onnx")
    line = refused(capsys, tmp_path, fused, lone)
    assert "GAWS site 'model.layers.0.self_attn.o_proj'" in line and "alone on its input" in line


# ---------------------------------------------------------------- lane families (widened projections)


def lane_model(family: str, seed: int, rank: int = 4):
    from zflora_compile.adapters import AdapterConfig, attach_adapters, randomize_adapters

    base = zoo.build_base_model(seed=0, num_hidden_layers=LAYERS)
    return randomize_adapters(attach_adapters(base, AdapterConfig(family=family, rank=rank, alpha=8)), seed=seed).eval()


@pytest.mark.parametrize("family", ["ffa", "fba", "ffba", "zflora"])
def test_lane_family(family, capsys, tmp_path):
    from zflora_compile.adapters import save_adapters

    a = export(lane_model(family, 1), tmp_path / "a.onnx")
    b_model = lane_model(family, 2)
    save_adapters(b_model, tmp_path / "b_saved")
    b = export(b_model, tmp_path / "b.onnx")
    fused, scratch = compiled(a, tmp_path / "fa"), compiled(b, tmp_path / "fb")
    assert json.loads((tmp_path / "fa" / "report.json").read_text())["plan"]["widened"]
    (tmp_path / "o").mkdir()
    assert_swap_equals_scratch(capsys, tmp_path / "o", fused, b, scratch)
    code, _, err = cli(capsys, "swap", fused, "--adapter", tmp_path / "b_saved", "-o", tmp_path / "z")
    assert code == 0, err
    np.testing.assert_allclose(logits(tmp_path / "z" / "model.onnx"), logits(scratch), atol=ATOL, rtol=0)
    report = json.loads((tmp_path / "z" / "report.json").read_text())
    assert report["adapter"]["kind"] == "zflora" and report["verification"]["skipped"]


def test_lane_rank_over_capacity(capsys, tmp_path):
    a = export(lane_model("ffa", 1, rank=2), tmp_path / "a.onnx")
    b = export(lane_model("ffa", 2, rank=4), tmp_path / "b.onnx")
    line = refused(capsys, tmp_path, compiled(a, tmp_path / "fa"), b)
    assert "has 2 written lane(s)" in line and "needs 4" in line


def test_family_mismatch(capsys, tmp_path):
    fused = compiled(export(peft_lora(r=4, seed=1), tmp_path / "a.onnx"), tmp_path / "fa")
    b = export(lane_model("ffa", 2), tmp_path / "b.onnx")
    line = refused(capsys, tmp_path, fused, b)
    assert "no counterpart" in line
