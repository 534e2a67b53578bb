"""zflora_compile.adapters: exact identity at creation, frozen base, save/load, HF integration."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from zflora_compile import zoo  # noqa: E402
from zflora_compile.adapters import (  # noqa: E402
    FAMILIES,
    AdapterConfig,
    BaseModelMismatchError,
    adapter_state_dict,
    attach_adapters,
    count_parameters,
    load_adapters,
    randomize_adapters,
    save_adapters,
    trainable_parameters,
)

ARCHS = ("llama", "mistral", "qwen2")
RANK = 4
# zFLoRA changes the RMSNorm arithmetic (mean over d+r lanes, scaled weight and epsilon): equal
# up to fp32 rounding.  The other families add exact zeros at creation: bit-identical.
ZFLORA_ATOL = 1e-5


def ids(batch=2, seq=9, vocab=128, seed=1):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def adapted(arch="llama", family="ffba", seed=0, model_seed=0, **cfg):
    torch.manual_seed(seed)
    base = zoo.build_base_model(arch, seed=model_seed)
    return attach_adapters(base, AdapterConfig(family=family, rank=cfg.pop("rank", RANK), alpha=cfg.pop("alpha", 8), **cfg))


def assert_base_function(model, ref, family):
    out = logits(model, ids())
    if family == "zflora":
        torch.testing.assert_close(out, ref, atol=ZFLORA_ATOL, rtol=ZFLORA_ATOL)
    else:
        assert torch.equal(out, ref)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("family", FAMILIES)
def test_step0_equals_base_model(arch, family):
    ref = logits(zoo.build_base_model(arch, seed=0), ids())
    model = adapted(arch, family)
    assert_base_function(model, ref, family)
    # The adapters are really in the forward path: non-zero weights move the logits.
    randomize_adapters(model, seed=3)
    assert (logits(model, ids()) - ref).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("family", "target", "layers", "zflora_embedding", "expected"),
    [
        ("ffa", "attention", [1], "zeros", 2),  # A on q_proj input, B on o_proj output
        ("ffa", "mlp", None, "zeros", 4),
        ("fba", "attention", [0], "zeros", 3),  # A on o_proj, B on gate and up
        ("fba", "mlp", [1], "zeros", 2),  # A on down_proj of the last layer, B on the LM head
        ("fba", "mlp", [0], "zeros", 4),  # B on the next layer's q, k, v
        ("ffba", "both", [0], "zeros", 4 + 7),
        ("zflora", "attention", [1], "zeros", 4 + 1),  # A on o_proj, B on q, k, v; LM head B
        ("zflora", "mlp", None, "learned", 2 * 3 + 1 + 1),  # A on down, B on gate/up per layer; LM head; table
    ],
)
def test_targets_and_layers(family, target, layers, zflora_embedding, expected):
    ref = logits(zoo.build_base_model("llama", seed=0), ids())
    model = adapted(family=family, target=target, layers=layers, zflora_embedding=zflora_embedding)
    names = sorted(adapter_state_dict(model))
    assert len(names) == expected, names
    assert_base_function(model, ref, family)
    if layers == [1] and family != "fba":
        assert not any(".layers.0." in n for n in names)
    randomize_adapters(model, seed=3)
    assert (logits(model, ids()) - ref).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_only_adapters_train(family):
    # zFLoRA with a learned lane table: with zero lanes at the embedding (the default), layer 0's
    # Q/K/V B matrices read lanes that are always zero and get no gradient (see the next test).
    model = adapted(family=family, zflora_embedding="learned" if family == "zflora" else "zeros")
    names = set(adapter_state_dict(model))
    assert names and all(p.requires_grad == (n in names) for n, p in model.named_parameters())
    assert {id(p) for p in trainable_parameters(model)} == {id(p) for n, p in model.named_parameters() if n in names}
    n_adapter, n_total = count_parameters(model)
    assert 0 < n_adapter < n_total
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(2):
        x = ids(seed=5)
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, param in model.named_parameters():
        if name in names:
            assert not torch.equal(param, before[name]), f"adapter weight {name} did not train"
        else:
            assert param.grad is None and torch.equal(param, before[name]), f"base weight {name} changed"


def test_zflora_zero_lanes_reach_layer0_attention_as_zeros():
    model = adapted(family="zflora")
    x = ids()
    model(input_ids=x, labels=x).loss.backward()
    dead = {f"model.layers.0.self_attn.{p}.zflora_B.weight" for p in ("q_proj", "k_proj", "v_proj")}
    for name, param in adapter_state_dict(model).items():
        assert param.grad is not None
        if name in dead:
            assert not param.grad.any(), name
        elif not name.endswith("_B.weight"):  # B matrices read lanes that are zero until A trains
            assert param.grad.any(), name


def test_base_dtype_differs_from_adapter_dtype():
    base = zoo.build_base_model("llama", seed=0, dtype=torch.bfloat16)
    ref = logits(base, ids())
    model = attach_adapters(base, AdapterConfig(family="ffba", rank=RANK, alpha=8, dtype="float32"))
    assert {p.dtype for p in trainable_parameters(model)} == {torch.float32}
    out = logits(model, ids())
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)


@pytest.mark.parametrize(("family", "arch"), [("ffa", "llama"), ("fba", "mistral"), ("ffba", "llama"), ("zflora", "qwen2")])
def test_save_load_round_trip(family, arch, tmp_path):
    model = adapted(arch, family, zflora_embedding="learned" if family == "zflora" else "zeros")
    randomize_adapters(model, seed=7)
    expected = logits(model, ids())
    save_adapters(model, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["family"] == family and meta["rank"] == RANK and meta["alpha"] == 8 and meta["scale"] == 2
    assert meta["target"] == "both" and meta["layers"] == [0, 1] and meta["dtype"] == "float32"
    assert meta["base_model_type"] == arch and len(meta["base_config_hash"]) == 64
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    fresh = zoo.build_base_model(arch, seed=0)
    loaded = load_adapters(fresh, tmp_path / "adapter")
    assert torch.equal(logits(loaded, ids()), expected)
    # Different base weights with the same config load (the hash is over the config) and differ.
    other = load_adapters(zoo.build_base_model(arch, seed=1), tmp_path / "adapter")
    assert not torch.allclose(logits(other, ids()), expected)


def test_load_refuses_other_base_config(tmp_path):
    save_adapters(adapted(family="fba"), tmp_path / "adapter")
    wider = zoo.build_base_model("llama", seed=0, intermediate_size=96)
    with pytest.raises(BaseModelMismatchError, match=r"intermediate_size: adapter 128 vs model 96"):
        load_adapters(wider, tmp_path / "adapter")
    with pytest.raises(BaseModelMismatchError, match="model_type"):
        load_adapters(zoo.build_base_model("qwen2", seed=0), tmp_path / "adapter")
    # Refused before anything was changed: no adapters, nothing frozen.
    assert not hasattr(wider, "_zflora_adapters") and all(p.requires_grad for p in wider.parameters())


def test_misuse_is_refused():
    model = adapted(family="ffa")
    with pytest.raises(ValueError, match="already has"):
        attach_adapters(model, AdapterConfig(family="fba"))
    with pytest.raises(ValueError, match="out of range"):
        adapted(family="ffa", layers=[2])
    with pytest.raises(ValueError, match="unknown adapter family"):
        AdapterConfig(family="lora")
    with pytest.raises(ValueError, match="unknown target"):
        AdapterConfig(family="ffa", target="qkv")
    with pytest.raises(ValueError, match="rank"):
        AdapterConfig(family="ffa", rank=0)
    with pytest.raises(ValueError, match="phi3"):
        attach_adapters(zoo.build_base_model("phi3", seed=0), AdapterConfig(family="ffa"))


def test_fba_refuses_gradient_checkpointing():
    model = adapted(family="fba")
    model.gradient_checkpointing_enable()
    model.train()
    x = ids()
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        model(input_ids=x, labels=x)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_kv_cache(family):
    """Cached decoding (the LM head sees only the last position) matches uncached decoding."""
    model = adapted(family=family)
    randomize_adapters(model, seed=3)
    prompt = ids(batch=1, seq=5)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("family", ["fba", "zflora"])
def test_logits_to_keep(family):
    """The LM head's adapter input is cut to the kept positions like its base input."""
    model = randomize_adapters(adapted(family=family), seed=3)
    with torch.no_grad():
        full = model(input_ids=ids()).logits
        last = model(input_ids=ids(), logits_to_keep=2).logits
    assert last.shape[1] == 2 and torch.allclose(last, full[:, -2:], atol=1e-6, rtol=0)


