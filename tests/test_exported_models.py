"""LoRA compilation of PEFT models exported by real exporters (tiny random-weight configs).

Each case checks: the sites found (count, ranks, scales, groups, bias), the GEMM count after
each strategy, the tool's own verification, an independent comparison against PyTorch (the
PEFT model for fuse/merge, the same model with its adapter disabled for strip), and
idempotence.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import run_onnx, token_feeds  # noqa: E402

from zflora_compile import detect_adapters  # noqa: E402
from zflora_compile.build import compile_file  # noqa: E402
from zflora_compile.options import CompileOptions  # noqa: E402
from zflora_compile.zoo import EXPORTERS  # noqa: E402

LAYERS = 2
SEQS = (1, 6)


def torch_logits(model, feeds, *, disable_adapter=False) -> np.ndarray:
    ids = torch.from_numpy(feeds["input_ids"])
    mask = torch.from_numpy(feeds["attention_mask"])
    with torch.no_grad():
        if disable_adapter:
            with model.disable_adapter():
                out = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        else:
            out = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return out.float().numpy()


def compile_all(path, tmp_path, **options) -> dict:
    return {
        strategy: compile_file(path, tmp_path / strategy, CompileOptions(strategy=strategy, **options))
        for strategy in ("fuse", "merge", "strip")
    }


def assert_matches_torch(reports, model, atol):
    for strategy, report in reports.items():
        out = report["output"]["dir"] + "/model.onnx"
        for seq in SEQS:
            feeds = token_feeds(seq)
            expected = torch_logits(model, feeds, disable_adapter=strategy == "strip")
            got = run_onnx(out, feeds)[0]
            np.testing.assert_allclose(got, expected, atol=atol, rtol=atol, err_msg=f"{strategy} seq={seq}")


def base_gemms(layers: int, per_layer_projections: int) -> int:
    return layers * (per_layer_projections + 2) + 1  # + QK^T and PV per layer, + LM head


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_llama_all_projections_every_exporter(models, tmp_path, exporter):
    path, model = models.get(f"llama-{exporter}", export={"exporter": exporter})
    detection = detect_adapters(path)
    assert len(detection.sites) == 7 * LAYERS
    assert detection.rejections == []
    assert {s.rank for s in detection.sites} == {4}
    assert all(s.scale == pytest.approx(8 / 4) for s in detection.sites)
    groups = {}
    for site in detection.sites:
        groups.setdefault(site.group, []).append(site.projection)
    assert sorted(map(sorted, groups.values())) == sorted(
        [["k_proj", "q_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]] * LAYERS
    )

    reports = compile_all(path, tmp_path)
    unfused = base_gemms(LAYERS, 7) + 2 * 7 * LAYERS
    assert reports["fuse"]["input"]["gemm_count"] == unfused
    assert reports["fuse"]["output"]["gemm_count"] == LAYERS * (4 * 2 + 2) + 1
    assert reports["merge"]["output"]["gemm_count"] == base_gemms(LAYERS, 7)
    assert reports["strip"]["output"]["gemm_count"] == base_gemms(LAYERS, 7)
    for report in reports.values():
        assert report["verification"]["passed"] is True
        assert report["verification"]["worst"]["max_abs_diff"] <= 1e-4
    assert_matches_torch(reports, model, atol=1e-4)


@pytest.mark.parametrize("strategy", ["fuse", "merge", "strip"])
def test_output_is_idempotent(models, tmp_path, strategy):
    path, _ = models.get("llama-dynamo", export={"exporter": "dynamo"})
    first = compile_file(path, tmp_path / "once", CompileOptions(strategy=strategy))
    second = compile_file(tmp_path / "once" / "model.onnx", tmp_path / "twice", CompileOptions(strategy="fuse"))
    assert second["sites"] == [] and second["rejected"] == []
    assert second["message"].startswith("no adapter sites found")
    assert second["output"]["op_counts"] == first["output"]["op_counts"]


def test_fp16_model(models, tmp_path):
    path, model = models.get("llama-fp16", dtype=torch.float16, export={"exporter": "dynamo"})
    detection = detect_adapters(path)
    assert len(detection.sites) == 7 * LAYERS
    assert {s.dtype for s in detection.sites} == {"float16"}
    reports = compile_all(path, tmp_path)
    for report in reports.values():
        verification = report["verification"]
        assert verification["passed"] is True
        assert verification["cases"][0]["outputs"]["logits"]["atol"] == pytest.approx(1e-2)
    assert_matches_torch(reports, model, atol=2e-2)


def test_qwen2_projection_bias(models, tmp_path):
    path, model = models.get("qwen2", arch="qwen2", export={"exporter": "dynamo"})
    detection = detect_adapters(path)
    with_bias = sorted({s.projection for s in detection.sites if s.has_bias})
    assert with_bias == ["k_proj", "q_proj", "v_proj"]
    reports = compile_all(path, tmp_path)
    assert_matches_torch(reports, model, atol=1e-4)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_phi3_fused_base_projections(models, tmp_path, exporter):
    path, model = models.get(f"phi3-{exporter}", arch="phi3", export={"exporter": exporter})
    detection = detect_adapters(path)
    assert sorted({s.projection for s in detection.sites}) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert len(detection.sites) == 4 * LAYERS
    qkv = next(s for s in detection.sites if s.projection == "qkv_proj")
    assert qkv.out_features == 64 + 2 * 32  # q (4 heads x 16) + k, v (2 kv heads x 16)
    reports = compile_all(path, tmp_path)
    assert reports["fuse"]["output"]["gemm_count"] == LAYERS * (4 * 2 + 2) + 1
    assert_matches_torch(reports, model, atol=1e-4)


def test_rank_and_alpha_patterns_and_rslora(models, tmp_path):
    path, model = models.get(
        "patterns",
        r=4,
        alpha=8,
        rank_pattern={"q_proj": 8, "down_proj": 2},
        alpha_pattern={"v_proj": 32},
        use_rslora=True,
        export={"exporter": "dynamo"},
    )
    detection = detect_adapters(path)
    by_projection = {(s.layer, s.projection): s for s in detection.sites}
    assert by_projection[(0, "q_proj")].rank == 8
    assert by_projection[(0, "down_proj")].rank == 2
    assert by_projection[(1, "k_proj")].rank == 4
    assert by_projection[(0, "q_proj")].scale == pytest.approx(8 / math.sqrt(8))
    assert by_projection[(0, "v_proj")].scale == pytest.approx(32 / math.sqrt(4))
    assert by_projection[(0, "down_proj")].scale == pytest.approx(8 / math.sqrt(2))
    reports = compile_all(path, tmp_path)
    group = next(g for g in reports["fuse"]["plan"]["fused_groups"] if len(g["sites"]) == 3)
    assert group["rank_total"] == 8 + 4 + 4
    assert_matches_torch(reports, model, atol=1e-4)


def test_some_layers_some_projections(models, tmp_path):
    path, model = models.get("subset", targets=["q_proj", "v_proj", "down_proj"], layers=[1], export={"exporter": "dynamo"})
    detection = detect_adapters(path)
    assert sorted((s.layer, s.projection) for s in detection.sites) == [(1, "down_proj"), (1, "q_proj"), (1, "v_proj")]
    groups = {s.group for s in detection.sites if s.projection in ("q_proj", "v_proj")}
    assert len(groups) == 1
    reports = compile_all(path, tmp_path)
    # layer 1 only: q and v (3 GEMMs each) become one group of 2; down (3) becomes 2
    assert reports["fuse"]["input"]["gemm_count"] - reports["fuse"]["output"]["gemm_count"] == (3 + 3 + 3) - (2 + 2)
    assert_matches_torch(reports, model, atol=1e-4)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_kv_cache_graph(models, tmp_path, exporter):
    path, _ = models.get(f"cache-{exporter}", export={"exporter": exporter, "with_cache": True})
    reports = compile_all(path, tmp_path)
    for report in reports.values():
        verification = report["verification"]
        assert verification["passed"] is True
        case = verification["cases"][0]
        assert case["case"].startswith("seq=1,past=")
        assert case["inputs"]["past_key_values.0.key"][2] == 4
        assert {"logits", "present.0.key", "present.1.value"} <= set(case["outputs"])
