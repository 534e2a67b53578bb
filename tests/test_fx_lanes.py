"""FFA / FBA / FFBA / zFLoRA through the torch.fx front-end: the same records and planner as ONNX.

torch.export programs of the tiny adapted models, before and after ``run_decompositions()``
(where ``linear`` on a zFLoRA slice becomes ``expand``/``view``/``bmm``): the fused program has
exactly the base program's GEMM count, runs in eager PyTorch with the unfused program's logits,
and (``strip``) FFA/FBA reduce to the base model. The fused program also exports to ONNX.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from zflora_compile import zoo  # noqa: E402
from zflora_compile.adapters import AdapterConfig, attach_adapters, randomize_adapters  # noqa: E402
from zflora_compile.api import detect_adapters, fuse_adapters  # noqa: E402
from zflora_compile.errors import InputError  # noqa: E402
from zflora_compile.fx import fuse_fx_with_report, linear_op_count  # noqa: E402

FAMILIES = ("ffa", "fba", "ffba", "zflora")
ATOL = 1e-4


class Programs:
    def __init__(self):
        self.cache: dict = {}

    def get(self, family: str | None, decompose: bool = False, arch: str = "llama"):
        key = (family, decompose, arch)
        if key not in self.cache:
            if decompose:
                self.cache[key] = self.get(family, False, arch).run_decompositions()
            else:
                torch.manual_seed(0)
                model = zoo.build_base_model(arch, seed=0)
                if family is not None:
                    model = randomize_adapters(attach_adapters(model, AdapterConfig(family=family, rank=4, alpha=8)), seed=1)
                self.cache[key] = zoo.export_program(model.eval())
        return self.cache[key]


@pytest.fixture(scope="module")
def programs() -> Programs:
    return Programs()


def logits(program, seq: int = 6):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (1, seq), generator=generator)
    module = program.module() if hasattr(program, "module") else program
    with torch.no_grad():
        out = module(ids, torch.ones_like(ids))
    return out[0] if isinstance(out, (tuple, list)) else out


@pytest.mark.parametrize("decompose", [False, True], ids=["export", "decomposed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_program_has_the_base_gemm_count_and_is_exact(programs, family, decompose):
    source = programs.get(family, decompose)
    detection = detect_adapters(source)
    assert detection.widened and not detection.rejections and not detection.sites
    fused, report = fuse_fx_with_report(source)
    assert report["verification"]["passed"]
    assert linear_op_count(source) > linear_op_count(programs.get(None, decompose))
    assert report["output"]["gemm_count"] == linear_op_count(fused) == linear_op_count(programs.get(None, decompose))
    adapter_effect = (logits(source) - logits(programs.get(None, decompose))).abs().max().item()
    assert adapter_effect > 1e-3  # the adapters are live: exactness below is not vacuous
    torch.testing.assert_close(logits(fused), logits(source), atol=ATOL, rtol=0)
    torch.testing.assert_close(logits(fused, seq=3), logits(source, seq=3), atol=ATOL, rtol=0)


def test_fx_and_onnx_front_ends_find_the_same_sites(programs, tmp_path):
    """One planner, two front-ends: the same projections gain the same rows and columns."""
    torch.manual_seed(0)
    model = randomize_adapters(attach_adapters(zoo.build_base_model("llama", seed=0), AdapterConfig(family="ffba", rank=4, alpha=8)), seed=1)
    onnx_sites = detect_adapters(zoo.export_onnx(model.eval(), tmp_path / "m.onnx", exporter="dynamo")).widened
    fx_sites = detect_adapters(programs.get("ffba")).widened

    def shape(site):
        return (site.layer, site.projection, site.in_features, site.out_features, len(site.reads), len(site.writes), site.family)

    assert sorted(map(shape, onnx_sites), key=str) == sorted(map(shape, fx_sites), key=str)


def test_graph_module_in_graph_module_out(programs):
    module = programs.get("zflora").module()
    fused = fuse_adapters(module)
    assert isinstance(fused, torch.fx.GraphModule)
    torch.testing.assert_close(logits(fused), logits(module), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["ffa", "fba", "ffba"])
def test_strip_gives_the_base_program(programs, family):
    stripped, report = fuse_fx_with_report(programs.get(family), "strip")
    assert linear_op_count(stripped) == linear_op_count(programs.get(None))
    torch.testing.assert_close(logits(stripped), logits(programs.get(None)), atol=ATOL, rtol=0)


def test_zflora_strip_is_refused(programs):
    with pytest.raises(InputError, match="cannot remove the zFLoRA adapter"):
        fuse_adapters(programs.get("zflora"), "strip")


def test_qwen2_bias_on_hosts_and_readers(programs):
    """Qwen2's q/k/v bias: the FFA host q_proj adds its bias to the base lanes only."""
    source = programs.get("ffba", arch="qwen2")
    fused, report = fuse_fx_with_report(source)
    assert not report["rejected"] and report["output"]["gemm_count"] == linear_op_count(programs.get(None, arch="qwen2"))
    torch.testing.assert_close(logits(fused), logits(source), atol=ATOL, rtol=0)


