"""The memory estimate: what it counts, and the refusal before any work.

The estimate is arithmetic on weight bytes by dtype (no timing, no measurement): these tests pin
the rules (fp16 weights count twice as ONNX Runtime CPU holds them; regions hold one layer, not
the model; the onnx target builds nothing; the gate keeps three sessions) and that a compile
over the limit is refused with the numbers and a lighter setting that fits.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from zflora_compile.errors import EnvironmentProblem
from zflora_compile.memory import GIB, available_bytes, check_fits, estimate, weight_profile


def _layered_model(dtype, layers: int = 4, hidden: int = 64) -> ir.Model:
    """x -> MatMul(layers.i.w) ... with one [hidden, hidden] weight per layer, named by layer."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT if dtype == np.float32 else ir.DataType.FLOAT16), shape=ir.Shape([1, hidden]))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 18}, name="g")
    current = x
    for i in range(layers):
        weight = ir.Value(name=f"model.layers.{i}.mlp.weight", const_value=ir.tensor(np.ones((hidden, hidden), dtype=dtype)))
        graph.register_initializer(weight)
        node = ir.node("MatMul", [current, weight], name=f"/model/layers.{i}/MatMul")
        graph.append(node)
        current = node.outputs[0]
    graph.outputs.append(current)
    return ir.Model(graph, ir_version=10)


def test_fp16_weights_count_as_fp32_and_layers_are_found():
    fp32, fp16 = weight_profile(_layered_model(np.float32)), weight_profile(_layered_model(np.float16))
    assert fp32["stored"] == fp32["fp32"] == 4 * 64 * 64 * 4 and fp32["layers"] == 4
    assert fp16["stored"] == fp32["stored"] // 2 and fp16["fp32"] == fp32["fp32"]
    assert fp16["layer_fp32"] == fp32["layer_fp32"] == 64 * 64 * 4
    assert fp16["largest_fp32"] == 64 * 64 * 4


def test_the_steps_counted_follow_the_settings():
    model = _layered_model(np.float16, layers=8, hidden=512)
    full = estimate(model, verify="full", target="ort", check_latency=False)["steps_gib"]
    regions = estimate(model, verify="regions", target="ort", check_latency=False)["steps_gib"]
    bare = estimate(model, verify="regions", target="onnx", check_latency=False)["steps_gib"]
    gate = estimate(model, verify="off", target="ort", check_latency=True)["steps_gib"]
    assert "verify (full: two sessions)" in full and "verify (regions: two sessions of one layer)" in regions
    assert regions["verify (regions: two sessions of one layer)"] < full["verify (full: two sessions)"]
    assert not any(step.startswith(("target", "artifact")) for step in bare)
    assert "latency gate (three sessions)" in gate and not any(step.startswith("verify") for step in gate)


def test_over_the_limit_is_refused_with_the_numbers_and_what_fits():
    model = _layered_model(np.float32, layers=8, hidden=2048)  # 128 MiB of weights
    need = estimate(model, verify="full", target="ort", check_latency=True)
    limit = (need["steps_gib"]["verify (full: two sessions)"] + need["steps_gib"]["latency gate (three sessions)"]) / 2
    with pytest.raises(EnvironmentProblem) as refused:
        check_fits(model, verify="full", target="ort", check_latency=True, limit_gib=limit)
    message = str(refused.value)
    assert f"{need['peak_gib']:g} GiB at its peak (latency gate (three sessions)" in message and "(--memory-limit)" in message
    assert "without --check-latency it needs about" in message
    fits = check_fits(model, verify="full", target="ort", check_latency=False, limit_gib=limit)
    assert fits["fits"] is True and fits["limit_source"] == "--memory-limit" and fits["peak_gib"] <= limit


def test_available_memory_is_read_from_the_os():
    available, source = available_bytes()
    assert available is None or (available > 0.1 * GIB and source)


def test_writing_shows_one_step_per_external_tensor_and_writes_the_same_files(tmp_path):
    """save_model's progress display counts the tensors written to the data file; the files
    are the ones written without a display, byte for byte."""
    import contextlib
    from pathlib import Path

    from zflora_compile.model_io import INLINE_BYTES, load_model, save_model

    example = Path(__file__).resolve().parents[1] / "examples" / "tiny_llama_lora.onnx"
    model = load_model(example)
    shown = []

    class Display:
        @contextlib.contextmanager
        def bar(self, name, total):
            shown.append(total)
            yield lambda: shown.append("step")

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save_model(model, tmp_path / "a" / "model.onnx", external=True, progress=Display())
    save_model(model, tmp_path / "b" / "model.onnx", external=True)
    external = sum(1 for v in model.graph.initializers.values() if v.const_value is not None and v.const_value.nbytes > INLINE_BYTES)
    assert shown[0] == external == shown.count("step") > 0
    for name in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_released_weights_unmap_and_read_again_the_same(tmp_path):
    """release_weights unmaps every external weight read so far (its pages leave the process's
    resident memory), skips one an array still views, and a weight read again equals itself."""
    from pathlib import Path

    from zflora_compile.model_io import load_model, release_weights, save_model

    example = Path(__file__).resolve().parents[1] / "examples" / "tiny_llama_lora.onnx"
    save_model(load_model(example), tmp_path / "model.onnx", external=True)
    model = load_model(tmp_path / "model.onnx")
    external = [v for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]
    before = {v.name: np.array(v.const_value.numpy()) for v in external}  # copies: no view is kept
    held = external[0].const_value.numpy()  # a live view of the first mapping
    assert release_weights(model) == len(external) - 1
    assert external[0].const_value.raw is not None and all(v.const_value.raw is None for v in external[1:])
    del held
    assert release_weights(model) == 1
    for v in external:
        np.testing.assert_array_equal(v.const_value.numpy(), before[v.name])


def test_a_compile_over_the_memory_limit_exits_2_before_any_work(capsys, tmp_path):
    """--memory-limit below the estimate: exit 2, one line with the numbers, nothing written; at a
    limit that fits, the report carries the estimate."""
    import json
    from pathlib import Path

    from zflora_compile.cli import main

    example = Path(__file__).resolve().parents[1] / "examples" / "tiny_llama_lora.onnx"
    code = main([str(example), "-o", str(tmp_path / "out"), "--memory-limit", "0.3"])
    err = capsys.readouterr().err
    assert code == 2 and "needs an estimated 0.6 GiB at its peak" in err and "0.3 GiB is available (--memory-limit)" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    code = main([str(example), "-o", str(tmp_path / "out"), "--memory-limit", "4", "--json", "-q"])
    memory = json.loads(capsys.readouterr().out)["memory"]
    assert code == 0 and memory["fits"] is True and memory["limit_gib"] == 4 and memory["limit_source"] == "--memory-limit"
    assert memory["peak_step"] in memory["steps_gib"] and memory["peak_gib"] == max(memory["steps_gib"].values())
