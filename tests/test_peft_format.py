"""The PEFT adapter reader shared by ``zcompile swap`` and ``zcompile export`` (:mod:`zflora_compile.peft_format`).

Checked against PEFT itself: each module's rank, alpha and scale (``rank_pattern`` / ``alpha_pattern``
keys that match several modules, an alpha pattern without a rank pattern, rsLoRA) equal those of the
``LoraModel`` PEFT loads from the saved directory; the pattern rule equals
``peft.utils.other.get_pattern_key``; BD-LoRA's densified factor equals PEFT's block-diagonal matrix
and its forward.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from zflora_compile import peft_format  # noqa: E402
from zflora_compile import zoo  # noqa: E402
from zflora_compile.errors import InputError  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Keys are written sorted by save_pretrained; these resolve the same in either order.
RANKS = {"layers.1.self_attn.q_proj": 6, "mlp\\.(up|down)_proj": 3, "k_proj": 2}
ALPHAS = {"layers.0.self_attn.o_proj": 11, "q_proj": 5, "gate_proj": 7}


def peft_modules(model) -> dict:
    return {n: m for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


@pytest.fixture(scope="module", params=[False, True], ids=["lora", "rslora"])
def saved(request, tmp_path_factory):
    model = zoo.build_lora_model("llama", r=4, alpha=9, num_hidden_layers=2, rank_pattern=RANKS, alpha_pattern=ALPHAS, use_rslora=request.param)
    path = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(path)
    return model, path


def test_rank_alpha_scale_equal_peft_loaded_from_the_directory(saved):
    model, path = saved
    config, tensors, weights = peft_format.read_peft_adapter(path)
    assert weights.name == peft_format.SAFETENSORS_NAME
    loaded = peft.PeftModel.from_pretrained(zoo.build_base_model("llama", num_hidden_layers=2), str(path))
    modules = peft_modules(loaded)
    assert len(modules) == 14
    names = {peft_format.module_of(k)[0] for k in tensors}
    assert names == set(modules)
    ranks = set()
    for name, module in modules.items():
        lora = peft_format.module_lora(config, name)
        assert (lora.r, lora.scale) == (module.r["default"], pytest.approx(module.scaling["default"], rel=1e-12)), name
        assert lora.alpha == module.lora_alpha["default"], name
        ranks.add(lora.r)
    assert ranks == {2, 3, 4, 6}
    # the specific key wins for layer 1's q_proj, the general one elsewhere (both in rank and alpha)
    q1, q0 = peft_format.module_lora(config, "model.layers.1.self_attn.q_proj"), peft_format.module_lora(config, "model.layers.0.self_attn.q_proj")
    assert (q1.r, q1.alpha, q0.r, q0.alpha) == (6, 5, 4, 5)


@pytest.mark.parametrize(
    "patterns",
    [
        {"q_proj": 1, "layers.1.self_attn.q_proj": 2},
        {"layers.1.self_attn.q_proj": 2, "q_proj": 1},
        {"proj": 1},
        {"self_attn\\.(q|k)_proj": 1, "model.layers.0.mlp.down_proj": 2},
        {"^model.layers.0.self_attn.q_proj": 1},
        {"layers.0.self_attn.q": 1},
    ],
)
def test_pattern_key_is_peft_get_pattern_key(patterns):
    from peft.utils.other import get_pattern_key

    for layer in (0, 1, 11):
        for module in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj", "mlp.up_proj"):
            name = f"model.layers.{layer}.{module}"
            key = peft_format.pattern_key(patterns, name)
            assert patterns.get(key) == patterns.get(get_pattern_key(patterns.keys(), name)), (patterns, name)


def test_module_of_keys():
    split = peft_format.module_of
    assert split("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight") == ("model.layers.0.self_attn.q_proj", "lora_B", "weight")
    assert split("base_model.model.layers.0.mlp.up_proj.lora_A.weight") == ("layers.0.mlp.up_proj", "lora_A", "weight")
    assert split("model.layers.0.self_attn.q_proj.lora_A.weight") == ("model.layers.0.self_attn.q_proj", "lora_A", "weight")
    assert split("base_model.model.model.embed_tokens.lora_embedding_A") == ("model.embed_tokens", "lora_embedding_A", "")
    assert split("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector") == ("model.layers.0.self_attn.q_proj", "lora_magnitude_vector", "")
    assert split("base_model.model.lm_head.weight") is None


def test_targeted_is_peft_target_rule():
    config = {"target_modules": ["q_proj", "mlp.down_proj"], "layers_to_transform": [1]}
    assert peft_format.targeted("model.layers.1.self_attn.q_proj", config)
    assert peft_format.targeted("model.layers.1.mlp.down_proj", config)
    assert not peft_format.targeted("model.layers.0.self_attn.q_proj", config)
    assert not peft_format.targeted("model.layers.1.self_attn.xq_proj", config)
    assert peft_format.targeted("model.layers.3.self_attn.v_proj", {"target_modules": r".*\.(v|q)_proj"})
    assert not peft_format.targeted("model.layers.3.self_attn.k_proj", {"target_modules": r".*\.(v|q)_proj"})


def test_bin_safetensors_and_low_precision(saved, tmp_path):
    model, path = saved
    _, tensors, _ = peft_format.read_peft_adapter(path)
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    _, from_bin, weights = peft_format.read_peft_adapter(tmp_path / "bin")
    assert weights.name == peft_format.BIN_NAME
    assert tensors.keys() == from_bin.keys() and all(torch.equal(tensors[k], from_bin[k]) for k in tensors)
    bf16 = zoo.build_lora_model("llama", r=4, num_hidden_layers=1, adapter_dtype=torch.bfloat16)
    bf16.save_pretrained(tmp_path / "bf16")
    _, low, _ = peft_format.read_peft_adapter(tmp_path / "bf16")
    assert {t.dtype for t in low.values()} == {torch.bfloat16}


def test_refusals_name_the_file(tmp_path):
    with pytest.raises(InputError, match="not a directory"):
        peft_format.read_peft_adapter(tmp_path / "absent")
    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match="adapter_config.json: missing"):
        peft_format.read_peft_adapter(tmp_path / "d")
    (tmp_path / "d" / "adapter_config.json").write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        peft_format.read_peft_adapter(tmp_path / "d")
    (tmp_path / "d" / "adapter_config.json").write_text("{}")
    with pytest.raises(InputError, match="no adapter_model.safetensors or adapter_model.bin"):
        peft_format.read_peft_adapter(tmp_path / "d")
    (tmp_path / "d" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(InputError, match="cannot read the adapter weights"):
        peft_format.read_peft_adapter(tmp_path / "d")


def test_block_diagonal_is_peft_bdlora():
    from peft.tuners.lora.variants import BlockDiagonalLinear

    torch.manual_seed(0)
    layer = BlockDiagonalLinear(12, 8, nblocks=4, init_zero=False)
    dense = peft_format.block_diagonal(layer.weight.detach(), 4)
    assert torch.equal(dense, layer.weight_as_blockdiagonal_matrix().detach())
    x = torch.randn(3, 12)
    with torch.no_grad():
        torch.testing.assert_close(x @ dense.T, layer(x), atol=1e-6, rtol=0)
    assert peft_format.bdlora_config({"use_bdlora": '{"nblocks": 2}'}) == {"nblocks": 2}
    assert peft_format.bdlora_config({"use_bdlora": None}) is None
