"""export hf-zflora: a model with zFLoRA adapters (zflora_compile.adapters) written as a standard
Hugging Face checkpoint (hidden size d+r, explicit head_dim, untied embeddings, rescaled norms)
that ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``MistralForCausalLM`` load with the adapted
model's logits.  fp32; tolerance: max |diff| <= 1e-5 * max |logits| (measured ~1e-6 absolute on
logits of magnitude ~2; the fold s*B and the single GEMM only reassociate)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from zflora_compile import zoo  # noqa: E402
from zflora_compile.adapters import AdapterConfig, attach_adapters, randomize_adapters, save_adapters  # noqa: E402
from zflora_compile.errors import InputError  # noqa: E402
from zflora_compile.export.hf_zflora import export_hf_zflora  # noqa: E402

REL = 1e-5
IDS = torch.tensor([[1, 5, 9, 17, 33, 64, 100, 127]])
CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def adapted(arch="llama", base=None, **cfg):
    base = zoo.build_base_model(arch, seed=0, **(base or {}))
    model = attach_adapters(base, AdapterConfig(family="zflora", rank=4, alpha=8, **cfg))
    return randomize_adapters(model, seed=1).eval()


def assert_close(got, reference):
    diff, size = (got - reference).abs().max().item(), reference.abs().max().item()
    assert diff <= REL * size, (diff, size)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_standard_checkpoint_gives_the_adapted_logits(arch, tmp_path):
    model = adapted(arch)
    reference = logits(model)
    assert (reference - logits(zoo.build_base_model(arch, seed=0))).abs().max().item() > 1e-2  # the adapter matters
    export_hf_zflora(model, tmp_path / "hf")
    cls = getattr(transformers, CLASSES[arch])
    loaded = cls.from_pretrained(tmp_path / "hf").eval()
    assert type(loaded) is cls
    c = loaded.config
    assert (c.hidden_size, c.head_dim, c.num_attention_heads, c.tie_word_embeddings) == (68, 16, 4, False)
    assert c.rms_norm_eps == pytest.approx(1e-6 * 64 / 68, rel=1e-12)
    assert_close(logits(loaded), reference)


def test_padded_tied_biased_learned_lanes_and_a_large_eps(tmp_path):
    """pad_to=16 (68 -> 80 lanes), tied base embeddings, biases on every projection, learned
    embedding lanes, adapters on layer 1 only, rms_norm_eps 0.5 (so a wrong eps shows)."""
    base = dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True, rms_norm_eps=0.5)
    model = adapted("llama", base=base, zflora_embedding="learned", layers=[1])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    reference = logits(model)
    export_hf_zflora(model, tmp_path / "hf", pad_to=16)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert loaded.config.hidden_size == 80 and loaded.config.rms_norm_eps == pytest.approx(0.5 * 64 / 80)
    assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
    assert_close(logits(loaded), reference)
    assert not loaded.model.embed_tokens.weight[:, 68:].any() and not loaded.model.layers[0].mlp.down_proj.weight[68:].any()
    # the epsilon must be rescaled: the base's 0.5 over 80 lanes gives other logits
    wrong = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", rms_norm_eps=0.5).eval()
    assert (logits(wrong) - reference).abs().max().item() > 1e-3


def test_refuses_other_families(tmp_path):
    base = zoo.build_base_model("llama", seed=0)
    model = randomize_adapters(attach_adapters(base, AdapterConfig(family="ffa", rank=4)), seed=1)
    with pytest.raises(InputError, match="'ffa', not 'zflora'"):
        export_hf_zflora(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-m", "zflora_compile.export", *map(str, args)], capture_output=True, text=True, env=env, timeout=120)


def test_cli_exit_codes(tmp_path):
    model = adapted("llama")
    reference = logits(model)
    zoo.build_base_model("llama", seed=0).save_pretrained(tmp_path / "base")
    save_adapters(model, tmp_path / "zflora")
    done = run_cli("hf-zflora", tmp_path / "zflora", "--base", tmp_path / "base", "-o", tmp_path / "hf", "--pad-to", 8)
    assert done.returncode == 0, done.stderr
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert loaded.config.hidden_size == 72
    assert_close(logits(loaded), reference)
    ffa = attach_adapters(zoo.build_base_model("llama", seed=0), AdapterConfig(family="ffa", rank=4))
    save_adapters(ffa, tmp_path / "ffa")
    failed = run_cli("hf-zflora", tmp_path / "ffa", "--base", tmp_path / "base", "-o", tmp_path / "bad")
    assert failed.returncode == 2
    assert len(failed.stderr.strip().splitlines()) == 1 and "not 'zflora'" in failed.stderr
    assert not (tmp_path / "bad").exists()
    zoo.build_base_model("llama", seed=0, num_hidden_layers=1).save_pretrained(tmp_path / "other")
    failed = run_cli("hf-zflora", tmp_path / "zflora", "--base", tmp_path / "other", "-o", tmp_path / "bad")
    assert failed.returncode == 2, failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1 and "different base model" in failed.stderr
    assert not (tmp_path / "bad").exists()
