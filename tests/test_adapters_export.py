"""Adapted models export: torch.onnx.export(dynamo=True) to one file that ONNX Runtime runs with
the PyTorch logits, and torch.export.export.  Also pins the exported adapter structure that
docs/adapters.md describes (the input of the ONNX detector for these families)."""

from __future__ import annotations

import collections

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from conftest import run_onnx, token_feeds  # noqa: E402

from zflora_compile import zoo  # noqa: E402
from zflora_compile.adapters import AdapterConfig, attach_adapters, randomize_adapters  # noqa: E402

RANK = 4

# Low-rank MatMuls (a constant 2-D weight with a dimension equal to the rank) in the tiny
# 2-layer Llama with every block adapted: (reading r lanes = B role, writing r lanes = A role).
LOW_RANK_MATMULS = {
    "ffa": (4, 4),  # per layer: A on q_proj's and gate_proj's input; B onto o_proj's and down_proj's output
    "fba": (2 * 2 + 3 + 1, 4),  # B on gate/up (x2 layers), next q/k/v, LM head; A on o/down (x2)
    "ffba": (4 + 8, 4 + 4),
    "zflora": (2 * 5 + 1, 4),  # B on q/k/v/gate/up (x2) and the LM head; A on o/down (x2)
}


def build(family, **cfg):
    torch.manual_seed(0)
    model = attach_adapters(zoo.build_base_model("llama", seed=0), AdapterConfig(family=family, rank=RANK, alpha=8, **cfg))
    return randomize_adapters(model, seed=1).eval()


def torch_logits(model, feeds):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(feeds["input_ids"]), attention_mask=torch.from_numpy(feeds["attention_mask"]))
    return out.logits.numpy()


def low_rank_matmuls(path):
    model = onnx.load(str(path))
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    reads = writes = 0
    for node in model.graph.node:
        shape = shapes.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if shape and len(shape) == 2 and RANK in shape:
            reads += shape[0] == RANK
            writes += shape[1] == RANK
    return reads, writes, collections.Counter(n.op_type for n in model.graph.node)


@pytest.mark.parametrize("family", ["ffa", "fba", "ffba", "zflora"])
def test_dynamo_onnx_export_matches_torch(family, tmp_path):
    model = build(family)
    path = zoo.export_onnx(model, tmp_path / "model.onnx", exporter="dynamo")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # single file, weights inline
    for seq in (1, 6):  # the sequence axis stayed symbolic
        feeds = token_feeds(seq)
        got = run_onnx(path, feeds)[0]
        want = torch_logits(model, feeds)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    reads, writes, ops = low_rank_matmuls(path)
    assert (reads, writes) == LOW_RANK_MATMULS[family]
    if family == "zflora":
        # Exit projections emit concat(o @ Wo, o @ A); the embedding is padded with r zero lanes;
        # entry projections cut the normed d+r stream with Slice.
        assert ops["Pad"] == 1 and ops["Slice"] >= 2 * 2 + 2


def test_zflora_partial_layers_and_learned_lanes_export(tmp_path):
    """Unadapted blocks pad their exit with zero lanes; the learned lane table is a second Gather."""
    model = build("zflora", target="mlp", layers=[1], zflora_embedding="learned")
    path = zoo.export_onnx(model, tmp_path / "model.onnx", exporter="dynamo")
    feeds = token_feeds(5)
    np.testing.assert_allclose(run_onnx(path, feeds)[0], torch_logits(model, feeds), atol=1e-4, rtol=0)
    reads, writes, ops = low_rank_matmuls(path)
    assert (reads, writes) == (2 + 1, 1)
    assert ops["Pad"] == 3  # o_proj of both layers and down_proj of layer 0 emit zero lanes
    assert ops["Gather"] >= 2


@pytest.mark.parametrize("family", ["ffa", "fba", "ffba", "zflora"])
def test_torch_export(family):
    model = build(family)
    feeds = token_feeds(6)
    kwargs = {"input_ids": torch.from_numpy(feeds["input_ids"]), "attention_mask": torch.from_numpy(feeds["attention_mask"]), "use_cache": False}
    seq = torch.export.Dim("seq", min=2, max=64)
    program = torch.export.export(model, (), kwargs, dynamic_shapes={"input_ids": {1: seq}, "attention_mask": {1: seq}, "use_cache": None})
    with torch.no_grad():
        got = program.module()(**kwargs).logits
    np.testing.assert_allclose(got.numpy(), torch_logits(model, feeds), atol=1e-5, rtol=0)
    # The traced program holds the adapter weights as parameters, and nothing leaked into the carrier.
    assert any("zflora_" in name or "ffa_" in name or "fba_" in name for name in program.state_dict)
    assert not model._zflora_adapters.carrier.values


@pytest.mark.parametrize("family", ["fba", "zflora"])
def test_kv_cache_export_matches_torch(family, tmp_path):
    """Decode graphs (past key/values in, present out): FBA's LM-head path and zFLoRA's lanes."""
    model = build(family)
    path = zoo.export_onnx(model, tmp_path / "model.onnx", exporter="dynamo", with_cache=True, past_len=3)
    config = model.config
    gen = torch.Generator().manual_seed(2)
    head_dim = config.hidden_size // config.num_attention_heads
    past = [torch.randn(1, config.num_key_value_heads, 3, head_dim, generator=gen) for _ in range(2 * config.num_hidden_layers)]
    input_ids = torch.randint(0, config.vocab_size, (1, 2), generator=gen)
    mask = torch.ones(1, 5, dtype=torch.int64)
    feeds = {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()}
    feeds.update({f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}": t.numpy() for i, t in enumerate(past)})
    with torch.no_grad():
        want = zoo._ExportWrapper(model, True)(input_ids, mask, *past)
    got = run_onnx(path, feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.numpy(), atol=1e-4, rtol=0)
