"""Review regressions for ``zcompile swap`` (inputs the swap was not written for), each against an
independent reference: the PEFT model run eagerly, or a from-scratch compile of the new adapter."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from zflora_compile import zoo  # noqa: E402
from zflora_compile.errors import InputError  # noqa: E402
from zflora_compile.swap import swap_file  # noqa: E402

from test_swap import compiled, export, feeds, logits  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def eager(model) -> np.ndarray:
    f = feeds()
    with torch.no_grad():
        return model(input_ids=torch.tensor(f["input_ids"]), attention_mask=torch.tensor(f["attention_mask"])).logits.float().numpy()


def lora_bias_model(seed: int, lora_bias: bool):
    """Tiny Llama (no base biases) with LoRA everywhere; ``lora_bias``: a trained bias on every B."""
    base = zoo.build_base_model("llama", num_hidden_layers=1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_bias=lora_bias, lora_dropout=0.0, init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def lora_bias(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_bias")
    a = lora_bias_model(1, lora_bias=True)
    b = lora_bias_model(2, lora_bias=False)
    b.save_pretrained(root / "b_peft")
    b_onnx = export(b, root / "b.onnx")
    return {"fused_a": compiled(export(a, root / "a.onnx"), root / "fa"), "b": b, "b_peft": root / "b_peft", "b_onnx": b_onnx, "scratch_b": compiled(b_onnx, root / "fb")}


def test_lora_bias_compiled_then_plain_peft_is_not_silently_wrong(lora_bias, tmp_path):
    """Compiled A had lora_bias (fused bias = s * b_B, the base has none); B is plain LoRA. The swap kept
    A's fused bias: max |diff| 0.53 against B run in PEFT, and its verification passed (the merged
    reference kept the bias too). The record does not say whether a fused bias holds an adapter
    bias; once it does, a PEFT source (which has no base bias to put back) is refused there."""
    try:
        swap_file(lora_bias["fused_a"], lora_bias["b_peft"], tmp_path / "s")
    except InputError as error:
        assert "lora_bias" in str(error) and not (tmp_path / "s").exists()
        return
    np.testing.assert_allclose(logits(tmp_path / "s" / "model.onnx"), eager(lora_bias["b"]), atol=1e-4, rtol=0)


def test_record_with_adapter_bias_refuses_a_peft_source(lora_bias, tmp_path):
    """The swap's half of the fix: a group recorded with ``adapter_bias: true`` refuses a PEFT source
    (the record is edited here as the compile will write it)."""
    import json

    import onnx

    model = onnx.load(str(lora_bias["fused_a"]))
    prop = next(p for p in model.metadata_props if p.key == "zflora.compiled")
    record = json.loads(prop.value)
    for group in record["compilations"][0]["groups"]:
        group["adapter_bias"] = True
    prop.value = json.dumps(record)
    onnx.save(model, str(tmp_path / "a.onnx"))
    with pytest.raises(InputError, match="lora_bias"):
        swap_file(tmp_path / "a.onnx", lora_bias["b_peft"], tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_lora_bias_compiled_then_plain_onnx(lora_bias, tmp_path):
    """The same swap from B's ONNX export: B's group has no bias (nor has the base), so the fused bias
    must become 0; it kept A's s * b_B."""
    swap_file(lora_bias["fused_a"], lora_bias["b_onnx"], tmp_path / "s")
    got, want = logits(tmp_path / "s" / "model.onnx"), logits(lora_bias["scratch_b"])
    assert np.abs(want - logits(lora_bias["fused_a"])).max() > 1e-3
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got, eager(lora_bias["b"]), atol=1e-4, rtol=0)


