"""Precision-aware artifact checks and shapes (issue 12).

(a) The artifact check's tolerance comes from each output's dtype and from the model's
quantization: an fp16 model and a quantize_static (QDQ) model WITHOUT any adapter pass the ORT
check (their ORT_ENABLE_ALL artifact differs from the CPU reference by more than fp32's 1e-4),
while an artifact built from a wrong model still fails at that tolerance.
(b) bfloat16 on a CPU machine: exit 2 before compiling without --no-verify (one line naming the
op ONNX Runtime CPU has no bfloat16 kernel for); with --no-verify, model.onnx is written and the
report says what did not run and why.
(c) A model with fewer learned positions than the 128-token prefill: the check's and the gate's
shapes stay within them (past + seq <= positions) and the clamp is reported.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from zflora_compile.cli import main
from zflora_compile.gate import LatencyOptions, phase_shapes, position_range
from zflora_compile.targets import Shape, get_target
from zflora_compile.targets.check import QUANT_STEPS, check_artifact, output_tolerances
from zflora_compile.targets.ort import OPTIMIZED_NAME, OrtTarget
from zflora_compile.verify import TOLERANCES

torch = pytest.importorskip("torch")

from zflora_compile import zoo  # noqa: E402


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def block(path: Path, dtype: int, *, w2_factor: float = 1.0) -> Path:
    """x -> x @ W + b + x -> LayerNorm -> @ W2 -> erf-GELU, in ``dtype``: ORT_ENABLE_ALL fuses the
    residual LayerNorm and the GELU and computes them in fp32 where the reference rounds each op."""
    np_dtype = {TensorProto.FLOAT16: np.float16, TensorProto.FLOAT: np.float32}[dtype]
    rng = np.random.default_rng(0)
    h = 64
    arrays = {
        "W": rng.standard_normal((h, h)) / 8,
        "b": rng.standard_normal(h) * 0.1,
        "g": np.ones(h),
        "beta": np.zeros(h),
        "W2": rng.standard_normal((h, h)) / 8 * w2_factor,
        "rs2": np.array(1 / np.sqrt(2)),
        "one": np.array(1.0),
        "half": np.array(0.5),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "b"], ["mb"], name="bias"),
        helper.make_node("Add", ["mb", "x"], ["r"], name="residual"),
        helper.make_node("LayerNormalization", ["r", "g", "beta"], ["ln"], axis=-1, epsilon=1e-5, name="ln"),
        helper.make_node("MatMul", ["ln", "W2"], ["hid"], name="mm2"),
        helper.make_node("Mul", ["hid", "rs2"], ["h1"], name="gelu_scale"),
        helper.make_node("Erf", ["h1"], ["e"], name="gelu_erf"),
        helper.make_node("Add", ["e", "one"], ["e1"], name="gelu_add"),
        helper.make_node("Mul", ["hid", "e1"], ["h2"], name="gelu_mul"),
        helper.make_node("Mul", ["h2", "half"], ["y"], name="gelu_half"),
    ]
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", dtype, [1, "seq", h])],
        [helper.make_tensor_value_info("y", dtype, [1, "seq", h])],
        [numpy_helper.from_array(a.astype(np_dtype), name) for name, a in arrays.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def quantize(source: Path, path: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(
                {"input_ids": np.random.default_rng(i).integers(0, 128, (1, 16)).astype(np.int64), "attention_mask": np.ones((1, 16), np.int64)}
                for i in range(4)
            )

        def get_next(self):
            return next(self.feeds, None)

    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's "consider pre-processing" warnings
    quantize_static(str(source), str(path), Reader(), quant_format=QuantFormat.QDQ)
    return path


def lm_head_scaled(source: Path, path: Path, factor: float) -> Path:
    """The QDQ model with the dequantization scale of the weight of the MatMul that makes the
    logits multiplied by ``factor``: a wrong model (every logit off by up to ``factor - 1``)."""
    model = ir.load(str(source))
    value = model.graph.outputs[0]
    while value.producer().op_type != "MatMul":
        value = value.producer().inputs[0]
    weight = value.producer().inputs[1].producer()
    assert weight.op_type == "DequantizeLinear"
    scale = weight.inputs[1]
    scale.const_value = ir.tensor(scale.const_value.numpy() * np.float32(factor), name=scale.name)
    ir.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("precision")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = {
            "fp16": block(root / "block_fp16.onnx", TensorProto.FLOAT16),
            "fp16_wrong": block(root / "block_fp16_wrong.onnx", TensorProto.FLOAT16, w2_factor=1.05),
            "fp32": zoo.export_onnx(zoo.build_base_model("llama", num_hidden_layers=1), root / "llama.onnx"),
            "bf16": zoo.export_onnx(zoo.build_lora_model("llama", num_hidden_layers=1, dtype=torch.bfloat16), root / "llama_bf16_lora.onnx"),
        }
        paths["qdq"] = quantize(paths["fp32"], root / "llama_qdq.onnx")
        paths["qdq_wrong"] = lm_head_scaled(paths["qdq"], root / "llama_qdq_wrong.onnx", 1.25)
    return paths


class ArtifactOf(OrtTarget):
    """The ORT target, but its artifact is built from another model: a wrong artifact."""

    def __init__(self, other: Path):
        super().__init__()
        self.other = other

    def build(self, model_path, out_dir, shapes):
        return super().build(self.other, out_dir, shapes)


def checked(target, model: Path, out_dir: Path) -> dict:
    out_dir.mkdir()
    shapes = phase_shapes(model, LatencyOptions())
    target.build(model, out_dir, shapes)
    assert (out_dir / OPTIMIZED_NAME).exists()
    return check_artifact(target, out_dir, model, shapes, 128, 0)


# ---------------------------------------------------------------- (a) tolerance by dtype and quantization


def test_fp16_model_without_adapter_passes_at_fp16_tolerance(capsys, tmp_path, models):
    code, out, err = run(capsys, models["fp16"], "-o", tmp_path / "out", "--json")
    assert code == 0, err
    check = json.loads(out)["target"]["check"]
    assert check["passed"]
    assert check["tolerances"]["y"] == {"atol": TOLERANCES["float16"][0], "rtol": TOLERANCES["float16"][1], "why": "float16 output: float16 tolerance"}
    # the premise: ORT_ENABLE_ALL differs by more than fp32's 1e-4 (one fp16 ulp), within fp16's 1e-2
    assert 1e-4 < check["max_abs_diff"] <= 1e-2


def test_qdq_model_without_adapter_passes_at_quantization_steps(capsys, tmp_path, models):
    code, out, err = run(capsys, models["qdq"], "-o", tmp_path / "out", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["sites"] == [] and report["verification"]["passed"]
    check = report["target"]["check"]
    tolerance = check["tolerances"]["logits"]
    scale = float(next(n for n in ir.load(str(models["qdq"])).graph if n.name == "logits_DequantizeLinear").inputs[1].const_value.numpy())
    assert tolerance["atol"] == pytest.approx(QUANT_STEPS * scale) and tolerance["rtol"] == TOLERANCES["float32"][1]
    assert "quantized model (DequantizeLinear, QuantizeLinear)" in tolerance["why"] and "4 quantization steps" in tolerance["why"]
    assert check["passed"] and 1e-4 < check["max_abs_diff"] <= QUANT_STEPS * scale  # the premise: fp32's 1e-4 failed it


@pytest.mark.parametrize("kind", ["fp16", "qdq"])
def test_wrong_artifact_still_fails(tmp_path, models, kind):
    """The looser tolerance is no blanket pass: an artifact of a model with one weight 5% (fp16)
    or one weight scale 25% (QDQ) off fails, the right artifact passes, at the same tolerance."""
    right = checked(OrtTarget(), models[kind], tmp_path / "right")
    wrong = checked(ArtifactOf(models[f"{kind}_wrong"]), models[kind], tmp_path / "wrong")
    assert right["passed"] and right["failure"] is None
    assert not wrong["passed"] and right["tolerances"] == wrong["tolerances"]
    output = "y" if kind == "fp16" else "logits"
    assert wrong["failure"].startswith(f"output '{output}'") and f"> atol {wrong['tolerances'][output]['atol']:g}" in wrong["failure"]
    assert wrong["max_abs_diff"] > 3 * right["max_abs_diff"]


def test_float_outputs_of_a_quantized_model_without_dequantize_get_bfloat16_tolerance(tmp_path, models):
    from onnxruntime.quantization import quantize_dynamic

    path = tmp_path / "dynamic.onnx"
    quantize_dynamic(str(models["fp32"]), str(path))
    tolerance = output_tolerances(OrtTarget(), path)["logits"]
    assert (tolerance["atol"], tolerance["rtol"]) == TOLERANCES["bfloat16"]
    assert "DynamicQuantizeLinear" in tolerance["why"] and "MatMulInteger" in tolerance["why"]
    # an unquantized fp32 model keeps fp32's tolerance
    assert output_tolerances(OrtTarget(), models["fp32"])["logits"] == {"atol": 1e-4, "rtol": 1e-4, "why": "float32 output: float32 tolerance"}


def test_target_widens_but_never_narrows(models):
    class Npu(OrtTarget):
        artifact_tolerance = (2e-2, 2e-2)
        artifact_tolerance_why = "fp16 kernels"

    fp16 = output_tolerances(Npu(), models["fp16"])["y"]
    assert (fp16["atol"], fp16["rtol"]) == (2e-2, 2e-2) and fp16["why"].endswith("target ort: at least atol 0.02, rtol 0.02 (fp16 kernels)")
    dynamic_floor = output_tolerances(Npu(), models["qdq"])["logits"]
    assert dynamic_floor["atol"] >= 2e-2 and dynamic_floor["rtol"] == 2e-2


# ---------------------------------------------------------------- (b) bfloat16 on a CPU machine


def test_bf16_without_no_verify_fails_before_compiling(capsys, tmp_path, models):
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, models["bf16"], "-o", out_dir)
    assert code == 2 and out == ""
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"zcompile: error: {models['bf16']}: this model cannot run on this machine")
    assert "ONNX Runtime CPU has no bfloat16 kernel for Where-16 (node 'node_where'" in lines[0]
    assert "--no-verify compiles it without running it" in lines[0]
    assert not out_dir.exists()


def test_bf16_with_no_verify_writes_the_model_and_says_what_did_not_run(capsys, tmp_path, models):
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, models["bf16"], "-o", out_dir, "--no-verify", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.onnx", "report.json"]
    assert len(report["sites"]) == 7 and report["output"]["gemm_count"] < report["input"]["gemm_count"]
    written = ir.load(str(out_dir / "model.onnx"))
    assert written.graph.outputs[0].dtype == ir.DataType.BFLOAT16
    reason = report["target"]["cannot_run_here"]
    assert reason.startswith("ONNX Runtime CPU has no bfloat16 kernel for Where-16 (node 'node_where'")
    assert report["target"]["artifacts"] == [] and "check" not in report["target"]
    assert set(report["target"]["not_run"]) == {"verification", "build target ort", "check the ort artifact"}
    assert report["verification"] == {"passed": None, "skipped": "--no-verify", "cannot_run_here": reason}
    assert report["message"].endswith(f"not run on this machine ({reason}): verification, build target ort, check the ort artifact")


def test_bf16_latency_gate_cannot_run_here(capsys, tmp_path, models):
    out_dir = tmp_path / "out"
    code, _, err = run(capsys, models["bf16"], "-o", out_dir, "--no-verify", "--check-latency")
    assert code == 2 and "--check-latency runs the model, which cannot run on this machine: ONNX Runtime CPU has no bfloat16 kernel" in err
    assert not out_dir.exists()


# ---------------------------------------------------------------- (c) shapes within the learned positions


@pytest.fixture(scope="module")
def gpt2_64(tmp_path_factory) -> Path:
    """A tiny GPT-2 with 64 learned positions (``wpe``) and a LoRA on c_attn, dynamo export."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("gpt2") / "gpt2_64.onnx"
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        config = GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2, vocab_size=100, attn_implementation="eager")
        model = get_peft_model(GPT2LMHeadModel(config), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False, fan_in_fan_out=True)).eval()

        class Logits(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask):
                return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

        seq = torch.export.Dim("sequence_length", max=64)
        ids, mask = torch.randint(0, 100, (1, 8)), torch.ones(1, 8, dtype=torch.int64)
        program = torch.onnx.export(
            Logits().eval(), (ids, mask), dynamo=True, verbose=False, input_names=["input_ids", "attention_mask"], output_names=["logits"], dynamic_shapes=({1: seq}, {1: seq}), opset_version=20
        )
        program.save(str(path))
    return path


