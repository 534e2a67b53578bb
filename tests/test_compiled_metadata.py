"""Compiled models say what was compiled in (``zflora.compiled`` in ``metadata_props``), and a fused
model stays separable: ``strip`` of the tool's own fused output is the base model.

On the shipped LoRA example and a PEFT DoRA export: fuse writes the record (which columns of each
widened weight are adapter lanes, which constants are the adapter's); strip of the fused model
equals strip of the original in ONNX Runtime and keeps one packed GEMM per fused group; strip of a
merged model, of a tampered fused model, and of a fused zFLoRA model is refused (exit 2); an FFBA
fused model strips exactly to the base export; ``inspect`` prints the record.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from zflora_compile import metadata
from zflora_compile.build import compile_file
from zflora_compile.cli import main
from zflora_compile.options import CompileOptions

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_llama_lora.onnx"
ATOL = 2e-4
DIMS = {"batch": 1, "batch_size": 1, "sequence_length": 5, "past_sequence_length": 3, "total_sequence_length": 8}


def feeds_for(path, seed: int = 0) -> dict:
    """Seeded inputs for every graph input (token ids and masks, past keys/values)."""
    rng = np.random.default_rng(seed)
    out = {}
    for arg in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs():
        shape = [d if isinstance(d, int) else DIMS.get(d, 5) for d in arg.shape]
        if "int64" in arg.type:
            out[arg.name] = np.ones(shape, np.int64) if "mask" in arg.name else rng.integers(0, 100, size=shape).astype(np.int64)
        else:
            out[arg.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def outputs(path, feeds) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def assert_same(got, want):
    feeds = feeds_for(want)
    for a, b in zip(outputs(got, feeds), outputs(want, feeds), strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def gemms(path) -> int:
    return sum(n.op_type in ("MatMul", "Gemm") for n in onnx.load(str(path)).graph.node)


def record_of(path) -> dict:
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(props[metadata.KEY])


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def compiled(source, out_dir: Path, strategy: str) -> Path:
    compile_file(source, out_dir, CompileOptions(strategy=strategy))
    return out_dir / "model.onnx"


@pytest.fixture(scope="module")
def dora_model(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from zflora_compile import zoo

    path = tmp_path_factory.mktemp("dora") / "model.onnx"
    return zoo.export_onnx(zoo.build_peft_variant("dora", num_hidden_layers=1), path)


# ---------------------------------------------------------------- LoRA (the shipped example)


@pytest.fixture(scope="module")
def lora_fused(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lora")
    return compiled(EXAMPLE, root / "fused", "fuse"), compiled(EXAMPLE, root / "strip", "strip")


def test_fuse_writes_the_record(lora_fused):
    fused, _ = lora_fused
    record = record_of(fused)
    assert record["format"] == 1 and record["tool"] == "zflora-compile"
    (entry,) = record["compilations"]
    assert entry["strategy"] == "fuse" and entry["version"] and entry["families"] == ["lora"]
    assert len(entry["sites"]) == 14 and len(entry["groups"]) == 8 and entry["merged"] == [] and entry["widened"] == []
    qkv = entry["groups"][0]
    assert qkv["sites"] == ["lora0", "lora1", "lora2"] and qkv["labels"][0] == "model.layers.0.self_attn.q_proj"
    assert (qkv["in_features"], qkv["base_width"], qkv["rank_width"], qkv["out_splits"]) == (128, 256, 24, [128, 64, 64])
    initializers = {t.name: list(t.dims) for t in onnx.load(str(fused)).graph.initializer}
    assert initializers[qkv["weight"]] == [128, 256 + 24]
    assert initializers[qkv["lowrank"]] == [24, 256]
    assert qkv["column_scale"] is None and qkv["bias"] is None


def test_strip_of_the_fused_model_is_the_base(lora_fused, tmp_path):
    fused, stripped = lora_fused
    again = compiled(fused, tmp_path / "again", "strip")
    assert_same(again, stripped)
    # the original strip has 19 GEMMs: 14 base projections and 5 others (attention, lm_head);
    # strip of the fused model keeps each of the 8 groups packed: 8 + 5
    assert gemms(stripped) == 19 and gemms(fused) == 21 and gemms(again) == 8 + 5
    report = json.loads((tmp_path / "again" / "report.json").read_text())
    assert report["verification"]["passed"] and "low-rank constants its metadata names set to zero" in report["verification"]["reference"]
    last = record_of(again)["compilations"][-1]
    assert last["strategy"] == "strip" and len(last["removed"]["groups"]) == 8
    assert metadata.active(record_of(again)) == []


def test_strip_of_a_merged_model_is_refused(tmp_path, capsys):
    merged = compiled(EXAMPLE, tmp_path / "merged", "merge")
    entry = record_of(merged)["compilations"][0]
    assert entry["strategy"] == "merge" and len(entry["merged"]) == 14 and entry["merged"][0]["separable"] is False
    code, _, err = cli(capsys, merged, "--strategy", "strip", "-o", tmp_path / "out")
    assert code == 2
    assert "the adapter was merged into the weights by zflora-compile" in err and "a merged adapter cannot be separated" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tamper", ["record", "graph", "shape"])
def test_strip_of_a_tampered_model_is_refused(lora_fused, tmp_path, capsys, tamper):
    fused, _ = lora_fused
    model = onnx.load(str(fused))
    prop = next(p for p in model.metadata_props if p.key == metadata.KEY)
    record = json.loads(prop.value)
    group = record["compilations"][0]["groups"][1]
    if tamper == "record":  # a name changed in the record
        group["lowrank"] += ".edited"
        prop.value = json.dumps(record)
    elif tamper == "graph":  # the initializer renamed in the graph
        init = next(t for t in model.graph.initializer if t.name == group["lowrank"])
        for node in model.graph.node:
            node.input[:] = ["renamed" if i == init.name else i for i in node.input]
        init.name = "renamed"
    else:  # the record's widths no longer match the weight
        group["rank_width"] += 1
        prop.value = json.dumps(record)
    path = tmp_path / "tampered.onnx"
    onnx.save(model, str(path))
    code, _, err = cli(capsys, path, "--strategy", "strip", "-o", tmp_path / "out")
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert "strip of a compiled model" in line and "edited after zflora-compile wrote it" in line


def test_inspect_says_what_was_compiled_in(lora_fused, capsys):
    fused, _ = lora_fused
    code, out, _ = cli(capsys, "inspect", fused)
    assert code == 0
    text = " ".join(out.split())
    assert "compiled: fuse by zflora-compile" in text and "(lora): 14 site(s), 8 fused group(s)" in text
    assert "fused group model.layers.0.self_attn.q_proj+k_proj+v_proj: 256 base + 24 adapter lane column(s)" in text
    code, out, _ = cli(capsys, "inspect", fused, "--json")
    compiled_in = json.loads(out)["compiled"]
    assert compiled_in["active"]["strategies"] == ["fuse"] and compiled_in["active"]["families"] == ["lora"]
    assert len(compiled_in["active"]["groups"]) == 8 and compiled_in["compilations"][0]["version"]
    code, out, _ = cli(capsys, "inspect", EXAMPLE, "--json")
    assert json.loads(out)["compiled"] is None


# ---------------------------------------------------------------- DoRA (PEFT export)


def test_dora_fuse_then_strip(dora_model, tmp_path):
    fused = compiled(dora_model, tmp_path / "fused", "fuse")
    entry = record_of(fused)["compilations"][0]
    assert entry["families"] == ["dora"] and all(g["column_scale"] for g in entry["groups"])
    initializers = {t.name: list(t.dims) for t in onnx.load(str(fused)).graph.initializer}
    for group in entry["groups"]:
        assert initializers[group["column_scale"]] == [group["base_width"]]
        assert initializers[group["weight"]] == [group["in_features"], group["base_width"] + group["rank_width"]]
    stripped = compiled(dora_model, tmp_path / "strip", "strip")
    again = compiled(fused, tmp_path / "again", "strip")
    assert_same(again, stripped)
    untouched = gemms(stripped) - len(entry["sites"])
    assert gemms(again) == len(entry["groups"]) + untouched  # 1 layer: 4 groups (qkv, o, gate+up, down) + lm_head and attention
    assert len(entry["groups"]) == 4


def test_dora_merged_then_strip_is_refused(dora_model, tmp_path, capsys):
    merged = compiled(dora_model, tmp_path / "merged", "merge")
    code, _, err = cli(capsys, merged, "--strategy", "strip", "-o", tmp_path / "out")
    assert code == 2 and "a merged adapter cannot be separated" in err


# ---------------------------------------------------------------- lane families (FFBA, zFLoRA)


def lane_model(root: Path, family: str | None) -> Path:
    torch = pytest.importorskip("torch")
    from zflora_compile import zoo
    from zflora_compile.adapters import AdapterConfig, attach_adapters, randomize_adapters

    torch.manual_seed(0)
    model = zoo.build_base_model("llama", seed=0)
    if family is not None:
        model = randomize_adapters(attach_adapters(model, AdapterConfig(family=family, rank=4, alpha=8)), seed=1)
    return zoo.export_onnx(model.eval(), root / (family or "base") / "model.onnx")


def test_ffba_fused_strips_to_the_base(tmp_path):
    base, source = lane_model(tmp_path, None), lane_model(tmp_path, "ffba")
    fused = compiled(source, tmp_path / "fused", "fuse")
    entry = record_of(fused)["compilations"][0]
    assert entry["widened"] and all(w["family"] in ("ffa", "fba", "ffba") for w in entry["widened"])
    stripped = compiled(fused, tmp_path / "again", "strip")
    assert_same(stripped, base)
    assert gemms(stripped) == gemms(base)
    removed = record_of(stripped)["compilations"][-1]["removed"]
    assert sorted(removed["widened"]) == sorted(w["site"] for w in entry["widened"])


def test_zflora_fused_strip_is_refused(tmp_path, capsys):
    fused = compiled(lane_model(tmp_path, "zflora"), tmp_path / "fused", "fuse")
    code, _, err = cli(capsys, fused, "--strategy", "strip", "-o", tmp_path / "out")
    assert code == 2
    assert re.search(r"zFLoRA adapter at '.+' was compiled in by zflora-compile .+ no stripped form", err)


def test_a_fused_form_without_a_record_is_refused():
    """A fused rewrite whose emit notes nothing (e.g. a packed grouped GEMM) is listed as unrecorded: strip refuses it."""
    from zflora_compile.errors import InputError

    class Step:
        section = "fused_groups"
        sites = [type("Site", (), {"site_id": "gaws0", "family": "gaws", "label": "q_proj"})()]

    detection = type("Detection", (), {"all_sites": Step.sites})()
    record = {"compilations": [metadata.compilation("fuse", detection, [Step()])]}
    assert record["compilations"][0]["unrecorded"][0]["sites"] == ["gaws0"]
    with pytest.raises(InputError, match="gaws fused groups compiled in by zflora-compile .* carry no record of their adapter lanes"):
        metadata.check_separable(record)


@pytest.mark.parametrize("kind", ["gaws", "gaws_d"])
def test_gaws_fused_strips_to_the_base(tmp_path, kind):
    """GAWS / GAWS-D fused (one GEMM and one grouped GEMM per input): the record names the grouped
    block constant; strip of the fused model passes every grouped part's add through."""
    from zflora_compile import zoo
    from zflora_compile.adapters.gaws import build_gaws_model

    source = zoo.export_onnx(build_gaws_model(kind, num_hidden_layers=1), tmp_path / "model.onnx")
    fused = compiled(source, tmp_path / "fused", "fuse")
    grouped = record_of(fused)["compilations"][0]["grouped"]
    assert [g["families"] for g in grouped] == [[kind], [kind]]  # q/k/v and gate/up
    stripped = compiled(fused, tmp_path / "stripped", "strip")
    base = compiled(source, tmp_path / "base", "strip")
    assert_same(stripped, base)
    assert gemms(stripped) == gemms(base) - 3  # q/k/v and gate/up stay packed (one GEMM each): still the base function
