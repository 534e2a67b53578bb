"""FX front-end rules on hand-built nn.Modules: what fires, what must not, and why.

Every module is exported with torch.export (and, where it matters, decomposed with
run_decompositions), then detected / fused; fused programs are compared with the original in
eager PyTorch.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from zflora_compile.api import detect_adapters, fuse_adapters  # noqa: E402
from zflora_compile.errors import VerificationError  # noqa: E402
from zflora_compile.fx import fuse_fx_with_report, linear_op_count  # noqa: E402

IN, OUT, RANK = 16, 24, 2


def _param(*shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(*shape, generator=generator) * 0.3)


class Lora(torch.nn.Module):
    """``x @ W.T (+ b) + s * B(A(x))`` in the spelling chosen by the flags."""

    def __init__(self, *, rank=RANK, scale=0.5, where="after", chain_first=False, divide=False, bias=False, relu=False, matmul=False, b_out=OUT, seed=0):
        super().__init__()
        self.weight = _param(OUT, IN, seed=seed)
        self.bias = _param(OUT, seed=seed + 1) if bias else None
        self.a = _param(rank, IN, seed=seed + 2)
        self.b = _param(b_out, rank, seed=seed + 3)
        self.scale, self.where, self.chain_first, self.divide, self.relu, self.matmul = scale, where, chain_first, divide, relu, matmul

    def _scaled(self, t):
        return t / (1.0 / self.scale) if self.divide else self.scale * t

    def forward(self, x):
        if self.matmul:
            base = x @ self.weight.t()
            z = x @ self.a.t()
        else:
            base = torch.nn.functional.linear(x, self.weight, self.bias)
            z = torch.nn.functional.linear(x, self.a)
        if self.relu:
            z = torch.relu(z)
        if self.where == "between":
            z = self._scaled(z)
        delta = z @ self.b.t() if self.matmul else torch.nn.functional.linear(z, self.b)
        if self.where == "after":
            delta = self._scaled(delta)
        return delta + base if self.chain_first else base + delta


class Qkv(torch.nn.Module):
    """Three adapted projections reading one tensor (one with a bias, one scaled between A and B)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = Lora(seed=0), Lora(seed=10, bias=True), Lora(seed=20, where="between")

    def forward(self, x):
        return self.q(x) * self.k(x) + self.v(x)


class BufferAdapter(torch.nn.Module):
    """A and B are buffers, the scale a lifted tensor constant, the adapter runs in float64."""

    def __init__(self):
        super().__init__()
        self.weight = _param(OUT, IN, seed=1)
        self.register_buffer("a", _param(RANK, IN, seed=2).detach().double())
        self.register_buffer("b", _param(OUT, RANK, seed=3).detach().double())
        self.scale = torch.tensor(0.25, dtype=torch.float64)  # not registered: a lifted constant

    def forward(self, x):
        z = torch.nn.functional.linear(x.to(torch.float64), self.a)
        delta = torch.nn.functional.linear(z, self.b) * self.scale
        return torch.nn.functional.linear(x, self.weight) + delta.to(torch.float32)


@pytest.mark.parametrize("decompose", [False, True], ids=["training-ir", "decomposed"])
def test_buffers_lifted_constants_and_casts(decompose):
    module = BufferAdapter()
    program = _export(module, _x(), decompose=decompose)
    kinds = {spec.kind.name for spec in program.graph_signature.input_specs}
    assert {"PARAMETER", "BUFFER", "CONSTANT_TENSOR"} <= kinds
    detection = detect_adapters(program)
    assert len(detection.sites) == 1 and not detection.rejections
    assert detection.sites[0].scale == pytest.approx(0.25) and detection.sites[0].dtype == "float32"
    for strategy in ("fuse", "merge"):
        fused, report = fuse_fx_with_report(program, strategy)
        assert report["verification"]["passed"] is True
        assert not fused.graph_signature.buffers and not fused.constants  # A, B and the scale are folded in
        with torch.no_grad():
            assert _same(fused.module()(_x(seed=4)), module(_x(seed=4)))


