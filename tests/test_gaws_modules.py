"""GAWS / GAWS-D adapter modules (zflora_compile/adapters/gaws.py, docs/gaws.md): zero init is
exact, the forward is x @ (W + dW) + b with dW the Kronecker form (checked against a formula
built here without torch.kron), bad sizes are refused naming the module, only V / G (and the diag
vectors) train, and the adapted model exports (dynamo ONNX, torch.export) with the eager logits."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from conftest import run_onnx, token_feeds  # noqa: E402

from zflora_compile import zoo  # noqa: E402
from zflora_compile.adapters import (  # noqa: E402
    GawsDLinear,
    GawsLinear,
    attach_gaws,
    build_gaws_model,
    gaws_parameters,
    randomize_gaws,
)
from zflora_compile.adapters.gaws import pick_factor  # noqa: E402

KINDS = [("gaws", False), ("gaws", True), ("gaws_d", False), ("gaws_d", True)]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def ids_(seq=5, batch=2, seed=3):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def gaws_delta_by_blocks(v, d, g, scale):
    """kron(I_g, diag(d) @ V) * scale, built as a block diagonal (no torch.kron)."""
    block = v if d is None else torch.diag(d) @ v
    return torch.block_diag(*[block] * g) * scale


def gaws_d_delta_by_entries(gm, d, s, scale):
    """kron(G'^T, I_s) * scale entry by entry: dW[i*s + a, o*s + a] = G[o, i] * d[i]."""
    g_out, g_in = gm.shape
    dw = torch.zeros(g_in * s, g_out * s, dtype=gm.dtype)
    for i in range(g_in):
        for o in range(g_out):
            for a in range(s):
                dw[i * s + a, o * s + a] = gm[o, i] * (1.0 if d is None else d[i])
    return dw * scale


def make_module(kind, diag, scale, in_f=24, out_f=36, factor=6, seed=0):
    torch.manual_seed(seed)
    base = torch.nn.Linear(in_f, out_f, bias=True)
    cls = GawsLinear if kind == "gaws" else GawsDLinear
    module = cls(base, factor, diag=diag, scale=scale)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("gaws_"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if name == "gaws_diag" else 0.0))
    return module


# ---------------------------------------------------------------- zero init


@pytest.mark.parametrize("kind,diag", KINDS)
def test_zero_init_is_exact(kind, diag):
    base = zoo.build_base_model("llama", seed=0)
    model = attach_gaws(zoo.build_base_model("llama", seed=0), kind, diag=diag, scale=2.0)
    ids = ids_()
    assert torch.equal(logits(model, ids), logits(base, ids))
    wrapped = [m for m in model.modules() if isinstance(m, (GawsLinear, GawsDLinear))]
    assert len(wrapped) == 7 * model.config.num_hidden_layers
    for m in wrapped:
        assert not m.delta_weight().any()


