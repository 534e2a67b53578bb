"""One pipeline for ONNX and torch.fx: the same report; the gate only times; targets own their options."""

from __future__ import annotations

import ast
import dataclasses
import json
from importlib import resources
from pathlib import Path

import jsonschema
import onnx
import pytest

import zflora_compile
from zflora_compile import cli, fuse_adapters
from zflora_compile.errors import InputError
from zflora_compile.options import CompileOptions
from zflora_compile.pipeline import compile_model
from zflora_compile.targets import TARGETS, OrtOptions
from zflora_compile.targets.base import Target
from zflora_compile.targets.ort import OrtTarget

try:
    from graphs import lora_projection_graph, qkv
except ImportError:  # tests/ became a package
    from tests.graphs import lora_projection_graph, qkv

PACKAGE = Path(zflora_compile.__file__).parent
SCHEMA = json.loads(resources.files("zflora_compile").joinpath("report_schema.json").read_text())


# ---------------------------------------------------------------- the gate (import circles: test_architecture.py)


def test_the_gate_only_times():
    """gate.py builds nothing (no pipeline import) and names no target."""
    source = (PACKAGE / "gate.py").read_text()
    imported = {n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"zflora_compile.build", "zflora_compile.pipeline", "zflora_compile.compile", "zflora_compile.options"}
    assert not any(f"'{name}'" in source or f'"{name}"' in source for name in TARGETS)


# ---------------------------------------------------------------- one report for both IRs


def _lora_program():
    torch = pytest.importorskip("torch")

    class LoraLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.base = torch.nn.Linear(16, 8)
            self.lora_A = torch.nn.Linear(16, 2, bias=False)
            self.lora_B = torch.nn.Linear(2, 8, bias=False)

        def forward(self, x):
            return self.base(x) + self.lora_B(self.lora_A(x)) * 2.0

    return torch.export.export(LoraLinear().eval(), (torch.randn(1, 5, 16),))


def test_onnx_and_fx_give_the_same_report():
    _, onnx_report = compile_model(lora_projection_graph(projections=qkv()).proto(), CompileOptions())
    program, fx_report = compile_model(_lora_program(), CompileOptions())
    onnx_json, fx_json = onnx_report.to_json(), fx_report.to_json()
    for report in (onnx_json, fx_json):
        jsonschema.validate(report, SCHEMA)
        assert report["schema_version"] == "1.7" and report["status"] == "ok" and report["exit_code"] == 0
        assert len(report["input"]["sha256"]) == 64 and report["timings_s"]["total"] > 0
        assert report["verification"]["passed"] is True
    assert set(onnx_json) == set(fx_json)
    assert (onnx_json["input"]["ir"], fx_json["input"]["ir"]) == ("onnx", "fx")
    assert len(fx_json["sites"]) == 1 and fx_json["input"]["gemm_count"] == 3 and fx_json["output"]["gemm_count"] == 2
    assert type(program).__name__ == "ExportedProgram"


def test_fuse_adapters_on_a_proto_builds_no_target(monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("an in-memory compile must not build a target")

    monkeypatch.setattr(OrtTarget, "build", no_build)
    fused = fuse_adapters(lora_projection_graph(projections=qkv()).proto())
    assert isinstance(fused, onnx.ModelProto) and sum(n.op_type == "MatMul" for n in fused.graph.node) == 2


# ---------------------------------------------------------------- targets own their options


@dataclasses.dataclass(frozen=True)
class FakeOptions:
    level: int = 1

    def __post_init__(self):
        if self.level < 0:
            raise InputError(f"--fake-level must be >= 0, got {self.level}")


class FakeTarget(Target):
    name = "fake"
    summary = "a target for the tests"
    Options = FakeOptions

    @classmethod
    def add_arguments(cls, group) -> None:
        group.add_argument("--fake-level", type=int, default=1)

    @classmethod
    def options_from_args(cls, args) -> FakeOptions:
        return FakeOptions(level=args.fake_level)

    def build(self, model_path, out_dir, shapes):
        raise NotImplementedError

    def load(self, out_dir, model_path, shape):
        raise NotImplementedError


def test_the_cli_composes_target_flags_from_the_registry(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(TARGETS, "fake", FakeTarget)
    args = cli.build_parser().parse_args(["compile", "m.onnx", "--target", "fake", "--fake-level", "3"])
    assert FakeTarget.options_from_args(args) == FakeOptions(level=3)
    assert CompileOptions(target="fake").target_options == FakeOptions()
    # a bad option fails before the compile starts (the model does not even exist) and still reports
    report = tmp_path / "r.json"
    code = cli.main([str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "out"), "--target", "fake", "--fake-level", "-1", "--report", str(report)])
    assert code == 2 and "--fake-level must be >= 0" in capsys.readouterr().err
    assert json.loads(report.read_text())["status"] == "error" and not (tmp_path / "out").exists()


def test_options_must_belong_to_the_target():
    with pytest.raises(InputError, match="target 'qnn' takes QnnOptions, not OrtOptions"):
        CompileOptions(target="qnn", target_options=OrtOptions())
    with pytest.raises(InputError, match="unknown target 'npu'"):
        CompileOptions(target="npu")