class ElsewhereChain(torch.nn.Module):
    """The low-rank chain of x is added to a projection of another tensor."""

    def __init__(self):
        super().__init__()
        self.weight = _param(OUT, IN, seed=1)
        self.a, self.b = _param(RANK, IN, seed=2), _param(OUT, RANK, seed=3)

    def forward(self, x, y):
        return torch.nn.functional.linear(y, self.weight) + 0.5 * torch.nn.functional.linear(torch.nn.functional.linear(x, self.a), self.b)


class ChainOnActivation(torch.nn.Module):
    """The chain is added to a non-projection (a tanh of x padded to OUT features)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = _param(RANK, IN, seed=2), _param(IN, RANK, seed=3)

    def forward(self, x):
        return torch.tanh(x) + torch.nn.functional.linear(torch.nn.functional.linear(x, self.a), self.b)


class InputAdapter(torch.nn.Module):
    """A is a graph input, not a constant."""

    def __init__(self):
        super().__init__()
        self.weight, self.b = _param(OUT, IN, seed=1), _param(OUT, RANK, seed=3)

    def forward(self, x, a):
        return torch.nn.functional.linear(x, self.weight) + torch.nn.functional.linear(torch.nn.functional.linear(x, a), self.b)


def _x(seed=0, shape=(2, 5, IN)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _export(module, *args, decompose=False):
    program = torch.export.export(module.eval(), args, strict=False)
    return program.run_decompositions() if decompose else program


def _same(a, b, atol=1e-5):
    return torch.allclose(a, b, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("decompose", [False, True], ids=["training-ir", "decomposed"])
@pytest.mark.parametrize(
    "flags",
    [
        {},
        {"where": "between"},
        {"chain_first": True},
        {"divide": True},
        {"bias": True},
        {"matmul": True},
        {"where": "none"},
    ],
    ids=["scale-after-B", "scale-between", "chain-first", "div", "bias", "matmul-t", "no-scale"],
)
def test_single_site_fires_and_fuses(flags, decompose):
    module = Lora(**flags)
    program = _export(module, _x(), decompose=decompose)
    detection = detect_adapters(program)
    assert len(detection.sites) == 1 and not detection.rejections
    site = detection.sites[0]
    expected_scale = 1.0 if flags.get("where") == "none" else 0.5
    assert (site.in_features, site.out_features, site.rank) == (IN, OUT, RANK)
    assert site.scale == pytest.approx(expected_scale)
    assert site.has_bias == bool(flags.get("bias"))
    for strategy in ("fuse", "merge", "strip"):
        fused, report = fuse_fx_with_report(program, strategy)
        assert report["verification"]["passed"] is True
        assert isinstance(fused, torch.export.ExportedProgram)
        assert linear_op_count(fused) == 3 - (1 if strategy == "fuse" else 2)
        x = _x(seed=5)
        with torch.no_grad():
            if strategy == "strip":
                assert _same(fused.module()(x), torch.nn.functional.linear(x, module.weight, module.bias))
            else:
                assert _same(fused.module()(x), module(x))


@pytest.mark.parametrize("decompose", [False, True], ids=["training-ir", "decomposed"])
def test_group_of_three_is_one_fused_gemm_pair(decompose):
    module = Qkv()
    program = _export(module, _x(), decompose=decompose)
    detection = detect_adapters(program)
    assert len(detection.sites) == 3 and len({s.group for s in detection.sites}) == 1
    fused, report = fuse_fx_with_report(program, "fuse")
    assert linear_op_count(fused) == 2
    assert report["plan"]["fused_groups"][0]["out_splits"] == [OUT] * 3
    assert report["plan"]["fused_groups"][0]["rank_total"] == 3 * RANK
    with torch.no_grad():
        assert _same(fused.module()(_x(seed=9)), module(_x(seed=9)))
    again = detect_adapters(fused)
    assert not again.sites and not again.rejections


def test_graph_module_in_graph_module_out():
    module = Qkv()
    gm = torch.export.export(module.eval(), (_x(),), strict=False).module()
    fused = fuse_adapters(gm)
    assert isinstance(fused, torch.fx.GraphModule) and fused is not gm
    assert linear_op_count(fused) == 2 and linear_op_count(gm) == 9
    names = {name for name, _ in fused.named_parameters()}
    # every old weight was folded into the new ones and removed; fused weight, low-rank weight, bias
    assert len(names) == 3 and all(name.startswith("zflora_") for name in names), names
    assert sum(name.endswith("fused_weight") for name in names) == 1
    with torch.no_grad():
        assert _same(fused(_x(seed=3)), module(_x(seed=3)))
    assert linear_op_count(gm) == 9  # the input is not modified


def _reasons(program):
    detection = detect_adapters(program)
    assert not detection.sites
    return [r.reason for r in detection.rejections]


@pytest.mark.parametrize("decompose", [False, True], ids=["training-ir", "decomposed"])
def test_relu_between_a_and_b_must_not_fire(decompose):
    reasons = _reasons(_export(Lora(relu=True), _x(), decompose=decompose))
    assert len(reasons) == 1 and "relu" in reasons[0] and "not linear" in reasons[0]


@pytest.mark.parametrize("decompose", [False, True], ids=["training-ir", "decomposed"])
def test_rank_too_large_must_not_fire(decompose):
    reasons = _reasons(_export(Lora(rank=12), _x(), decompose=decompose))
    assert len(reasons) == 1 and "rank 12 is not small" in reasons[0]
    # a larger ratio accepts it
    assert len(detect_adapters(_export(Lora(rank=12), _x()), max_rank_ratio=1.0).sites) == 1


def test_chain_added_to_projection_of_another_tensor_must_not_fire():
    reasons = _reasons(_export(ElsewhereChain(), _x(), _x(seed=1)))
    assert len(reasons) == 1 and "low-rank chain reads 'x'" in reasons[0] and "reads 'y'" in reasons[0]


def test_chain_added_to_non_projection_must_not_fire():
    reasons = _reasons(_export(ChainOnActivation(), _x()))
    assert len(reasons) == 1 and "not to a projection" in reasons[0]


def test_non_constant_adapter_must_not_fire():
    reasons = _reasons(_export(InputAdapter(), _x(), _param(RANK, IN, seed=2).detach()))
    assert len(reasons) == 1 and "low-rank A" in reasons[0] and "is not constant (a graph input)" in reasons[0]


class InputWeight(torch.nn.Module):
    """The base weight W is a graph input (e.g. produced at run time), not a constant."""

    def __init__(self):
        super().__init__()
        self.a, self.b = _param(RANK, IN, seed=2), _param(OUT, RANK, seed=3)

    def forward(self, x, weight):
        return torch.nn.functional.linear(x, weight) + torch.nn.functional.linear(torch.nn.functional.linear(x, self.a), self.b)


def test_non_constant_base_weight_must_not_fire():
    reasons = _reasons(_export(InputWeight(), _x(), _param(OUT, IN, seed=1).detach()))
    assert len(reasons) == 1 and "base weight 'weight'" in reasons[0] and "is not constant (a graph input)" in reasons[0]


def test_shape_mismatch_must_not_fire():
    # B writes one feature that broadcasts over the projection's OUT features
    reasons = _reasons(_export(Lora(b_out=1), _x()))
    assert len(reasons) == 1 and "shapes do not line up" in reasons[0]


def test_rejected_sites_are_left_alone_by_fuse():
    program = _export(Lora(relu=True), _x())
    fused, report = fuse_fx_with_report(program, "fuse")
    assert not report["sites"] and len(report["rejected"]) == 1
    assert linear_op_count(fused) == linear_op_count(program) == 3
    with torch.no_grad():
        assert _same(fused.module()(_x(seed=2)), program.module()(_x(seed=2)))


def test_verification_failure_raises_with_report():
    program = _export(Lora(), _x())
    with pytest.raises(VerificationError) as caught:
        fuse_adapters(program, atol=-1.0, rtol=0.0)  # no difference can be <= -1
    assert caught.value.report["verification"]["passed"] is False
    assert "verification failed" in str(caught.value)


def test_symbolic_trace_graph_module_is_an_input_error():
    from zflora_compile.errors import InputError

    traced = torch.fx.symbolic_trace(Lora())
    with pytest.raises(InputError, match="no shape metadata"):
        fuse_adapters(traced)
    with pytest.raises(InputError, match="no shape metadata"):
        detect_adapters(traced)


def test_unknown_strategy_is_an_input_error():
    from zflora_compile.errors import InputError

    with pytest.raises(InputError):
        fuse_adapters(_export(Lora(), _x()), "widen")
