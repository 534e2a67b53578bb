"""export bdlora-tp: the per-shard rank-r/n LoRAs, combined as the manifest says (column: concat,
row: sum), reproduce each PEFT BD-LoRA module's output on the full base weight; the densified
plain LoRA loaded by PEFT gives the BD-LoRA model's logits.  fp32; tolerance 1e-5 absolute
(module outputs and logits of magnitude ~1; measured ~1e-6)."""

from __future__ import annotations

import copy
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from safetensors.numpy import load_file  # noqa: E402

from zflora_compile import zoo  # noqa: E402
from zflora_compile.errors import InputError  # noqa: E402
from zflora_compile.export.bdlora_tp import export_bdlora_tp  # noqa: E402

TOL = 1e-5
IDS = torch.tensor([[3, 8, 13, 21, 34, 55, 89, 120]])
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_bdlora(nblocks: int, seed: int = 0):
    """Tiny Llama + BD-LoRA (rsLoRA, q_proj at rank 8 with its own alpha), every factor random."""
    base = zoo.build_base_model("llama", seed=seed)
    bd = peft.BdLoraConfig(target_modules_bd_a=["o_proj", "down_proj"], target_modules_bd_b=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], nblocks=nblocks)
    config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS, use_bdlora=bd, use_rslora=True, rank_pattern={"q_proj": 8}, alpha_pattern={"q_proj": 4}, lora_dropout=0.0)
    model = peft.get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * (0.3 if "lora_B" in name else param.shape[1] ** -0.5))
    return model.eval()


@pytest.fixture(scope="module")
def bd2(tmp_path_factory):
    model = build_bdlora(nblocks=2)
    path = tmp_path_factory.mktemp("bd2") / "adapter"
    model.save_pretrained(path)
    with torch.no_grad():
        reference = model(input_ids=IDS).logits
    return model, path, reference


def peft_modules(model):
    return {n: m for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


def check_shards_reproduce_modules(model, out, shards):
    """For every module: numpy concat (column) / sum (row) of the shards = PEFT's module output."""
    manifest = json.loads((out / "manifest.json").read_text())
    tensors = [load_file(str(out / d / "adapter_model.safetensors")) for d in manifest["shard_dirs"]]
    modules = peft_modules(model)
    assert set(manifest["modules"]) == set(modules) and len(modules) == 14
    rng = np.random.default_rng(0)
    worst = 0.0
    for name, info in manifest["modules"].items():
        module = modules[name]
        x = rng.standard_normal((5, info["in_features"])).astype(np.float32)
        with torch.no_grad():
            reference = module(torch.from_numpy(x)).numpy()  # PEFT: base + s * BD-LoRA
        weight = module.base_layer.weight.detach().numpy()
        bias = module.base_layer.bias
        key = "base_model.model." + name
        parts = []
        for i, shard in enumerate(info["shards"]):
            (r0, r1), (c0, c1) = shard["weight_rows"], shard["weight_cols"]
            a, b = tensors[i][key + ".lora_A.weight"], tensors[i][key + ".lora_B.weight"]
            assert a.shape[0] == b.shape[1] == info["rank"] // shards
            xi = x[:, c0:c1]
            parts.append(xi @ weight[r0:r1, c0:c1].T + (xi @ a.T) @ b.T)
        if info["parallel"] == "column":
            assert name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
            y = np.concatenate(parts, axis=-1)
        else:
            assert name.endswith(("o_proj", "down_proj"))
            y = np.sum(parts, axis=0)
        if bias is not None:
            y = y + bias.detach().numpy()
        worst = max(worst, float(np.abs(y - reference).max()))
    assert worst <= TOL, worst
    return worst


def test_shards_and_dense_reproduce_bdlora(bd2, tmp_path):
    model, src, reference = bd2
    out = tmp_path / "tp"
    manifest = export_bdlora_tp(src, out, shards=2)
    q = manifest["modules"]["model.layers.0.self_attn.q_proj"]
    assert q["rank"] == 8 and q["shard_rank"] == 4 and q["scale_folded_into_lora_B"] == pytest.approx(4 / 8**0.5)
    assert manifest["modules"]["model.layers.1.mlp.down_proj"]["combine"] == "sum"
    check_shards_reproduce_modules(model, out, 2)
    shard_config = json.loads((out / "shard-1" / "adapter_config.json").read_text())
    assert shard_config["use_bdlora"] is None and shard_config["r"] == shard_config["lora_alpha"] == 2
    assert shard_config["rank_pattern"] == shard_config["alpha_pattern"] == {"q_proj": 4}
    # the densified plain LoRA through plain PEFT (no use_bdlora) gives the BD-LoRA model's logits
    dense_config = json.loads((out / "dense" / "adapter_config.json").read_text())
    assert dense_config["use_bdlora"] is None and not dense_config["use_rslora"]
    base = copy.deepcopy(model).unload().eval()
    loaded = peft.PeftModel.from_pretrained(base, str(out / "dense")).eval()
    assert not any(type(m).__name__ == "BlockDiagonalLinear" for m in loaded.modules())
    with torch.no_grad():
        diff = (loaded(input_ids=IDS).logits - reference).abs().max().item()
    assert diff <= TOL, diff


def test_fewer_shards_than_blocks(tmp_path):
    """Trained with 4 blocks, served on 2 GPUs: each shard holds 2 blocks (still exact)."""
    model = build_bdlora(nblocks=4, seed=3)
    model.save_pretrained(tmp_path / "src")
    export_bdlora_tp(tmp_path / "src", tmp_path / "tp", shards=2)
    check_shards_reproduce_modules(model, tmp_path / "tp", 2)


@pytest.mark.parametrize("shards, message", [(4, "not block diagonal with 4 blocks"), (3, "divisible by --shards 3")])
def test_refuses_shards_the_blocks_do_not_allow(bd2, tmp_path, shards, message):
    _, src, _ = bd2
    with pytest.raises(InputError, match=message) as info:
        export_bdlora_tp(src, tmp_path / "tp", shards=shards)
    assert "module model.layers." in str(info.value)
    assert not (tmp_path / "tp").exists() and not list(tmp_path.iterdir())


def test_refuses_plain_lora(tmp_path):
    zoo.build_lora_model("llama", r=4, seed=0).save_pretrained(tmp_path / "src")
    with pytest.raises(InputError, match="not a BD-LoRA adapter"):
        export_bdlora_tp(tmp_path / "src", tmp_path / "tp", shards=2)


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-m", "zflora_compile.export", *map(str, args)], capture_output=True, text=True, env=env, timeout=120)


def test_cli_exit_codes(bd2, tmp_path):
    model, src, _ = bd2
    done = run_cli("bdlora-tp", src, "--shards", 2, "-o", tmp_path / "ok")
    assert done.returncode == 0, done.stderr
    check_shards_reproduce_modules(model, tmp_path / "ok", 2)
    failed = run_cli("bdlora-tp", src, "--shards", 4, "-o", tmp_path / "bad")
    assert failed.returncode == 2
    assert len(failed.stderr.strip().splitlines()) == 1 and "not block diagonal" in failed.stderr
    assert not (tmp_path / "bad").exists()