# ---------------------------------------------------------------- the function


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("kind,diag", KINDS)
def test_forward_is_dense_update_and_kron_form(kind, diag, scale):
    m = make_module(kind, diag, scale)
    w = m.base_layer.weight.detach().T  # [in, out]
    b = m.base_layer.bias.detach()
    d = m.gaws_diag.detach() if diag else None
    with torch.no_grad():
        dw = m.delta_weight()
        if kind == "gaws":
            assert (m.groups, m.s_in, m.s_out) == (6, 4, 6)
            ref = gaws_delta_by_blocks(m.gaws_V.detach(), d, m.groups, scale)
        else:
            assert (m.block_size, m.g_in, m.g_out) == (6, 4, 6)
            ref = gaws_d_delta_by_entries(m.gaws_G.detach(), d, m.block_size, scale)
        assert dw.shape == (24, 36)
        torch.testing.assert_close(dw, ref, rtol=0, atol=1e-6)
        for shape in [(5, 24), (2, 3, 24), (2, 2, 3, 24)]:  # the leading axes are kept as they are
            x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)))
            torch.testing.assert_close(m(x), x @ (w + dw) + b, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(m(x), x @ (w + ref) + b, rtol=1e-5, atol=1e-5)


def test_gaws_unfused_equation_by_groups():
    """GAWS: group j of the output is (group j of the input) @ V'; GAWS-D: lane block o is sum_i G[o, i] * block i."""
    x = torch.randn(3, 24, generator=torch.Generator().manual_seed(0))
    m = make_module("gaws", True, 1.0)
    with torch.no_grad():
        extra = m(x) - m.base_layer(x)
        v = torch.diag(m.gaws_diag) @ m.gaws_V
        for j in range(6):
            torch.testing.assert_close(extra[:, j * 6 : (j + 1) * 6], x[:, j * 4 : (j + 1) * 4] @ v, rtol=1e-5, atol=1e-6)
    m = make_module("gaws_d", True, 1.0)
    with torch.no_grad():
        extra = m(x) - m.base_layer(x)
        for o in range(6):
            want = sum(m.gaws_G[o, i] * m.gaws_diag[i] * x[:, i * 6 : (i + 1) * 6] for i in range(4))
            torch.testing.assert_close(extra[:, o * 6 : (o + 1) * 6], want, rtol=1e-5, atol=1e-6)


def test_randomized_model_matches_dense_merge():
    """Merging every delta_weight() into its base Linear reproduces the adapted model's logits."""
    for kind in ("gaws", "gaws_d"):
        model = build_gaws_model(kind, diag=True, scale=0.5)
        merged = zoo.build_base_model("llama", seed=0)
        with torch.no_grad():
            for name, m in model.named_modules():
                if isinstance(m, (GawsLinear, GawsDLinear)):
                    merged.get_submodule(name).weight += m.delta_weight().T
        ids = ids_()
        assert not torch.allclose(logits(model, ids), logits(zoo.build_base_model("llama", seed=0), ids), atol=1e-3)
        torch.testing.assert_close(logits(model, ids), logits(merged, ids), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- sizes


def test_default_factor_rule():
    model = build_gaws_model("gaws")
    for name, m in model.named_modules():
        if isinstance(m, GawsLinear):
            assert m.groups == 8, name
    model = build_gaws_model("gaws_d", groups=None, block={"k_proj": 4})
    sizes = {name.rsplit(".", 1)[-1]: m.block_size for name, m in model.named_modules() if isinstance(m, GawsDLinear)}
    assert sizes == {**{t: 8 for t in TARGETS}, "k_proj": 4}
    assert pick_factor(48, 36) == 6  # largest divisor of gcd 12 that is <= 8
    assert pick_factor(4096, 1024) == 8
    assert pick_factor(14, 21) == 7


def test_wrong_divisibility_raises_naming_the_module():
    model = zoo.build_base_model("llama", seed=0)
    with pytest.raises(ValueError, match=r"groups=3 .*model\.layers\.0\.self_attn\.q_proj.*in_features=64"):
        attach_gaws(model, "gaws", groups=3)
    with pytest.raises(ValueError, match=r"block=24 .*model\.layers\.0\.self_attn\.k_proj.*out_features=32"):
        attach_gaws(model, "gaws_d", block={"k_proj": 24})
    # a refused attach leaves the model untouched
    assert not any(isinstance(m, (GawsLinear, GawsDLinear)) for m in model.modules())
    with pytest.raises(ValueError, match="no factor > 1"):
        pick_factor(5, 7, name="odd")
    with pytest.raises(ValueError, match="groups=5"):
        GawsLinear(torch.nn.Linear(20, 12), 5)
    with pytest.raises(ValueError, match="unknown kind"):
        attach_gaws(model, "lora")


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("kind", ["gaws", "gaws_d"])
def test_gradients_reach_gaws_parameters_only(kind):
    model = build_gaws_model(kind, diag=True)
    params = gaws_parameters(model)
    assert len(params) == 2 * 7 * model.config.num_hidden_layers
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.rsplit(".", 1)[-1] in ("gaws_V", "gaws_G", "gaws_diag") for n in trainable)
    model.train()
    ids = ids_()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    # one optimizer step changes the loss and leaves the base weights alone
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    torch.optim.SGD(params, lr=1e-2).step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_randomize_is_seeded():
    a = randomize_gaws(attach_gaws(zoo.build_base_model(), "gaws", diag=True), seed=4)
    b = randomize_gaws(attach_gaws(zoo.build_base_model(), "gaws", diag=True), seed=4)
    for pa, pb in zip(gaws_parameters(a), gaws_parameters(b)):
        assert torch.equal(pa, pb)
    diag = [p for n, p in a.named_parameters() if n.endswith("gaws_diag")]
    assert diag and all((p - 1).abs().max() < 0.5 and (p != 1).any() for p in diag)


# ---------------------------------------------------------------- export


@pytest.mark.parametrize("exporter", ["dynamo", "dynamo-noopt"])
@pytest.mark.parametrize("kind,diag", [("gaws", True), ("gaws_d", True)])
def test_dynamo_onnx_export_runs_with_eager_logits(tmp_path, kind, diag, exporter):
    model = build_gaws_model(kind, diag=diag, scale=2.0)
    path = zoo.export_onnx(model, tmp_path / "model.onnx", exporter=exporter)
    feeds = token_feeds(5)  # another sequence length than the export example (7)
    got = run_onnx(path, feeds)[0]
    want = logits(model, torch.from_numpy(feeds["input_ids"])).numpy()
    assert got.shape == want.shape
    assert abs(got - want).max() < 2e-4


@pytest.mark.parametrize("decompose", [False, True])
@pytest.mark.parametrize("kind", ["gaws", "gaws_d"])
def test_torch_export_matches_eager(kind, decompose):
    model = build_gaws_model(kind, diag=True)
    program = zoo.export_program(model, decompose=decompose)
    ids = ids_(seq=6, batch=1)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        got = program.module()(ids, mask)
    torch.testing.assert_close(got, logits(model, ids), rtol=1e-4, atol=2e-4)
    names = {n.name for n in program.graph.nodes if n.op == "placeholder"}
    assert any(name.endswith("q_proj_gaws_v" if kind == "gaws" else "q_proj_gaws_g") for name in names)
