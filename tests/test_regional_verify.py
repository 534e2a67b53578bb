"""``--verify regions``: each rewritten region against the original region, one at a time.

Regions are found per family on tiny exports (GQA + RoPE llama with LoRA, FFA, FBA, FFBA, zFLoRA)
and hand-built branches (DoRA, GAWS, GAWS-D, VeRA, LoKr, head mixing); the regional verdict
equals the full check's on correct rewrites; a weight corrupted after the rewrite is caught,
naming the region that reads it; control flow falls back to the full check and says so; the
rewritten model is written once, into the output, and verified from there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from zflora_compile import cli, pipeline, regions, verify, zoo
from zflora_compile.adapters import AdapterConfig, attach_adapters, randomize_adapters
from zflora_compile.build import compile_file
from zflora_compile.errors import VerificationError
from zflora_compile.model_io import load_model
from zflora_compile.options import CompileOptions
from zflora_compile.pipeline import compile_model

try:
    import branch_graphs as bg
    from test_subgraphs import if_model
except ImportError:  # pragma: no cover - tests/ as a package
    from tests import branch_graphs as bg
    from tests.test_subgraphs import if_model

#: regions of a 2-layer export after fuse (a value the original holds under the same name and type
#: is compared where it is computed, so the residual stream cuts regions between blocks): lora: per
#: layer q+k+v (one fused GEMM), o_proj with the residual add, gate+up with the activation, down_proj
#: with the residual add; ffa and fba: per layer attention and MLP; ffba: the lanes cross every
#: layer; zflora: the widened embedding, then per projection
FUSE_REGIONS = {"lora": 8, "ffa": 4, "fba": 4, "ffba": 1, "zflora": 15}
TOY = ["dora", "gaws", "gaws_d", "vera", "lokr", "head_mixing"]


class Exports:
    def __init__(self, root: Path):
        self.root, self.paths = root, {}

    def get(self, family: str) -> Path:
        if family not in self.paths:
            torch.manual_seed(0)
            if family == "lora":
                model = zoo.build_lora_model(seed=0)  # llama: 4 heads over 2 KV heads (GQA), RoPE
            else:
                model = randomize_adapters(attach_adapters(zoo.build_base_model("llama", seed=0), AdapterConfig(family=family, rank=4, alpha=8)), seed=1)
            self.paths[family] = zoo.export_onnx(model.eval(), self.root / family / "model.onnx")
        return self.paths[family]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Exports:
    return Exports(tmp_path_factory.mktemp("regional"))


def _compile(path: Path, out: Path, strategy: str, mode: str) -> dict:
    return compile_file(path, out, CompileOptions(strategy=strategy, verify_mode=mode))


# ----------------------------------------------------------------------------- regions found


@pytest.mark.parametrize("family", sorted(FUSE_REGIONS))
def test_regions_per_family_and_their_boundaries(family, exports, tmp_path):
    source = exports.get(family)
    _compile(source, tmp_path / "out", "fuse", "full")
    original, rewritten = load_model(source), load_model(tmp_path / "out" / "model.onnx")
    found = regions.find_regions(original, rewritten)
    assert len(found) == FUSE_REGIONS[family]
    changed = {n.name for n in regions.changed_nodes(original, rewritten)}
    assert sorted(n for r in found for n in r.changed) == sorted(changed), "every changed node in exactly one region"
    old_names = {v.name for n in original.graph for v in n.outputs} | {v.name for v in original.graph.inputs}
    new_nodes = {n.name: n for n in rewritten.graph}
    graph_outputs = {v.name for v in rewritten.graph.outputs}
    for region in found:
        assert region.outputs and set(region.outputs) <= old_names, "each compared value exists in the original"
        assert set(region.inputs) <= old_names, "each fed value exists in the original"
        for name in region.outputs:  # compared: read outside the region (unchanged nodes, other regions) or a graph output
            value = next(v for n in region.changed for v in new_nodes[n].outputs if v.name == name)
            assert name in graph_outputs or any(user.name not in region.changed for user, _ in value.uses())
    if family == "lora":  # per layer: q+k+v read the normed hidden state and hand over three heads' views
        qkv = [r for r in found if any("q_proj+k_proj+v_proj" in n for n in r.changed)]
        assert len(qkv) == 2 and all(len(r.outputs) == 3 and len(r.inputs) == 1 for r in qkv)


@pytest.mark.parametrize("case", TOY)
@pytest.mark.parametrize("strategy", ["fuse", "merge", "strip"])
def test_a_hand_built_branch_is_one_region_from_hidden_to_y(case, strategy):
    model, _ = bg.LINEAR[case]()
    rewritten, report = compile_model(model, CompileOptions(strategy=strategy, verify_mode="regions"))
    section = report.verification
    assert section["mode"] == "regions" and section["passed"]
    written = ir.to_proto(rewritten).graph
    untouched = list(written.node) == list(model.graph.node) and list(written.initializer) == list(model.graph.initializer)  # GAWS: already its fused form
    assert len(section["regions"]) == (0 if untouched else 1)
    for region in section["regions"]:  # strip: the kept base projection is unchanged, its output fed
        assert region["outputs"] == ["y"] and "hidden" in region["inputs"] and set(region["inputs"]) <= {"hidden", "proj_mm", "proj_out"}
    _, full = compile_model(model, CompileOptions(strategy=strategy, verify_mode="full"))
    assert full.verification["mode"] == "full" and full.verification["passed"]


# ----------------------------------------------------------------------------- same verdict as full


@pytest.mark.parametrize(("family", "strategy"), [("lora", "fuse"), ("lora", "merge"), ("lora", "strip"), ("zflora", "fuse"), ("ffba", "merge")])
def test_regions_and_full_agree_on_a_correct_rewrite(family, strategy, exports, tmp_path):
    source = exports.get(family)
    full = _compile(source, tmp_path / "full", strategy, "full")
    by_region = _compile(source, tmp_path / "regions", strategy, "regions")
    assert full["verification"]["passed"] and full["verification"]["mode"] == "full"
    assert by_region["verification"]["passed"] and by_region["verification"]["mode"] == "regions", by_region["verification"]["mode_reason"]
    assert by_region["verification"]["reference"] == full["verification"]["reference"]
    assert all(r["passed"] for r in by_region["verification"]["regions"])
    assert (tmp_path / "full" / "model.onnx").read_bytes() == (tmp_path / "regions" / "model.onnx").read_bytes()


def test_external_data_is_read_lazily_and_verified_by_region(exports, tmp_path):
    source = tmp_path / "ext" / "model.onnx"
    source.parent.mkdir()
    onnx.save(onnx.load(str(exports.get("lora"))), str(source), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    report = _compile(source, tmp_path / "out", "merge", "regions")
    assert report["verification"]["mode"] == "regions" and report["verification"]["passed"]
    assert sorted(report["output"]["files"])[:2] == ["model.onnx", "model.onnx.data"]


@pytest.mark.parametrize("corrupt", [False, True])
def test_weights_read_from_their_files_give_the_same_verdict(exports, tmp_path, monkeypatch, capsys, corrupt):
    """Regions reference external weights in the original's and the output's data files (mapped
    while a session loads) instead of copying them in: the verdict is unchanged, a corrupted weight
    still fails in its region, and both files were handed to ONNX Runtime."""
    source = tmp_path / "ext" / "model.onnx"
    source.parent.mkdir()
    onnx.save(onnx.load(str(exports.get("lora"))), str(source), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    monkeypatch.setattr(regions, "REFERENCED_BYTES", 64)  # the tiny export's weights (its shape constants stay copied in)
    handed: list[set] = []
    real_session = verify.session

    def session(path, *, in_memory=None):
        handed.append(set(in_memory or {}))
        return real_session(path, in_memory=in_memory)

    monkeypatch.setattr(verify, "session", session)
    hit = _corrupting(monkeypatch, "merge") if corrupt else None
    out = tmp_path / "out"
    code = cli.main([str(source), "-o", str(out), "--strategy", "merge", "--verify", "regions", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["verification"]["mode"] == "regions", report["verification"].get("mode_reason")
    assert {"weights0.data", "weights1.data"} <= set().union(*handed), handed  # the original's file and the output's
    if corrupt:
        assert code == 1 and not out.exists()
        _named_region(report["message"], report["verification"], hit["readers"])
    else:
        assert code == 0 and report["verification"]["passed"]


def test_control_flow_falls_back_to_the_full_check_and_says_so():
    model, _ = if_model(near_miss=False)
    _, report = compile_model(model, CompileOptions(strategy="fuse", verify_mode="regions"))
    section = report.verification
    assert section["mode"] == "full" and section["passed"] and "regions" not in section
    assert section["mode_reason"].startswith("--verify regions; the model cannot be checked region by region (the model has control flow")
    assert "checked in full instead" in section["mode_reason"]


# ----------------------------------------------------------------------------- must catch


def _corrupting(monkeypatch, strategy: str) -> dict:
    """After the real rewrite, one weight is changed by 1% + 0.01: for fuse / merge the largest
    weight the rewrite wrote (new or replaced), for strip (or a rewrite that wrote none) the
    largest weight of the model."""
    real = pipeline.subgraphs.rewrite
    hit: dict = {}

    def rewrite(model, the_plan):
        before = {name: id(v.const_value) for name, v in model.graph.initializers.items()}
        real(model, the_plan)
        floats = [v for v in model.graph.initializers.values() if v.const_value is not None and v.const_value.dtype.is_floating_point()]
        written = [v for v in floats if before.get(v.name) != id(v.const_value)]
        if strategy != "strip" and written:  # GAWS is its own fused form: nothing written, a base weight then
            floats = written
        value = max(floats, key=lambda v: v.const_value.size)
        array = value.const_value.numpy()
        value.const_value = ir.tensor((array * 1.01 + 0.01).astype(array.dtype), name=value.name)
        hit["name"] = value.name
        hit["readers"] = {user.name for user, _ in value.uses()}

    monkeypatch.setattr(pipeline.subgraphs, "rewrite", rewrite)
    return hit


def _named_region(message: str, section: dict, readers: set[str]) -> None:
    """The message names a region, and that region holds a node reading the corrupted weight."""
    assert message.startswith("verification failed in region "), message
    index = int(message.split("verification failed in region ")[1].split()[0])
    region = next(r for r in section["regions"] if r["region"] == index)
    assert readers & set(region["changed_nodes"]), (readers, region["changed_nodes"])
    assert not region["passed"]


@pytest.mark.parametrize(("family", "strategy"), [(f, "fuse") for f in sorted(FUSE_REGIONS)] + [("lora", "merge"), ("lora", "strip")])
def test_a_corrupted_weight_fails_in_its_region(family, strategy, exports, tmp_path, monkeypatch, capsys):
    hit = _corrupting(monkeypatch, strategy)
    out = tmp_path / "out"
    code = cli.main([str(exports.get(family)), "-o", str(out), "--strategy", strategy, "--verify", "regions", "--json"])
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert code == 1 and report["status"] == "verification_failed" and not out.exists()
    assert report["verification"]["mode"] == "regions"
    _named_region(report["message"], report["verification"], hit["readers"])
    assert "verification failed in region " in captured.err


@pytest.mark.parametrize("case", TOY)
@pytest.mark.parametrize("strategy", ["fuse", "merge", "strip"])
def test_a_corrupted_weight_of_a_hand_built_family_fails_in_its_region(case, strategy, monkeypatch):
    hit = _corrupting(monkeypatch, strategy)
    model, _ = bg.LINEAR[case]()
    with pytest.raises(VerificationError) as caught:
        compile_model(model, CompileOptions(strategy=strategy, verify_mode="regions"))
    _named_region(str(caught.value), caught.value.report["verification"], hit["readers"])


# ----------------------------------------------------------------------------- mode, writing, progress


def test_auto_picks_full_below_the_threshold_and_regions_above(monkeypatch):
    assert verify.choose_mode("auto", verify.AUTO_REGIONS_BYTES - 1)[0] == "full"
    assert verify.choose_mode("auto", verify.AUTO_REGIONS_BYTES)[0] == "regions"
    assert verify.choose_mode("regions", 10) == ("regions", "--verify regions")
    assert verify.choose_mode("full", 10**12) == ("full", "--verify full")
    model, _ = bg.LINEAR["dora"]()
    _, report = compile_model(model, CompileOptions())
    assert report.verification["mode"] == "full" and report.verification["mode_reason"].startswith("auto: 0.00 GiB of weights, below 2 GiB")
    monkeypatch.setattr(verify, "AUTO_REGIONS_BYTES", 100)  # this model's weights are more than 100 bytes
    _, report = compile_model(model, CompileOptions())
    assert report.verification["mode"] == "regions" and report.verification["mode_reason"].startswith("auto: ") and report.verification["passed"]


def test_verify_flags(tmp_path, capsys):
    model, _ = bg.LINEAR["dora"]()
    source = tmp_path / "m.onnx"
    onnx.save(model, str(source))
    assert cli.main([str(source), "-o", str(tmp_path / "a"), "--no-verify", "--verify", "regions"]) == 2
    assert "--no-verify contradicts --verify regions" in capsys.readouterr().err
    assert cli.main([str(source), "-o", str(tmp_path / "b"), "--verify", "off", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verification"] == {"passed": None, "skipped": "--no-verify"}
    assert report["options"]["verify"] is False and report["options"]["verify_mode"] == "off"
    assert cli.main([str(source), "-o", str(tmp_path / "c"), "--verify", "regions", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["options"]["verify_mode"] == "regions" and report["verification"]["mode"] == "regions"


@pytest.mark.parametrize("mode", ["full", "regions"])
def test_the_rewritten_model_is_written_once_and_verified_from_the_output(mode, exports, tmp_path, monkeypatch):
    import zflora_compile.build as build

    saves, verified = [], []
    for module in (pipeline, build):
        real_save = module.save_model
        monkeypatch.setattr(module, "save_model", lambda model, path, *, external=None, real_save=real_save: saves.append(Path(path)) or real_save(model, path, external=external))
    real_full, real_regions = pipeline.verify_models, pipeline.verify_regions

    def full(reference, rewritten, *args, **kwargs):
        verified.append((Path(rewritten), os.stat(rewritten).st_ino))
        return real_full(reference, rewritten, *args, **kwargs)

    def by_region(original, rewritten, signature, rewritten_path, *args, **kwargs):
        verified.append((Path(rewritten_path), os.stat(rewritten_path).st_ino))
        return real_regions(original, rewritten, signature, rewritten_path, *args, **kwargs)

    monkeypatch.setattr(pipeline, "verify_models", full)
    monkeypatch.setattr(pipeline, "verify_regions", by_region)
    out = tmp_path / "out"
    report = _compile(exports.get("lora"), out, "fuse", mode)
    assert report["verification"]["mode"] == mode
    assert len(saves) == 1 and saves[0].name == "model.onnx" and saves[0].parent.parent == tmp_path, saves  # the staging directory
    [(path, inode)] = verified
    assert path == saves[0] and os.stat(out / "model.onnx").st_ino == inode, "the file verified is the file delivered"


class RecordingProgress:
    def __init__(self):
        self.bars, self.advanced = [], 0

    def step(self, name):
        import contextlib

        return contextlib.nullcontext()

    def bar(self, name, total):
        import contextlib

        self.bars.append((name, total))

        @contextlib.contextmanager
        def counting():
            def advance():
                self.advanced += 1

            yield advance

        return counting()


def test_one_progress_tick_per_region(exports, tmp_path):
    progress = RecordingProgress()
    report = compile_file(exports.get("lora"), tmp_path / "out", CompileOptions(strategy="merge", verify_mode="regions"), progress=progress)
    count = len(report["verification"]["regions"])
    [(name, total)] = progress.bars
    assert count > 1 and name == f"verify {total} region(s)" and total >= count
    assert progress.advanced == report["verification"]["region_checks"] >= count


def test_report_names_what_each_region_compared(exports, tmp_path):
    report = _compile(exports.get("lora"), tmp_path / "out", "strip", "regions")
    section = report["verification"]
    assert section["mode_reason"] == "--verify regions" and section["reference"].startswith("the input model with every detected adapter's B set to zero")
    assert len(section["cases"]) == sum(1 for r in section["regions"]) * len({c["case"].split(": ", 1)[1] for c in section["cases"]})
    for region in section["regions"]:
        assert region["changed_nodes"] and region["original_nodes"] and region["outputs"] and region["passed"]
        assert len(region["original_nodes"]) > len(region["changed_nodes"]), "the original computes the stripped branch too"
    assert np.isfinite(section["worst"]["max_abs_diff"])


# ----------------------------------------------------------------------------- the fuzzer's graphs


FUZZ_SEEDS = range(10_000, 10_060)


def test_fuzzed_graphs_pass_by_region_as_they_pass_in_full():
    """The differential fuzzer's graphs (every bias form, casts, lanes with hosts, zFLoRA reads,
    extra consumers and graph outputs at every intermediate) judged with ``--verify regions``: no
    crash, no wrong model written, and no false alarm (a merge gives a projection's output a new
    meaning before its bias add; an FFA lane ``t @ A`` is a function of the ``t`` merge reads)."""
    import fuzz_graphs

    bad = [f"{v.seed} {v.strategy}: {v.cls}: {v.detail[:300]}" for v in fuzz_graphs.fuzz(FUZZ_SEEDS, verify_mode="regions") if v.cls in ("crash", "wrong", "caught")]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("strategy", ["fuse", "merge", "strip"])
def test_fuzzed_graphs_with_a_corrupted_weight_are_caught_by_region_as_in_full(strategy, monkeypatch):
    """A weight corrupted after the rewrite: whenever the full check catches it, so does the regional one."""
    import fuzz_graphs

    _corrupting(monkeypatch, strategy)
    compared = 0
    for seed in FUZZ_SEEDS:
        case = fuzz_graphs.generate(seed)
        verdicts = {}
        for mode in ("full", "regions"):
            try:
                compile_model(ir.from_proto(case.model), CompileOptions(strategy=strategy, verify_mode=mode))
                verdicts[mode] = "passed"
            except VerificationError as error:
                verdicts[mode] = "caught" if error.report.get("verification", {}).get("passed") is False else f"refused: {error}"
            except Exception as error:  # noqa: BLE001 - a refusal (nothing to rewrite, unrecognised) is the same in both modes
                verdicts[mode] = f"refused: {type(error).__name__}"
        assert verdicts["regions"] == verdicts["full"], (seed, verdicts)
        compared += verdicts["full"] == "caught"
    assert compared > len(FUZZ_SEEDS) // 10, "the corruption reaches the verification in enough seeds"
