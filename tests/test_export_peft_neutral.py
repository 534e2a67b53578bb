"""export peft: the neutral adapter (true per-module scale folded into lora_B, config scale 1)
loaded by PEFT gives the original adapted model's logits, and so does a reader that ignores
rank_pattern / alpha_pattern / use_rslora.  fp32 tiny Llama; tolerance 1e-5 absolute on logits
of magnitude ~1 (measured ~1e-6: the fold is one fp32 multiply per B entry)."""

from __future__ import annotations

import copy
import json
import os
import pathlib
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from zflora_compile import zoo  # noqa: E402
from zflora_compile.errors import InputError  # noqa: E402
from zflora_compile.export.peft_neutral import export_peft  # noqa: E402

TOL = 1e-5
IDS = torch.tensor([[1, 5, 9, 17, 33, 64, 100, 127]])
# Mixed ranks (q: 8, layer-1 down: 2, others 4), alpha from three sources, rsLoRA on.
RANKS = {"q_proj": 8, "model.layers.1.mlp.down_proj": 2}
ALPHAS = {"v_proj": 3, "q_proj": 5}


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """(PEFT model, its saved adapter dir, its logits)."""
    model = zoo.build_lora_model("llama", r=4, alpha=8, rank_pattern=RANKS, alpha_pattern=ALPHAS, use_rslora=True, seed=0)
    path = tmp_path_factory.mktemp("mixed") / "adapter"
    model.save_pretrained(path)
    return model, path, logits(model)


def fresh_base(peft_model):
    """The same base weights, without the adapter."""
    return copy.deepcopy(peft_model).unload().eval()


def load_peft(peft_model, adapter_dir):
    return peft.PeftModel.from_pretrained(fresh_base(peft_model), str(adapter_dir)).eval()


def pattern_ignoring_logits(peft_model, adapter_dir):
    """A reader that takes one global scale lora_alpha/r (rsLoRA and patterns ignored) and merges
    W + s * B @ A, ranks from the tensors."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    base = fresh_base(peft_model)
    modules = dict(base.named_modules())
    with torch.no_grad():
        for key, a in tensors.items():
            if key.endswith(".lora_A.weight"):
                name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                b = tensors[key.replace(".lora_A.", ".lora_B.")]
                modules[name].weight += scale * (b @ a)
    return logits(base)


def test_neutral_export_matches_the_adapted_model(mixed, tmp_path):
    model, src, reference = mixed
    out = tmp_path / "neutral"
    summary = export_peft(src, out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["lora_alpha"] == config["r"] == 4
    assert config["alpha_pattern"] == config["rank_pattern"] == RANKS
    assert "mixed ranks" in summary["note"]
    # q_proj: r=8, alpha=5 (alpha_pattern), rsLoRA: 5/sqrt(8); PEFT's own module.scaling agrees
    q = summary["modules"]["model.layers.0.self_attn.q_proj"]
    assert q["r"] == 8 and q["scale_folded_into_lora_B"] == pytest.approx(5 / 8**0.5)
    peft_scales = {n: m.scaling["default"] for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert {n: s["scale_folded_into_lora_B"] for n, s in summary["modules"].items()} == pytest.approx(peft_scales)

    loaded = load_peft(model, out)
    assert all(m.scaling["default"] == 1.0 for m in loaded.modules() if hasattr(m, "lora_A"))
    diff = (logits(loaded) - reference).abs().max().item()
    assert diff <= TOL, diff
    # A reader that ignores rank_pattern, alpha_pattern and use_rslora agrees as well ...
    diff = (pattern_ignoring_logits(model, out) - reference).abs().max().item()
    assert diff <= TOL, diff
    # ... while on the original adapter it does not (the disagreement the export removes).
    assert (pattern_ignoring_logits(model, src) - reference).abs().max().item() > 1e-3


def test_uniform_rank_writes_no_patterns(mixed, tmp_path):
    model, src, reference = mixed
    out = tmp_path / "uniform"
    export_peft(src, out, uniform_rank=True)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 8 and not config["rank_pattern"] and not config["alpha_pattern"]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert {t.shape[0] for k, t in tensors.items() if ".lora_A." in k} == {8}
    assert (logits(load_peft(model, out)) - reference).abs().max().item() <= TOL
    assert (pattern_ignoring_logits(model, out) - reference).abs().max().item() <= TOL


def exported_tensors(model, tmp_path) -> tuple[dict, dict, object]:
    """``(tensors saved by PEFT, tensors of its neutral export, export directory)``."""
    src, out = tmp_path / "src", tmp_path / "out"
    model.save_pretrained(src)
    export_peft(src, out)
    return load_file(str(src / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors")), out


def test_lora_bias_is_scaled_with_b(tmp_path):
    model = zoo.build_peft_spelling("lora_bias", r=4, alpha=6, seed=0)
    before, after, out = exported_tensors(model, tmp_path)
    key = next(k for k in before if k.endswith("lora_B.bias"))
    assert torch.allclose(after[key], before[key] * 1.5)
    assert (logits(load_peft(model, out)) - logits(model)).abs().max().item() <= TOL


def test_scale_one_adapter_is_left_bitwise_unchanged(tmp_path):
    """Must not fire: r == alpha, no rsLoRA, no patterns: every tensor is written as it was."""
    model = zoo.build_lora_model("llama", r=4, alpha=4, seed=2)
    before, after, _ = exported_tensors(model, tmp_path)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_reads_a_bin_adapter(mixed, tmp_path):
    model, _, reference = mixed
    model.save_pretrained(tmp_path / "src", safe_serialization=False)
    assert (tmp_path / "src" / "adapter_model.bin").is_file()
    export_peft(tmp_path / "src", tmp_path / "out")
    assert (logits(load_peft(model, tmp_path / "out")) - reference).abs().max().item() <= TOL


@pytest.mark.parametrize("kind, field", [("dora", "use_dora"), ("lokr", "LOKR"), ("bdlora", "use_bdlora")])
def test_refuses_what_is_not_plain_lora(kind, field, tmp_path):
    model = zoo.build_peft_variant(kind, r=4, seed=0)
    src, out = tmp_path / "src", tmp_path / "out"
    model.save_pretrained(src)
    with pytest.raises(InputError, match=field):
        export_peft(src, out)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-m", "zflora_compile.export", *map(str, args)], capture_output=True, text=True, env=env, timeout=120)


def test_cli_exit_codes(mixed, tmp_path):
    model, src, reference = mixed
    done = run_cli("peft", src, "-o", tmp_path / "ok")
    assert done.returncode == 0, done.stderr
    assert (logits(load_peft(model, tmp_path / "ok")) - reference).abs().max().item() <= TOL
    dora = tmp_path / "dora"
    zoo.build_peft_variant("dora", r=4, seed=0).save_pretrained(dora)
    failed = run_cli("peft", dora, "-o", tmp_path / "bad")
    assert failed.returncode == 2
    assert len(failed.stderr.strip().splitlines()) == 1 and "use_dora" in failed.stderr
    assert not (tmp_path / "bad").exists()
    again = run_cli("peft", src, "-o", tmp_path / "ok")  # exists, no --force
    assert again.returncode == 2 and "already exists" in again.stderr


def test_register_adds_export_to_a_main_parser(mixed, tmp_path):
    import argparse

    from zflora_compile.export.cli import register

    parser = argparse.ArgumentParser(prog="zcompile")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", "peft", str(mixed[1]), "-o", str(tmp_path / "out"), "--uniform-rank"])
    assert args.command == "export" and args.run(args) == 0
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 8