def test_hf_trainer_with_tied_embeddings(tmp_path):
    """transformers.Trainer trains only the adapter and writes checkpoints (save_pretrained), on a
    base whose LM head is tied to the embedding (the embedding and LM head stay HF's own modules)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    base = zoo.build_base_model("qwen2", seed=0, tie_word_embeddings=True)
    ref = logits(base, ids())
    model = attach_adapters(base, AdapterConfig(family="zflora", rank=RANK, alpha=8, zflora_embedding="learned"))
    assert_base_function(model, ref, "zflora")
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter_before = {n: p.detach().clone() for n, p in adapter_state_dict(model).items()}
    data = [{"input_ids": row, "labels": row} for row in ids(batch=8, seq=12)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="steps",
        save_steps=2,
        use_cpu=True,
        logging_strategy="no",
        disable_tqdm=True,
    )
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    assert (tmp_path / "trainer" / "checkpoint-2").is_dir()
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if n in base_before)
    assert all(not torch.equal(p, adapter_before[n]) for n, p in adapter_state_dict(model).items())
    save_adapters(model, tmp_path / "adapter")
    fresh = zoo.build_base_model("qwen2", seed=0, tie_word_embeddings=True)
    assert torch.equal(logits(load_adapters(fresh, tmp_path / "adapter"), ids()), logits(model.eval(), ids()))
    with pytest.raises(BaseModelMismatchError, match="tie_word_embeddings"):
        load_adapters(zoo.build_base_model("qwen2", seed=0), tmp_path / "adapter")


def test_deepcopy_keeps_its_own_carrier():
    import copy

    model = randomize_adapters(adapted(family="ffba"), seed=2)
    clone = copy.deepcopy(model)
    assert clone._zflora_adapters.carrier is not model._zflora_adapters.carrier
    assert clone.model.layers[1].self_attn.q_proj.carrier is clone._zflora_adapters.carrier
    assert torch.equal(logits(clone, ids()), logits(model, ids()))
    assert not clone._zflora_adapters.carrier.values and not model._zflora_adapters.carrier.values
