"""Review regressions for ``zcompile export`` (inputs the exporters were not written for)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from zflora_compile import zoo  # noqa: E402
from zflora_compile.adapters import AdapterConfig, attach_adapters, randomize_adapters  # noqa: E402
from zflora_compile.export import export_hf_zflora  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 17, 33, 64, 100, 127]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("rank, pad_to, hidden", [(3, None, 68), (1, None, 68), (5, 3, 72)])
def test_hf_zflora_hidden_size_not_a_multiple_of_the_heads(rank, pad_to, hidden, tmp_path):
    """d + r = 67 with 4 heads: transformers refused the written config (hidden_size % heads != 0,
    StrictDataclassClassValidationError, a traceback and no output). D is now rounded up to a multiple
    of the heads (and of pad_to) with zero lanes: the checkpoint loads and gives the adapted logits."""
    base = zoo.build_base_model("llama", seed=0)
    model = randomize_adapters(attach_adapters(base, AdapterConfig(family="zflora", rank=rank, alpha=8)), seed=1).eval()
    reference = logits(model)
    export_hf_zflora(model, tmp_path / "hf", pad_to=pad_to)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert loaded.config.hidden_size == hidden and loaded.config.head_dim == 16
    assert (logits(loaded) - reference).abs().max().item() <= 1e-5 * reference.abs().max().item()