def test_fused_program_exports_to_onnx(programs, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    fused = fuse_adapters(programs.get("ffba"))
    torch.onnx.export(fused, dynamo=True, verbose=False).save(str(tmp_path / "fused.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "fused.onnx"), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (1, 6), generator=generator)
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, dict(zip(names, [ids.numpy(), torch.ones_like(ids).numpy()])))[0]
    torch.testing.assert_close(torch.from_numpy(got), logits(programs.get("ffba")), atol=ATOL, rtol=0)


def test_bfloat16_program():
    torch.manual_seed(0)
    base = zoo.build_base_model("llama", seed=0, dtype=torch.bfloat16)
    model = randomize_adapters(attach_adapters(base, AdapterConfig(family="ffba", rank=4, alpha=8)), seed=1)
    program = zoo.export_program(model.eval())
    fused, report = fuse_fx_with_report(program)
    assert report["verification"]["passed"] and not report["rejected"]
    assert report["output"]["gemm_count"] == linear_op_count(zoo.export_program(zoo.build_base_model("llama", seed=0, dtype=torch.bfloat16)))


class _Lane(torch.nn.Module):
    """q = t Wq (host), z = t A; y = o Wo + 0.5 (z B): one FFA-style lane; optionally y0 = o Wo escapes."""

    def __init__(self, leak: bool):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.o = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.A, self.B = torch.nn.Linear(8, 2, bias=False), torch.nn.Linear(2, 8, bias=False)
        self.leak = leak

    def forward(self, t, o):
        q = self.q(t)  # the host comes first, as in a decoder layer (FX keeps the graph's order)
        y0 = self.o(o)
        y = y0 + 0.5 * self.B(self.A(t))
        return (q, y, y0) if self.leak else (q, y)


@pytest.mark.parametrize("leak", [False, True])
def test_base_output_with_another_consumer_must_not_fire(leak):
    args = (torch.randn(1, 3, 8), torch.randn(1, 3, 8))
    program = torch.export.export(_Lane(leak).eval(), args, strict=False)
    detection = detect_adapters(program)
    if leak:  # y0 is also an output: widening o_proj would add the lanes to it too
        assert detection.widened == [] and len(detection.rejections) == 1 and "also used" in detection.rejections[0].reason
    else:
        assert len(detection.widened) == 2 and not detection.rejections
    fused = fuse_adapters(program, verify=False)  # compared here, independently of the tool's check
    for got, want in zip(fused.module()(*args), program.module()(*args)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_fused_program_runs_under_torch_compile(programs):
    """The fused program is plain ATen: inductor compiles it (CPU here) and it matches eager."""
    fused = fuse_adapters(programs.get("ffba")).module()
    compiled = torch.compile(fused)
    generator = torch.Generator().manual_seed(3)  # the inputs logits() uses
    ids = torch.randint(0, 128, (1, 6), generator=generator)
    with torch.no_grad():
        got = compiled(ids, torch.ones_like(ids))
    torch.testing.assert_close(got, logits(programs.get("ffba")), atol=ATOL, rtol=0)
