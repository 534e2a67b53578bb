"""FFA, FBA, FFBA and zFLoRA in exported ONNX models: detection, zero-extra-GEMM fusion, exactness.

Each model is a tiny Llama-family decoder with adapters from ``zflora_compile.adapters`` (random,
non-zero adapter weights), exported with the dynamo exporter, compiled by ``compile_file`` (which
verifies before writing) and then compared again here with ONNX Runtime against the unfused
input: fp32 logits within 1e-4. Node counts are compared with the same base model exported
without adapters.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from conftest import run_onnx, token_feeds  # noqa: E402

from zflora_compile import zoo  # noqa: E402
from zflora_compile.adapters import AdapterConfig, attach_adapters, randomize_adapters  # noqa: E402
from zflora_compile.cli import main  # noqa: E402
from zflora_compile.build import compile_file  # noqa: E402
from zflora_compile.options import CompileOptions  # noqa: E402
from zflora_compile.errors import InputError  # noqa: E402

RANK = 4
ATOL = 1e-4
FAMILIES = ("ffa", "fba", "ffba", "zflora")
# Adapter paths (lanes) carried by a cross family in the 2-layer model with every block adapted:
# each costs one Split (the host's cut) and one Concat (shared by the readers of one input).
CROSS_LANES = {"ffa": 4, "fba": 4, "ffba": 8}


class Exports:
    def __init__(self, root):
        self.root = root
        self.paths: dict = {}

    def get(self, family: str | None, arch: str = "llama", exporter: str = "dynamo", lora: list[str] | None = None, **cfg):
        key = (family, arch, exporter, tuple(lora or ()), repr(sorted(cfg.items(), key=str)))
        if key not in self.paths:
            torch.manual_seed(0)
            model = zoo.build_base_model(arch, seed=0)
            if family is not None:
                model = randomize_adapters(attach_adapters(model, AdapterConfig(family=family, rank=RANK, alpha=8, **cfg)), seed=1)
            if lora:
                import peft

                model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=8, target_modules=lora, init_lora_weights=False))
            path = self.root / f"m{len(self.paths)}" / "model.onnx"
            self.paths[key] = zoo.export_onnx(model.eval(), path, exporter=exporter)
        return self.paths[key]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Exports:
    return Exports(tmp_path_factory.mktemp("lane_models"))


def ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def assert_same_logits(got_path, want_path, seqs=(1, 7)):
    for seq in seqs:
        feeds = token_feeds(seq)
        np.testing.assert_allclose(run_onnx(got_path, feeds)[0], run_onnx(want_path, feeds)[0], atol=ATOL, rtol=0)


def compiled(path, tmp_path, strategy="fuse"):
    report = compile_file(path, tmp_path / f"out_{strategy}", CompileOptions(strategy=strategy))
    return tmp_path / f"out_{strategy}" / "model.onnx", report


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_has_exactly_the_base_gemms_and_is_exact(family, exports, tmp_path):
    source, base = exports.get(family), exports.get(None)
    out, report = compiled(source, tmp_path)
    assert report["verification"]["passed"] and not report["rejected"]
    fused, base_ops, unfused = ops(out), ops(base), ops(source)
    assert unfused["MatMul"] > base_ops["MatMul"]
    assert fused["MatMul"] == base_ops["MatMul"] == report["output"]["gemm_count"]
    if family == "zflora":
        # only wider weights: every op type occurs exactly as often as in the base model
        assert fused == base_ops
    else:
        lanes = CROSS_LANES[family]
        assert fused["Split"] == base_ops["Split"] + lanes
        assert fused["Concat"] == base_ops["Concat"] + lanes
        assert {k: v for k, v in fused.items() if k not in ("Split", "Concat")} == {k: v for k, v in base_ops.items() if k not in ("Split", "Concat")}
    assert_same_logits(out, source)
    feeds = token_feeds(7)
    assert np.abs(run_onnx(source, feeds)[0] - run_onnx(base, feeds)[0]).max() > 1e-3  # live adapters: not vacuous


def test_zflora_embedding_and_lm_head_are_widened(exports, tmp_path):
    out, report = compiled(exports.get("zflora"), tmp_path)
    model = onnx.load(str(out))
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    d, r, vocab = 64, RANK, 128
    gather = next(n for n in model.graph.node if n.op_type == "Gather" and inits.get(n.input[0], (0,))[0] == vocab)
    assert inits[gather.input[0]] == (vocab, d + r)  # [E | E_z]
    head = next(n for n in model.graph.node if n.op_type == "MatMul" and inits.get(n.input[1], (0, 0))[1] == vocab)
    assert inits[head.input[1]] == (d + r, vocab)  # [[Wlm], [s Blm]]
    sites = {s["label"].removeprefix("model."): s for s in report["sites"]}
    assert sites["embed_tokens"]["kind"] == "embedding" and sites["embed_tokens"]["writes"][0]["zero"]
    assert sites["lm_head"]["reads"] == [{"lane": "zflora.stream", "rank": r, "scale": 2.0, "zero": False}]


def test_zflora_partial_layers_learned_lanes(exports, tmp_path):
    """Blocks without adapter: entries cut the lanes (zero rows), exits pad zeros (zero columns)."""
    source = exports.get("zflora", target="mlp", layers=[1], zflora_embedding="learned")
    assert ops(source)["Pad"] == 3
    out, report = compiled(source, tmp_path)
    assert ops(out) == ops(exports.get(None))
    assert_same_logits(out, source)
    reads = [r for s in report["sites"] for r in s["reads"]]
    assert sum(r["zero"] for r in reads) == 3 + 2 + 3  # layer 0 q/k/v, gate/up; layer 1 q/k/v
    assert not next(s for s in report["sites"] if s["kind"] == "embedding")["writes"][0]["zero"]


@pytest.mark.parametrize("family", ["ffba", "zflora"])
def test_unoptimized_export(family, exports, tmp_path):
    """Transpose(W) weights, per-projection Slices and an in-graph zFLoRA norm weight."""
    source = exports.get(family, exporter="dynamo-noopt")
    out, report = compiled(source, tmp_path)
    assert report["output"]["gemm_count"] == ops(exports.get(None, exporter="dynamo-noopt"))["MatMul"]
    assert_same_logits(out, source)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
@pytest.mark.parametrize("family", ["ffba", "zflora"])
def test_other_architectures(arch, family, exports, tmp_path):
    """Qwen2: q/k/v carry a bias, so FBA/zFLoRA reads are added after the bias Add."""
    source = exports.get(family, arch=arch)
    out, report = compiled(source, tmp_path)
    assert not report["rejected"]
    assert report["output"]["gemm_count"] == ops(exports.get(None, arch=arch))["MatMul"]
    assert_same_logits(out, source)


def test_mixed_lora_and_ffba_in_one_run(exports, tmp_path):
    source = exports.get("ffba", target="attention", lora=["down_proj"])
    out, report = compiled(source, tmp_path)
    families = collections.Counter(s["family"] for s in report["sites"])
    assert families["lora"] == 2 and sum(families.values()) > 2 and not report["rejected"]
    base_gemms = ops(exports.get(None))["MatMul"]
    assert report["output"]["gemm_count"] == base_gemms + 2  # LoRA fuse keeps one low-rank GEMM per group
    assert_same_logits(out, source)


@pytest.mark.parametrize("family", ["ffa", "zflora"])
def test_merge_widens_too(family, exports, tmp_path):
    source = exports.get(family)
    out, report = compiled(source, tmp_path, "merge")
    assert report["output"]["gemm_count"] == ops(exports.get(None))["MatMul"]
    assert_same_logits(out, source)


@pytest.mark.parametrize("family", ["ffa", "fba", "ffba"])
def test_strip_gives_the_base_model(family, exports, tmp_path):
    out, report = compiled(exports.get(family), tmp_path, "strip")
    assert ops(out) == ops(exports.get(None))
    assert_same_logits(out, exports.get(None))


def test_zflora_strip_is_refused_and_writes_nothing(exports, tmp_path, capsys):
    with pytest.raises(InputError, match="cannot remove the zFLoRA adapter at 'model.embed_tokens'"):
        compiled(exports.get("zflora"), tmp_path, "strip")
    assert not (tmp_path / "out_strip").exists()
    code = main([str(exports.get("zflora")), "-o", str(tmp_path / "cli"), "--strategy", "strip"])
    assert code == 2 and not (tmp_path / "cli").exists()
    assert "zFLoRA" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["ffba", "zflora"])
def test_idempotent(family, exports, tmp_path):
    out, _ = compiled(exports.get(family), tmp_path)
    again = compile_file(out, tmp_path / "again", CompileOptions())
    assert again["sites"] == [] and again["rejected"] == []
    assert ops(tmp_path / "again" / "model.onnx") == ops(out)


@pytest.mark.parametrize("family", FAMILIES)
def test_report_matches_the_schema(family, exports, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    from importlib import resources

    schema = json.loads(resources.files("zflora_compile").joinpath("report_schema.json").read_text())
    _, report = compiled(exports.get(family), tmp_path)
    jsonschema.validate(json.loads(json.dumps(report, default=str)), schema)
    allowed = {"ffa", "fba", "ffba"} if family == "ffba" else {family, "ffba"}
    assert report["plan"]["widened"] and all(s["family"] in allowed for s in report["sites"])


def test_cli_inspect_lists_lane_sites(exports, tmp_path, capsys):
    code = main(["inspect", str(exports.get("fba")), "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    sites = data["sites"]
    assert {s["family"] for s in sites} == {"fba"}
    writers = [s for s in sites if s["writes"]]
    assert len(writers) == 4 and all(s["projection"] in ("o_proj", "down_proj") for s in writers)
    readers = [s for s in sites if s["reads"]]
    assert sorted(s["projection"] for s in readers).count("lm_head") == 1


def test_latency_gate_explains_that_zflora_has_no_base_model(exports, tmp_path):
    options = CompileOptions(check_latency=True)
    with pytest.raises(InputError, match="--check-latency needs the base model.*zFLoRA"):
        compile_file(exports.get("zflora"), tmp_path / "gated", options)
    assert not (tmp_path / "gated").exists()