def test_trt_refit_is_given_every_owned_tensor(tmp_path):
    """``swap --format trt`` gave the refitter only the edited tensors; a fused bias the swap keeps (a
    biased base, the record saying it holds no adapter bias) is marked refittable too, and TensorRT
    reports a GEMM's bias missing when only its weight is set. Every owned tensor is given now."""
    import onnx_ir as ir

    from zflora_compile.swap import Edit, refit_arrays

    graph = ir.Graph([], [], nodes=[], initializers=[ir.Value(name=n, const_value=ir.tensor(np.full((2,), i, np.float32), name=n)) for i, n in enumerate(("w", "low", "b"))])
    live = [{"groups": [{"weight": "w", "lowrank": "low", "bias": "b", "column_scale": None}]}]
    arrays = refit_arrays(ir.Model(graph, ir_version=10), live, [Edit("w", np.ones(2, np.float32)), Edit("low", np.ones(2, np.float32))])
    assert sorted(arrays) == ["b", "low", "w"] and arrays["b"].tolist() == [2.0, 2.0] and arrays["w"].tolist() == [1.0, 1.0]


def test_peft_bin_and_bf16_adapters(tmp_path):
    """The shared reader (:mod:`zflora_compile.peft_format`): a swap reads ``adapter_model.bin`` (it
    refused it: no adapter_model.safetensors) and bf16 factors, each equal to PEFT run eagerly."""
    a = zoo.build_lora_model(r=4, num_hidden_layers=1)
    zoo._randomize_lora(a, 1)
    fused = compiled(export(a, tmp_path / "a.onnx"), tmp_path / "fa")
    b = zoo.build_lora_model(r=4, num_hidden_layers=1, rank_pattern={"q_proj": 2}, use_rslora=True)
    zoo._randomize_lora(b, 2)
    b.save_pretrained(tmp_path / "bin", safe_serialization=False)
    swap_file(fused, tmp_path / "bin", tmp_path / "s_bin")
    np.testing.assert_allclose(logits(tmp_path / "s_bin" / "model.onnx"), eager(b), atol=1e-4, rtol=0)
    low = zoo.build_lora_model(r=4, num_hidden_layers=1, adapter_dtype=torch.bfloat16)
    zoo._randomize_lora(low, 3)
    low.save_pretrained(tmp_path / "bf16")
    swap_file(fused, tmp_path / "bf16", tmp_path / "s_bf16")
    # PEFT runs the bf16 adapter in bf16; the swap reads it exactly and runs it in fp32
    reference = eager(low)
    assert np.abs(logits(tmp_path / "s_bf16" / "model.onnx") - reference).max() < 1e-2


def test_one_module_is_not_placed_at_two_sites(tmp_path):
    """Label matching accepts a module whose name the label ends with (``layers.0.self_attn.q_proj`` for
    ``model.layers.0.self_attn.q_proj``); with two compiled sites ending alike (a second stack,
    ``vision.layers.0.self_attn.q_proj``) the one module went to both. Refused as ambiguous."""
    from zflora_compile.swap_sources import PeftAdapter

    b = zoo.build_lora_model(r=2, num_hidden_layers=1, targets=["q_proj"])
    b.save_pretrained(tmp_path / "b")
    import json

    adapter = PeftAdapter(tmp_path / "b", json.loads((tmp_path / "b" / "adapter_config.json").read_text()))
    adapter.modules = {k.removeprefix("model."): v for k, v in adapter.modules.items()}  # keys of a PEFT model on the inner stack
    assert adapter._module("model.layers.0.self_attn.q_proj", "g") == "layers.0.self_attn.q_proj"
    assert adapter._module("model.layers.0.self_attn.q_proj", "g") == "layers.0.self_attn.q_proj"  # the reference reads it again
    with pytest.raises(InputError, match="matches two compiled sites"):
        adapter._module("vision.layers.0.self_attn.q_proj", "h")


def test_strip_of_a_lora_bias_compile_is_the_base(lora_bias, tmp_path):
    """Found with the swap review: ``strip`` of a model compiled from a lora_bias adapter is 0.69 off
    the base model (its verification passes: the strip reference keeps the fused bias too)."""
    from zflora_compile.build import compile_file
    from zflora_compile.options import CompileOptions

    try:
        compile_file(lora_bias["fused_a"], tmp_path / "st", CompileOptions(strategy="strip"))
    except InputError:
        return  # a refusal is right too
    base = zoo.build_base_model("llama", num_hidden_layers=1)
    np.testing.assert_allclose(logits(tmp_path / "st" / "model.onnx"), eager(base), atol=1e-4, rtol=0)
