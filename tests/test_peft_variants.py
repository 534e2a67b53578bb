"""PEFT adapter variants beyond classic LoRA (DoRA, BD-LoRA, LoKr, LoHa, VeRA, (IA)^3, embedding
LoRA, two stacked LoRAs): the zoo builds them, they change the logits, and every exporter
(dynamo, dynamo-noopt, torch.export before/after decomposition) reproduces the eager logits.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import run_onnx  # noqa: E402

from zflora_compile import zoo  # noqa: E402

CASES = [(kind, "llama") for kind in zoo.PEFT_VARIANTS] + [("dora", "qwen2")]
IDS = [f"{arch}-{kind}" for kind, arch in CASES]
TINY = {"num_hidden_layers": 1}  # one decoder layer keeps the 36 exports fast
ATOL = 2e-4


class _Variants:
    """Each (kind, arch) model, its example inputs and eager logits, built once per module."""

    def __init__(self, root):
        self.root = root
        self.entries: dict = {}

    def get(self, kind: str, arch: str):
        key = (kind, arch)
        if key not in self.entries:
            model = zoo.build_peft_variant(kind, arch, **TINY)
            args = zoo._example_inputs(model.config, torch.float32, seq_len=7, batch=1, past_len=None)
            with torch.no_grad():
                logits = model(input_ids=args[0], attention_mask=args[1], use_cache=False).logits
            self.entries[key] = (model, args, logits)
        return self.entries[key]


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> _Variants:
    return _Variants(tmp_path_factory.mktemp("peft_variants"))


def test_variant_list():
    assert zoo.PEFT_VARIANTS == ("dora", "bdlora", "lokr", "loha", "vera", "ia3", "embedding", "two_loras")
    with pytest.raises(ValueError, match="unknown PEFT variant"):
        zoo.build_peft_variant("adalora")


@pytest.mark.parametrize(("kind", "arch"), CASES, ids=IDS)
def test_adapter_changes_logits(variants, kind, arch):
    model, args, logits = variants.get(kind, arch)
    assert not model.training
    base = zoo.build_base_model(arch, seed=0, **TINY)
    with torch.no_grad():
        base_logits = base(input_ids=args[0], attention_mask=args[1], use_cache=False).logits
        # Same base weights as the plain builder: disabling the adapter gives the base logits.
        with model.disable_adapter():
            disabled = model(input_ids=args[0], attention_mask=args[1], use_cache=False).logits
    torch.testing.assert_close(disabled, base_logits, atol=1e-6, rtol=0)
    assert (logits - base_logits).abs().max() > 1e-2
    if kind == "two_loras":
        assert sorted(model.base_model.active_adapter) == ["a", "b"]


@pytest.mark.parametrize("exporter", ["dynamo", "dynamo-noopt"])
@pytest.mark.parametrize(("kind", "arch"), CASES, ids=IDS)
def test_onnx_matches_eager(variants, kind, arch, exporter):
    model, args, logits = variants.get(kind, arch)
    path = zoo.export_onnx(model, variants.root / f"{arch}-{kind}-{exporter}" / "model.onnx", exporter=exporter)
    got = run_onnx(path, {"input_ids": args[0].numpy(), "attention_mask": args[1].numpy()})[0]
    np.testing.assert_allclose(got, logits.numpy(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("decompose", [False, True], ids=["aten", "core-aten"])
@pytest.mark.parametrize(("kind", "arch"), CASES, ids=IDS)
def test_program_matches_eager(variants, kind, arch, decompose):
    model, args, logits = variants.get(kind, arch)
    program = zoo.export_program(model, decompose=decompose)
    with torch.no_grad():
        got = program.module()(*args)
    torch.testing.assert_close(got, logits, atol=ATOL, rtol=0)