def test_short_position_model_compiles_with_its_shapes_clamped(capsys, tmp_path, gpt2_64):
    limit = position_range(gpt2_64)
    assert limit is not None and limit.positions == 64 and limit.table.endswith("transformer.wpe.weight") and limit.offset == 0
    code, out, err = run(capsys, gpt2_64, "-o", tmp_path / "out", "--json")
    assert code == 0, err
    target = json.loads(out)["target"]
    cases = {c["shape"]: c for c in target["check"]["cases"]}
    assert target["check"]["passed"]
    assert (cases["prefill"]["seq"], cases["prefill"]["past"]) == (64, 0) and (cases["decode"]["seq"], cases["decode"]["past"]) == (1, 0)
    assert cases["prefill"]["clamped"].startswith("128 -> 64 tokens: the model has 64 positions") and "clamped" not in cases["decode"]
    assert target["shapes_clamped"] == [cases["prefill"]["clamped"]]


def positions_graph(path: Path, *, positions: int, offset: int, vocab: int = 6, index_input: str = "position_ids") -> Path:
    """Token embedding (``vocab`` rows, by input_ids) + position embedding (``positions + offset``
    rows, by ``index_input`` + offset), a projection, and a KV-cache-like output."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((vocab, 8)).astype(np.float32), "wte"),
        numpy_helper.from_array(rng.standard_normal((positions + offset, 8)).astype(np.float32), "wpe"),
        numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "W"),
        numpy_helper.from_array(np.array(offset, np.int64), "offset"),
    ]
    nodes = [
        helper.make_node("Gather", ["wte", "input_ids"], ["tok"], name="embed_tokens"),
        helper.make_node("Add", [index_input, "offset"], ["shifted"], name="shift"),
        helper.make_node("Gather", ["wpe", "shifted"], ["pos"], name="embed_positions"),
        helper.make_node("Add", ["tok", "pos"], ["h"], name="embed_sum"),
        helper.make_node("MatMul", ["h", "W"], ["logits"], name="proj"),
        helper.make_node("Concat", ["past_key_values.0.key", "h"], ["present.0.key"], axis=1, name="cache"),
    ]
    graph = helper.make_graph(
        nodes,
        "positions",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"]),
            helper.make_tensor_value_info(index_input, TensorProto.INT64, [1, "seq"]),
            helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, [1, "past", 8]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", 8]), helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, [1, "total", 8])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_decode_and_prefill_clamped_by_offset_positions_in_check_and_gate(capsys, tmp_path):
    """OPT-style table: rows = positions + 2, read at position + 2. The token table (6 rows, fewer
    than the positions) must not be taken for it; decode's past and prefill's length both fit."""
    model = positions_graph(tmp_path / "pos.onnx", positions=10, offset=2)
    limit = position_range(model)
    assert (limit.positions, limit.table, limit.node, limit.offset) == (10, "wpe", "embed_positions", 2)
    shapes = phase_shapes(model, LatencyOptions())
    assert [(s.name, s.seq, s.past) for s in shapes] == [("decode", 1, 9), ("prefill", 10, 0)]
    assert shapes[0].clamped == "past 128 -> 9: the model has 10 positions ('wpe' rows, gathered by 'embed_positions' at position + 2)"
    out_dir = tmp_path / "out"
    code, out, err = run(
        capsys, model, "-o", out_dir, "--json", "--check-latency", "--max-overhead", "1000", "--rounds", "2", "--prefill-rounds", "2", "--warmup", "0"
    )
    assert code == 0, err
    report = json.loads(out)
    assert [(c["shape"], c["seq"], c["past"], c.get("clamped")) for c in report["target"]["check"]["cases"]] == [(s.name, s.seq, s.past, s.clamped) for s in shapes]
    phases = report["latency"]["phases"]
    assert (phases["decode"]["past"], phases["prefill"]["seq"]) == (9, 10)
    assert phases["decode"]["clamped"] == shapes[0].clamped and phases["prefill"]["clamped"] == shapes[1].clamped


def test_no_position_range_for_computed_or_other_indices(tmp_path, models):
    """Must not fire: a table gathered by another input (segment ids) is no position table, and a
    rotary model (positions computed, no table) has no range; its shapes stay as asked."""
    other = positions_graph(tmp_path / "segments.onnx", positions=3, offset=0, index_input="segment_ids")
    assert position_range(other) is None
    assert position_range(models["fp32"]) is None
    assert [(s.seq, s.past, s.clamped) for s in phase_shapes(models["fp32"], LatencyOptions())] == [(1, 0, ""), (128, 0, "")]


def test_shape_clamp_does_not_change_shape_identity():
    assert Shape("prefill", 64, 0, "why") == Shape("prefill", 64, 0)
    assert get_target("ort").artifact_tolerance == (0.0, 0.0)
