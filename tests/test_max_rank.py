"""``--max-rank R``: zero adapter lanes up to rank R per adapted projection, exact and recorded.

A padded compile computes the same function as the unpadded one (ONNX Runtime, max |diff| <= 1e-5,
and verified by the compile itself); the record names the padded capacity (``rank_width`` = sites x
R, ``max_rank``, ``adapter_ranks``) and the widened weight has exactly that many zero columns / the
low-rank constant that many zero rows; any adapter up to R then swaps in with identical shapes.
Without ``--max-rank`` the output is byte-identical to a compile without the option; R equal to
the ranks adds no lane; R below a rank, or with merge, is refused (exit 2); lane blocks of FFA are
padded per lane, zFLoRA is left at its rank.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from test_swap import ATOL, cli, compiled, export, logits, peft_lora  # noqa: E402
from zflora_compile import metadata  # noqa: E402
from zflora_compile.api import fuse_adapters  # noqa: E402


def record(path: Path) -> dict:
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(props[metadata.KEY])["compilations"][-1]


def initializers(path: Path) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("maxrank")
    a = export(peft_lora(r=4, seed=1, rank_pattern={"q_proj": 2}), root / "a.onnx")
    return {"a": a, "plain": compiled(a, root / "plain"), "padded": compiled(a, root / "padded", max_rank=8), "root": root}


def test_padding_is_exact_and_zero(lora):
    np.testing.assert_allclose(logits(lora["padded"]), logits(lora["plain"]), atol=ATOL, rtol=0)
    report = json.loads((lora["padded"].parent / "report.json").read_text())
    assert report["verification"]["passed"] and report["options"]["max_rank"] == 8
    jsonschema = pytest.importorskip("jsonschema")
    from importlib import resources

    jsonschema.validate(report, json.loads(resources.files("zflora_compile").joinpath("report_schema.json").read_text()))
    groups, plain = record(lora["padded"])["groups"], record(lora["plain"])["groups"]
    tensors = initializers(lora["padded"])
    qkv, qkv_plain = groups[0], plain[0]
    assert qkv["rank_width"] == 3 * 8 and qkv_plain["rank_width"] == 2 + 4 + 4
    assert qkv["max_rank"] == 8 and qkv["adapter_ranks"] == [2, 4, 4] and "max_rank" not in qkv_plain
    weight, low = tensors[qkv["weight"]], tensors[qkv["lowrank"]]
    D, used = qkv["base_width"], 10
    assert weight.shape == (64, D + 24) and low.shape == (24, D)
    assert not weight[:, D + used :].any() and not low[used:].any()  # the zero lanes
    np.testing.assert_array_equal(weight[:, : D + used], initializers(lora["plain"])[qkv_plain["weight"]])


def test_without_max_rank_the_output_is_byte_identical(lora, tmp_path):
    again = compiled(lora["a"], tmp_path / "again")
    assert again.read_bytes() == lora["plain"].read_bytes()


def test_max_rank_equal_to_the_ranks_adds_no_lane(lora, tmp_path):
    same = compiled(lora["a"], tmp_path / "same", max_rank=4)
    qkv, o_proj = record(same)["groups"][:2]
    assert qkv["rank_width"] == 12 and not initializers(same)[qkv["weight"]][:, -2:].any()  # q's rank 2 padded to 4
    plain = record(lora["plain"])["groups"][1]
    assert o_proj["rank_width"] == 4 == plain["rank_width"]  # rank 4 already: no zero lane
    np.testing.assert_array_equal(initializers(same)[o_proj["weight"]], initializers(lora["plain"])[plain["weight"]])


def test_compiling_the_padded_model_again_adds_nothing(lora, tmp_path):
    again = compiled(lora["padded"], tmp_path / "again", max_rank=8)
    report = json.loads((tmp_path / "again" / "report.json").read_text())
    props = {p.key: p.value for p in onnx.load(str(again), load_external_data=False).metadata_props}
    assert report["plan"]["fused_groups"] == [] and len(json.loads(props[metadata.KEY])["compilations"]) == 1  # nothing new compiled in
    assert record(again)["groups"] == record(lora["padded"])["groups"]
    np.testing.assert_allclose(logits(again), logits(lora["padded"]), atol=ATOL, rtol=0)


def test_any_rank_up_to_r_swaps_in_with_identical_shapes(lora, capsys, tmp_path):
    big = peft_lora(r=8, seed=3)
    big.save_pretrained(tmp_path / "r8")
    code, _, err = cli(capsys, "swap", lora["padded"], "--adapter", tmp_path / "r8", "-o", tmp_path / "s")
    assert code == 0, err
    shapes = {k: v.shape for k, v in initializers(tmp_path / "s" / "model.onnx").items()}
    assert shapes == {k: v.shape for k, v in initializers(lora["padded"]).items()}
    scratch = compiled(export(big, tmp_path / "r8.onnx"), tmp_path / "fr8")
    np.testing.assert_allclose(logits(tmp_path / "s" / "model.onnx"), logits(scratch), atol=ATOL, rtol=0)


def test_refusals(lora, capsys, tmp_path):
    code, _, err = cli(capsys, lora["a"], "-o", tmp_path / "low", "--max-rank", "3")
    assert code == 2 and "--max-rank 3 is below the rank 4" in err and not (tmp_path / "low").exists()
    code, _, err = cli(capsys, lora["a"], "-o", tmp_path / "merge", "--max-rank", "8", "--strategy", "merge")
    assert code == 2 and "apply to --strategy fuse" in err
    code, _, err = cli(capsys, lora["a"], "-o", tmp_path / "zero", "--max-rank", "0")
    assert code == 2 and "--max-rank must be an integer >= 1" in err


def test_api(lora):
    proto = fuse_adapters(onnx.load(str(lora["a"])), max_rank=6)
    group = json.loads({p.key: p.value for p in proto.metadata_props}[metadata.KEY])["compilations"][-1]["groups"][0]
    assert group["rank_width"] == 18 and group["max_rank"] == 6


@pytest.mark.parametrize("family", ["ffa", "zflora"])
def test_lane_families(family, tmp_path):
    from test_swap_lanes import lane_model

    a = export(lane_model(family, 1, rank=2), tmp_path / "a.onnx")
    plain, padded = compiled(a, tmp_path / "plain"), compiled(a, tmp_path / "padded", max_rank=5)
    np.testing.assert_allclose(logits(padded), logits(plain), atol=ATOL, rtol=0)
    widened = record(padded)["widened"]
    if family == "zflora":  # the residual stream keeps its width: no padding
        assert [w["widened_shape"] for w in widened] == [w["widened_shape"] for w in record(plain)["widened"]]
        assert all("max_rank" not in w for w in widened)
    else:
        assert all(w["max_rank"] == 5 and all(r == 5 for r in w["out_splits"][1:] + w["read_ranks"]) for w in widened)
        assert any(len(w["out_splits"]) > 1 for w in widened) and any(w["read_ranks"] for w in widened)


def test_torch_fx_program_is_padded_exactly():
    from zflora_compile.pipeline import compile_model
    from zflora_compile.options import CompileOptions

    model = peft_lora(r=4, seed=1)
    program = torch.export.export(*_program_args(model), strict=False)
    plain, _ = compile_model(program, CompileOptions())
    padded, report = compile_model(program, CompileOptions(max_rank=8))
    assert report.plan.to_json()["fused_groups"][0]["rank_total"] == 24
    ids = torch.randint(0, 128, (1, 7))  # the exported (static) sequence length
    mask = torch.ones(1, 7, dtype=torch.long)
    with torch.no_grad():
        want, got = plain.module()(ids, mask), padded.module()(ids, mask)
    np.testing.assert_allclose(got[0].numpy(), want[0].numpy(), atol=ATOL, rtol=0)


def _program_args(model):
    from zflora_compile import zoo

    wrapper = zoo._ExportWrapper(model, False).eval()
    return wrapper, (torch.randint(0, 128, (1, 7)), torch.ones(1, 7, dtype=torch.long))
