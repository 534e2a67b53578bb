"""The FX front-end on torch.export programs of tiny PEFT LoRA models.

Llama (separate q/k/v, gate/up), Qwen2 (bias on q/k/v), Phi-3 (already fused qkv_proj and
gate_up_proj); every strategy; before and after run_decompositions; ExportedProgram and
GraphModule in; numerical equality in eager PyTorch; GEMM counts; idempotence; the fused
program's ONNX export equals zcompile's ONNX output for the same PEFT model.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from zflora_compile import zoo  # noqa: E402
from zflora_compile.api import detect_adapters, fuse_adapters  # noqa: E402
from zflora_compile.fx import fuse_fx_with_report, linear_op_count  # noqa: E402

ARCH_SITES = {"llama": 14, "qwen2": 14, "phi3": 8}  # 2 layers x adapted projections
ARCH_GROUPS = {"llama": 8, "qwen2": 8, "phi3": 8}  # llama/qwen2: QKV, O, GU, D per layer


class Programs:
    """PEFT models and their exported programs, built once per test session."""

    def __init__(self):
        self.models: dict = {}
        self.programs: dict = {}

    def model(self, arch: str, **build):
        key = (arch, repr(sorted(build.items(), key=str)))
        if key not in self.models:
            self.models[key] = zoo.build_lora_model(arch, **build)
        return self.models[key]

    def program(self, arch: str, *, decompose: bool = False, export=None, **build):
        key = (arch, decompose, repr(sorted((export or {}).items())), repr(sorted(build.items(), key=str)))
        if key not in self.programs:
            if decompose:
                self.programs[key] = self.program(arch, export=export, **build).run_decompositions()
            else:
                self.programs[key] = zoo.export_program(self.model(arch, **build), **(export or {}))
        return self.programs[key]


@pytest.fixture(scope="session")
def programs() -> Programs:
    return Programs()


def _ids(seq: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (1, seq), generator=generator)
    return ids, torch.ones(1, seq, dtype=torch.int64)


def _logits(module, seq: int, seed: int = 0):
    with torch.no_grad():
        return module(*_ids(seq, seed))


def _lora_names(state_dict) -> list[str]:
    return [k for k in state_dict if ".lora_A." in k or ".lora_B." in k]


@pytest.mark.parametrize("arch", sorted(ARCH_SITES))
def test_detects_every_peft_site(programs, arch):
    detection = detect_adapters(programs.program(arch))
    assert len(detection.sites) == ARCH_SITES[arch] and not detection.rejections
    assert len({s.group for s in detection.sites}) == ARCH_GROUPS[arch]
    labels = [s.label for s in detection.sites]
    assert all(s.layer in (0, 1) for s in detection.sites), labels
    assert {s.projection for s in detection.sites} == set(zoo.ALL_TARGETS[arch])
    assert all((s.rank, s.scale) == (4, 2.0) for s in detection.sites)
    assert all(s.has_bias == (arch == "qwen2" and s.projection in ("q_proj", "k_proj", "v_proj")) for s in detection.sites)
    if arch != "phi3":
        qkv = [s for s in detection.sites if s.layer == 0 and s.projection in ("q_proj", "k_proj", "v_proj")]
        assert len({s.group for s in qkv}) == 1


# every arch x strategy on the training IR; after run_decompositions: every strategy on llama
# and phi3, fuse on qwen2 (keeps CI short)
CASES = [(arch, strategy, False) for arch in sorted(ARCH_SITES) for strategy in ("fuse", "merge", "strip")] + [
    (arch, strategy, True) for arch in ("llama", "phi3") for strategy in ("fuse", "merge", "strip")
] + [("qwen2", "fuse", True)]


@pytest.mark.parametrize(("arch", "strategy", "decompose"), CASES, ids=[f"{a}-{s}-{'decomposed' if d else 'training-ir'}" for a, s, d in CASES])
def test_strategies_are_exact(programs, arch, strategy, decompose):
    program = programs.program(arch, decompose=decompose)
    fused, report = fuse_fx_with_report(program, strategy)
    assert isinstance(fused, torch.export.ExportedProgram)
    assert report["verification"]["passed"] is True
    sites, groups = ARCH_SITES[arch], ARCH_GROUPS[arch]
    before = linear_op_count(program)
    expected = before - 3 * sites + 2 * groups if strategy == "fuse" else before - 2 * sites
    assert (report["input"]["gemm_count"], report["output"]["gemm_count"]) == (before, expected)
    assert linear_op_count(fused) == expected
    # the adapter weights are gone from the program; the new ones are its parameters
    assert not _lora_names(fused.state_dict)
    new = [k for k in fused.state_dict if k.startswith("zflora_")]
    assert len(new) == {"fuse": 2 * groups + (2 if arch == "qwen2" else 0), "merge": sites, "strip": 0}[strategy]
    assert all(isinstance(fused.state_dict[k], torch.nn.Parameter) for k in new)
    assert set(fused.graph_signature.parameters) == set(fused.state_dict) - set(fused.graph_signature.buffers)
    # numerical equality in eager, on a sequence length other than the example's
    model = programs.model(arch)
    if strategy == "strip":
        with model.disable_adapter():
            expected_logits = model(input_ids=_ids(11)[0], attention_mask=_ids(11)[1], use_cache=False).logits.detach()
    else:
        with torch.no_grad():
            expected_logits = model(input_ids=_ids(11)[0], attention_mask=_ids(11)[1], use_cache=False).logits
    assert torch.allclose(_logits(fused.module(), 11), expected_logits, atol=1e-4, rtol=1e-4)
    # idempotent: nothing left to find, fusing again changes nothing
    again = detect_adapters(fused)
    assert not again.sites and not again.rejections
    assert linear_op_count(fuse_adapters(fused, strategy, verify=False)) == expected


def test_fused_program_survives_save_load_and_decomposition(programs, tmp_path):
    fused = fuse_adapters(programs.program("qwen2"))
    path = tmp_path / "fused.pt2"
    torch.export.save(fused, str(path))
    loaded = torch.export.load(str(path))
    fused.validate()  # the program's own verifier
    loaded.validate()
    decomposed = fused.run_decompositions()
    reference = _logits(fused.module(), 9, seed=3)
    assert torch.allclose(_logits(loaded.module(), 9, seed=3), reference, atol=1e-5)
    assert torch.allclose(_logits(decomposed.module(), 9, seed=3), reference, atol=1e-5)
    assert linear_op_count(decomposed) == linear_op_count(fused)


@pytest.mark.parametrize("strategy", ["fuse", "merge", "strip"])
def test_graph_module_in_graph_module_out(programs, strategy):
    program = programs.program("phi3")
    gm = program.module()
    fused = fuse_adapters(gm, strategy)
    assert isinstance(fused, torch.fx.GraphModule) and fused is not gm
    assert not [n for n, _ in fused.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    assert [n for n, _ in gm.named_parameters() if ".lora_A." in n or ".lora_B." in n]  # the input keeps its adapters
    expected = _logits(gm, 7) if strategy != "strip" else _logits(fuse_adapters(program, "strip").module(), 7)
    assert torch.allclose(_logits(fused, 7), expected, atol=1e-4, rtol=1e-4)
    assert not detect_adapters(fused).sites


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_and_fp32_adapters(programs, dtype):
    torch_dtype = getattr(torch, dtype)
    program = programs.program("llama", dtype=torch_dtype, adapter_dtype=torch.float32)
    detection = detect_adapters(program)
    assert len(detection.sites) == 14 and {s.dtype for s in detection.sites} == {dtype}
    for strategy in ("fuse", "merge"):
        fused, report = fuse_fx_with_report(program, strategy)
        assert report["verification"]["passed"] is True
        worst = report["verification"]["worst"]["max_abs_diff"]
        assert 0 < worst <= {"float16": 1e-2, "bfloat16": 5e-2}[dtype] * 10
        assert next(iter(fused.state_dict.values())).dtype == torch_dtype


def test_kv_cache_program(programs):
    program = programs.program("llama", export={"with_cache": True})
    fused, report = fuse_fx_with_report(program, "fuse")
    assert report["verification"]["passed"] is True
    assert len(report["sites"]) == 14
    assert len(fused.graph_signature.user_outputs) == 1 + 2 * 2  # logits + present k/v per layer


def test_onnx_export_of_fused_program_equals_zcompile_onnx_output(programs, tmp_path):
    """torch.onnx.export(fuse_adapters(ep)) computes what zcompile's ONNX rewrite computes."""
    onnxruntime = pytest.importorskip("onnxruntime")
    model = programs.model("qwen2")
    onnx_path = zoo.export_onnx(model, tmp_path / "peft" / "model.onnx")
    zcompiled = fuse_adapters(onnx_path, output_dir=tmp_path / "zcompiled")
    fused = fuse_adapters(programs.program("qwen2"))
    exported = torch.onnx.export(fused, dynamo=True, verbose=False)
    exported.save(str(tmp_path / "fx_fused.onnx"))
    ids, mask = _ids(10, seed=4)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3

    def run(path):
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return session.run(None, {name: feeds[name] for name in names})[0]

    ours, theirs = run(tmp_path / "fx_fused.onnx"), run(zcompiled)
    assert ours.shape == theirs.shape == (1, 10, 128)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    import onnx

    matmuls = sum(n.op_type in ("MatMul", "Gemm") for n in onnx.load(str(tmp_path / "fx_fused.onnx")).graph.node)
    assert matmuls <= linear_op_count(fused) + 1  # the fused program's GEMMs, nothing re-expanded
