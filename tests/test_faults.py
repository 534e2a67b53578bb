"""Fault injection for zcompile's file pipeline: signals, full and read-only disks, races on one
output directory, ``--force`` next to the input, symlinks, umask, non-finite weights, reports
that stay strict JSON and get written on every failure.

Runs without torch: the shipped ``examples/tiny_llama_lora.onnx`` and ``tests/graphs.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graphs import Proj, lora_projection_graph
from zflora_compile import build
from zflora_compile.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_llama_lora.onnx"
ROOT = Path(__file__).resolve().parents[1]

# A zcompile process whose verification parks (after touching MARKER) until a signal arrives:
# the signal lands mid-verify deterministically, with every temporary file of that stage on disk.
SLOW_VERIFY = """
import sys, time
from pathlib import Path
import zflora_compile.verify as verify
real = verify.verify_models
def parked(*args, **kwargs):
    Path(sys.argv[1]).touch()
    time.sleep(float(sys.argv[2]))
    return real(*args, **kwargs)
verify.verify_models = parked
import zflora_compile.pipeline as pipeline
pipeline.verify_models = parked
from zflora_compile.cli import main
sys.exit(main(sys.argv[3:]))
"""


SCHEMA = json.loads(resources.files("zflora_compile").joinpath("report_schema.json").read_text())


def strict_json(text: str):
    """``json.loads`` that refuses NaN / Infinity (what a strict parser does); a compile report
    (one with a ``schema_version``) must also satisfy the shipped schema."""

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    document = json.loads(text, parse_constant=refuse)
    if isinstance(document, dict) and "schema_version" in document:
        jsonschema.validate(document, SCHEMA)
    return document


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def parked_zcompile(tmp_path: Path, argv: list, *, park_s: float = 120.0, env_tmp: Path | None = None) -> tuple[subprocess.Popen, Path]:
    marker = tmp_path / f"verifying-{time.monotonic_ns()}"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if env_tmp is not None:
        env["TMPDIR"] = str(env_tmp)
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_VERIFY, str(marker), str(park_s), *map(str, argv)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    return process, marker


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"zcompile ended before verification: {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("zcompile never reached verification")
        time.sleep(0.05)


# ----------------------------------------------------------------------------- signals


@pytest.mark.parametrize(("signum", "strategy"), [(signal.SIGTERM, "fuse"), (signal.SIGTERM, "strip"), (signal.SIGHUP, "fuse"), (signal.SIGINT, "fuse")])
def test_signal_mid_verify_leaves_nothing(tmp_path, signum, strategy):
    parent, private_tmp = tmp_path / "parent", tmp_path / "tmp"
    parent.mkdir()
    private_tmp.mkdir()
    report = tmp_path / "reports" / "r.json"
    process, marker = parked_zcompile(tmp_path, [EXAMPLE, "-o", parent / "out", "--strategy", strategy, "--report", report], env_tmp=private_tmp)
    wait_for(marker, process)
    assert [n for n in os.listdir(private_tmp) if n.startswith("zflora-")], "the compile's temporary files exist mid-verify"
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, err
    assert os.listdir(parent) == [], "output parent must be left as it was"
    # `.ses` is written by `import onnxruntime` itself (one fixed name, not per run)
    assert [n for n in os.listdir(private_tmp) if n != ".ses"] == [], "TMPDIR must be left as it was"
    assert err.strip() == f"zcompile: interrupted ({signal.Signals(signum).name})"
    document = strict_json(report.read_text())
    assert document["exit_code"] == 128 + signum and "interrupted" in document["message"]


# ----------------------------------------------------------------------------- full / read-only disks


@pytest.fixture
def small_tmpfs(tmp_path):
    """Mount a tmpfs of the size asked for (skip with the reason where mounting is not allowed)."""
    mounted = []

    def mount(size: str, *extra: str) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        options = ",".join([f"size={size}", *extra])
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {done.stderr.strip() or done.returncode}")
        mounted.append(point)
        return point

    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


# 1 MiB: model.onnx (~2.3 MB) does not fit; 3 MiB: model.onnx fits, ONNX Runtime's optimized model does not
@pytest.mark.parametrize("size", ["1m", "3m"])
def test_full_disk_is_exit_2_and_leaves_nothing(capsys, small_tmpfs, size):
    disk = small_tmpfs(size)
    report = disk.parent / f"report-{size}.json"
    code, out, err = run(capsys, EXAMPLE, "-o", disk / "out", "--report", report)
    line = one_error_line(err)
    assert code == 2, err
    assert line.startswith("zcompile: error: ") and str(disk) in line and "ENOSPC" in line, line
    assert os.listdir(disk) == []
    document = strict_json(report.read_text())
    assert document["exit_code"] == 2 and document["status"] == "error"


def test_read_only_filesystem_is_exit_2(capsys, small_tmpfs):
    disk = small_tmpfs("1m", "ro")
    code, _, err = run(capsys, EXAMPLE, "-o", disk / "out")
    line = one_error_line(err)
    assert code == 2 and "EROFS" in line and str(disk / "out") in line, err


def test_output_under_a_regular_file_is_exit_2(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, _, err = run(capsys, EXAMPLE, "-o", blocker / "out")
    line = one_error_line(err)
    assert code == 2 and "ENOTDIR" in line and str(blocker) in line, err
    assert blocker.read_text() == "not a directory"


# ----------------------------------------------------------------------------- one output, two runs


def test_a_claimed_output_refuses_a_second_run(capsys, tmp_path):
    out = tmp_path / "out"
    first, marker = parked_zcompile(tmp_path, [EXAMPLE, "-o", out])
    try:
        wait_for(marker, first)
        for extra in ([], ["--force"]):
            code, _, err = run(capsys, EXAMPLE, "-o", out, *extra)
            assert code == 2 and "another zcompile run is writing" in one_error_line(err), err
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert first.returncode == 143
    assert not out.exists() and os.listdir(tmp_path) == [marker.name]


def test_two_concurrent_runs_cannot_both_succeed(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "zflora_compile.cli", str(EXAMPLE), "-o", str(out), "-q", "--no-verify"]
    runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    assert any("another zcompile run is writing" in err or "not empty" in err for _, err in results), results
    assert sorted(os.listdir(out)) == ["model.onnx", "model.optimized.onnx", "report.json"]
    assert os.listdir(tmp_path) == ["out"]


# ----------------------------------------------------------------------------- --force next to the input


@pytest.mark.parametrize("layout", ["input inside -o", "-o above the input", "-o is the input's directory", "-o links to the input's directory"])
def test_force_never_deletes_the_input(capsys, tmp_path, layout):
    work = tmp_path / "w"
    model_dir = work / "models" / "deep" if layout == "-o above the input" else work / "models"
    model_dir.mkdir(parents=True)
    model = model_dir / "m.onnx"
    shutil.copy(EXAMPLE, model)
    (work / "unrelated.txt").write_text("keep me")
    out = {"input inside -o": work, "-o above the input": work, "-o is the input's directory": model_dir}.get(layout)
    if out is None:
        out = tmp_path / "link"
        out.symlink_to(model_dir)
    code, _, err = run(capsys, model, "-o", out, "--force")
    assert code == 2 and "contains the input" in one_error_line(err), err
    assert model.read_bytes() == EXAMPLE.read_bytes() and (work / "unrelated.txt").read_text() == "keep me"


def test_force_replaces_an_unrelated_directory(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    code, _, err = run(capsys, EXAMPLE, "-o", out, "--force", "-q", "--no-verify")
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["model.onnx", "model.optimized.onnx", "report.json"]
    assert os.listdir(tmp_path) == ["out"]


# ----------------------------------------------------------------------------- symlinks and the umask


@pytest.mark.parametrize("dangling", [False, True])
def test_symlinked_output_is_written_through(capsys, tmp_path, dangling):
    real, link = tmp_path / "real", tmp_path / "link"
    if not dangling:
        real.mkdir()
    link.symlink_to(real)
    code, _, err = run(capsys, EXAMPLE, "-o", link, "-q", "--no-verify")
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert (real / "model.onnx").is_file()
    assert sorted(os.listdir(tmp_path)) == ["link", "real"], "no .old or staging directory left"


def test_output_directory_follows_the_umask(capsys, tmp_path):
    previous = os.umask(0o027)
    try:
        code, _, err = run(capsys, EXAMPLE, "-o", tmp_path / "out", "-q", "--no-verify")
    finally:
        os.umask(previous)
    assert code == 0, err
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "out" / "model.onnx").stat().st_mode) == 0o640


# ----------------------------------------------------------------------------- non-finite weights


def _lora_model(tmp_path: Path, *, dtype: str = "float32", poison=None, scale: float = 2.0) -> Path:
    proto = lora_projection_graph([Proj(rank=2, scale=scale)], dtype=dtype).proto()
    if poison is not None:
        tensor_name, value = poison
        for index, tensor in enumerate(proto.graph.initializer):
            if tensor.name == tensor_name:
                array = numpy_helper.to_array(tensor).copy()
                array.flat[0] = value
                proto.graph.initializer[index].CopyFrom(numpy_helper.from_array(array, tensor_name))
                break
        else:
            raise AssertionError(f"no initializer {tensor_name}")
    path = tmp_path / "lora.onnx"
    onnx.save(proto, path)
    return path


B_NAME = "layers.0.self_attn.q_proj.lora_B.default.weight"
A_NAME = "layers.0.self_attn.q_proj.lora_A.default.weight"
W_NAME = "layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize(("tensor", "value", "what"), [(B_NAME, np.nan, "NaN"), (A_NAME, np.inf, "Inf"), (W_NAME, -np.inf, "Inf")])
@pytest.mark.parametrize("strategy", ["fuse", "merge"])
def test_non_finite_weights_are_refused_with_strict_json(capsys, tmp_path, tensor, value, what, strategy):
    model = _lora_model(tmp_path, poison=(tensor, value))
    report = tmp_path / "report.json"
    code, out, err = run(capsys, model, "-o", tmp_path / "out", "--strategy", strategy, "--json", "--report", report)
    line = one_error_line(err)
    assert code == 2, err
    assert f"holds {what}" in line and tensor in line, line
    for document in (strict_json(out), strict_json(report.read_text())):
        assert document["exit_code"] == 2 and "verification" not in document
    assert not (tmp_path / "out").exists()


def test_strip_writes_a_non_finite_base_weight_as_it_is(capsys, tmp_path):
    """Strip copies W untouched (it never reads it): the base computes NaN in one column and so does
    the output; verification compares the finite values and the NaN positions."""
    model = _lora_model(tmp_path, poison=(W_NAME, np.nan))
    code, out, err = run(capsys, model, "-o", tmp_path / "out", "--strategy", "strip", "--json")
    assert code == 0, err
    written = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.initializer}
    assert np.isnan(written[W_NAME].flat[0]) and not any("lora" in name for name in written)


def _graph(tmp_path: Path, nodes, weights: dict, name: str) -> Path:
    """A one-input graph (``hidden`` [1, seq, 16] -> ``y``) of ``nodes`` over fp32 ``weights``."""
    from onnx import TensorProto, helper

    inits = [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in weights.items()]
    graph = helper.make_graph(
        [helper.make_node(op, ins, outs, name=outs[0]) for op, ins, outs in nodes], "g",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, "seq", 16])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    path = tmp_path / name
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("strategy", ["fuse", "merge"])
def test_a_non_finite_bias_on_b_is_refused(capsys, tmp_path, strategy):
    """PEFT's lora_bias: ``s * (x @ A @ B + b_B)``; b_B goes into the fused or merged bias."""
    rng = np.random.default_rng(0)
    b_bias = rng.standard_normal(8)
    b_bias[0] = np.nan
    weights = {"layers.0.q_proj.weight": rng.standard_normal((16, 8)), "layers.0.q_proj.lora_A.weight": rng.standard_normal((16, 2)),
               "layers.0.q_proj.lora_B.weight": rng.standard_normal((2, 8)), "layers.0.q_proj.lora_B.bias": b_bias, "s": np.array(2.0)}
    nodes = [("MatMul", ["hidden", "layers.0.q_proj.weight"], ["p"]), ("MatMul", ["hidden", "layers.0.q_proj.lora_A.weight"], ["z"]),
             ("MatMul", ["z", "layers.0.q_proj.lora_B.weight"], ["u0"]), ("Add", ["u0", "layers.0.q_proj.lora_B.bias"], ["u"]),
             ("Mul", ["u", "s"], ["l"]), ("Add", ["p", "l"], ["y"])]
    code, out, err = run(capsys, _graph(tmp_path, nodes, weights, "lora_bias.onnx"), "-o", tmp_path / "out", "--strategy", strategy)
    line = one_error_line(err)
    assert code == 2 and "the bias on B (tensor 'layers.0.q_proj.lora_B.bias') holds NaN" in line, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("verify", ["full", "regions"])
def test_strip_of_a_nan_base_weight_that_spreads_is_refused_as_bad_input_or_compared_where_it_can(capsys, tmp_path, verify):
    """A NaN in a base weight strip copies untouched spreads through a later projection: every
    output is NaN in the input too. The whole check can compare nothing: exit 2 naming the
    weight (the input is at fault, not the rewrite). The regional check compares the stripped
    region's output, NaN in one column on both sides and finite elsewhere: it passes."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8))
    w[0, 0] = np.nan
    weights = {"layers.0.q_proj.weight": w, "layers.0.q_proj.lora_A.weight": rng.standard_normal((16, 2)), "layers.0.q_proj.lora_B.weight": rng.standard_normal((2, 8)),
               "s": np.array(2.0), "layers.0.o_proj.weight": rng.standard_normal((8, 8))}
    nodes = [("MatMul", ["hidden", "layers.0.q_proj.weight"], ["p"]), ("MatMul", ["hidden", "layers.0.q_proj.lora_A.weight"], ["z"]),
             ("MatMul", ["z", "layers.0.q_proj.lora_B.weight"], ["u"]), ("Mul", ["u", "s"], ["l"]), ("Add", ["p", "l"], ["h"]),
             ("MatMul", ["h", "layers.0.o_proj.weight"], ["y"])]
    code, out, err = run(capsys, _graph(tmp_path, nodes, weights, "strip_mix.onnx"), "-o", tmp_path / "out", "--strategy", "strip", "--verify", verify)
    if verify == "full":
        line = one_error_line(err)
        assert code == 2 and "initializer 'layers.0.q_proj.weight' holds NaN" in line and "cannot be verified" in line, err
        assert not (tmp_path / "out").exists()
    else:
        assert code == 0, err


@pytest.mark.parametrize("strategy", ["fuse", "merge"])
def test_a_refused_in_memory_model_is_left_as_it_was(tmp_path, strategy):
    """The file pipeline checks W where it writes (a staging directory); a caller's in-memory
    model (compile_model, FuseAdaptersPass) is checked before it is rewritten."""
    import onnx_ir as ir

    from zflora_compile.errors import InputError
    from zflora_compile.options import CompileOptions
    from zflora_compile.pipeline import compile_model

    model = ir.load(str(_lora_model(tmp_path, poison=(W_NAME, np.nan))))
    before = [n.op_type for n in model.graph]
    with pytest.raises(InputError, match="holds NaN"):
        compile_model(model, CompileOptions(strategy=strategy))
    assert [n.op_type for n in model.graph] == before
    ir.save(model, tmp_path / "still.onnx")


def test_nan_against_nan_everywhere_compares_nothing_and_fails():
    from zflora_compile.verify import compare

    nans = np.full(3, np.nan, np.float32)
    outcome = compare(nans, nans.copy(), 1e-4, 1e-4)
    assert not outcome["passed"] and "nothing to compare" in outcome["reason"]  # a wrong model would pass too
    assert compare(np.zeros(0, np.float32), np.zeros(0, np.float32), 1e-4, 1e-4)["passed"]  # empty: nothing can differ


def test_fp16_overflow_of_the_fused_weight_is_refused(capsys, tmp_path):
    model = _lora_model(tmp_path, dtype="float16", poison=(B_NAME, 60000.0), scale=2.0)
    code, out, err = run(capsys, model, "-o", tmp_path / "out", "--json")
    line = one_error_line(err)
    assert code == 2 and "s·B computed in float16 (fuse) overflows to Inf" in line, err
    strict_json(out)


def _poisoned(tmp_path: Path, projections, dtype: str, edits: dict) -> Path:
    """A LoRA slice with ``edits`` ({initializer: [(index, value)]}) written into its weights."""
    proto = lora_projection_graph(projections, dtype=dtype).proto()
    for index, tensor in enumerate(proto.graph.initializer):
        if tensor.name in edits:
            array = numpy_helper.to_array(tensor).copy()
            for where, value in edits[tensor.name]:
                array[where] = value
            proto.graph.initializer[index].CopyFrom(numpy_helper.from_array(array, tensor.name))
    path = tmp_path / "lora.onnx"
    onnx.save(proto, path)
    return path


def test_fp16_overflow_of_the_merged_weight_is_refused_where_the_write_computes_it(capsys, tmp_path):
    # W[0, 0] = 65504 (fp16's largest) plus s * (A @ B)[0, 0] = 2 * (4 * 4 * 2) = 64: 65568 rounds to Inf
    model = _poisoned(tmp_path, [Proj(rank=2, scale=2.0)], "float16", {W_NAME: [((0, 0), 65504.0)], A_NAME: [((0, slice(None)), 4.0)], B_NAME: [((slice(None), 0), 4.0)]})
    code, out, err = run(capsys, model, "-o", tmp_path / "out", "--strategy", "merge", "--json")
    line = one_error_line(err)
    assert code == 2 and "W + s·A@B computed in float16 (merge) overflows to Inf" in line, err
    assert strict_json(out)["exit_code"] == 2 and not (tmp_path / "out").exists()
    # one below the rounding threshold is kept: 65504 + 2 * (A @ B)[0, 0] = 65504 + 8 rounds to 65504
    model = _poisoned(tmp_path, [Proj(rank=2, scale=2.0)], "float16", {W_NAME: [((0, 0), 65504.0)], A_NAME: [((0, slice(None)), 1.0)], B_NAME: [((slice(None), 0), 2.0)]})
    code, out, err = run(capsys, model, "-o", tmp_path / "out2", "--strategy", "merge", "--no-verify")
    assert code == 0, err


@pytest.mark.parametrize("strategy", ["fuse", "merge"])
def test_a_non_finite_w_in_a_fused_group_names_its_own_site_and_tensor(capsys, tmp_path, strategy):
    k_weight = "layers.0.self_attn.k_proj.weight"
    model = _poisoned(tmp_path, [Proj(name="q_proj"), Proj(name="k_proj")], "float32", {k_weight: [((3, 1), np.nan)]})
    code, out, err = run(capsys, model, "-o", tmp_path / "out", "--strategy", strategy)
    line = one_error_line(err)
    assert code == 2 and "k_proj" in line and f"W (tensor '{k_weight}') holds NaN" in line, line
    assert "q_proj" not in line and not (tmp_path / "out").exists()


def test_report_text_is_strict_json():
    from zflora_compile.report import report_text

    text = report_text({"a": float("nan"), "b": [float("inf"), -float("inf")], "c": np.float32("nan"), "d": 1.5})
    assert strict_json(text) == {"a": "NaN", "b": ["Infinity", "-Infinity"], "c": "NaN", "d": 1.5}


def test_verification_mismatch_with_nan_names_it():
    from zflora_compile.verify import compare

    outcome = compare(np.array([1.0, 2.0], np.float32), np.array([1.0, np.nan], np.float32), 1e-4, 1e-4)
    assert not outcome["passed"] and "non-finite" in outcome["reason"]


def test_the_same_non_finite_value_on_both_sides_passes_and_a_flipped_infinity_fails():
    from zflora_compile.verify import compare

    nan = np.array([1.0, np.nan], np.float32)
    assert compare(nan, nan.copy(), 1e-4, 1e-4)["passed"]  # the bound is NaN where the reference is
    inf = np.array([1.0, np.inf], np.float32)
    assert compare(inf, inf.copy(), 1e-4, 1e-4)["passed"]
    flipped = compare(inf, -inf, 1e-4, 1e-4)
    assert not flipped["passed"] and "non-finite" in flipped["reason"]  # |diff| = Inf <= bound = Inf otherwise


# ----------------------------------------------------------------------------- reports on every failure


def test_internal_error_writes_the_report(capsys, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected bug\nsecond line")

    monkeypatch.setattr(build, "compile_onnx", broken)
    report = tmp_path / "r.json"
    code, out, err = run(capsys, EXAMPLE, "-o", tmp_path / "out", "--report", report, "--json")
    assert code == 3 and strict_json(out)["exit_code"] == 3
    assert one_error_line(err).startswith("zcompile: internal error: RuntimeError: injected bug")
    document = strict_json(report.read_text())
    assert document["exit_code"] == 3 and "injected bug" in document["message"]
    assert os.listdir(tmp_path) == ["r.json"]


def test_unwritable_report_is_refused_before_work(capsys, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(build, "load_model", lambda *a: pytest.fail("the model was read"))
    code, _, err = run(capsys, EXAMPLE, "-o", tmp_path / "out", "--report", blocker / "r.json")
    assert code == 2 and "--report" in one_error_line(err) and "ENOTDIR" in err
    assert not (tmp_path / "out").exists()


def test_inspect_writes_its_report(capsys, tmp_path):
    report = tmp_path / "inspect.json"
    code, _, err = run(capsys, "inspect", EXAMPLE, "--report", report, "-q")
    assert code == 0, err
    assert len(strict_json(report.read_text())["sites"]) == 14


@pytest.mark.parametrize("argv", [["-q", "{model}", "-o", "{out}"], ["--json", "-q", "{model}", "-o", "{out}"], ["-q", "inspect", "{model}"]])
def test_flags_before_the_model(capsys, tmp_path, argv):
    code, out, err = run(capsys, *[a.format(model=EXAMPLE, out=tmp_path / "out") for a in argv], "--max-rank-ratio", "0.5")
    assert code == 0, err


def test_version_is_fast_and_imports_nothing_heavy():
    probe = "import sys; from zflora_compile.cli import main; main(['--version']); print(sorted(m for m in ('onnxruntime', 'onnx', 'onnx_ir', 'numpy', 'rich') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["zcompile 0.1.0", "[]"]


# ----------------------------------------------------------------------------- stderr and odd inputs


def test_external_data_success_keeps_stderr_empty(tmp_path):
    model = tmp_path / "ext" / "m.onnx"
    model.parent.mkdir()
    onnx.save(onnx.load(EXAMPLE), model, save_as_external_data=True, location="m.onnx.data", size_threshold=1024)
    done = subprocess.run([sys.executable, "-m", "zflora_compile.cli", str(model), "-o", str(tmp_path / "out"), "-q"],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_rank_0_float_input_is_verified(capsys, tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "s"], ["y"], name="scale")], "g", [x, s], [y])
    path = tmp_path / "scalar.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    code, out, err = run(capsys, path, "-o", tmp_path / "out", "--json")
    assert code == 0, err
    assert strict_json(out)["verification"]["passed"] is True


def test_input_failing_the_checker_is_not_blamed_on_the_rewrite(capsys, tmp_path):
    """A graph output without a shape fails onnx.checker but ONNX Runtime runs it: it compiles, verified
    in ONNX Runtime, and the report says the checker was the input's problem, not the rewrite's."""
    proto = lora_projection_graph().proto()
    proto.graph.output[0].type.tensor_type.ClearField("shape")
    path = tmp_path / "shapeless_output.onnx"
    onnx.save(proto, path)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(str(path), full_check=True)
    code, out, err = run(capsys, path, "-o", tmp_path / "out", "--json")
    assert code == 0, err
    document = strict_json(out)
    assert document["input"]["checker"].startswith("fails onnx.checker")
    assert document["output"]["checker"].startswith("skipped: the input model itself fails onnx.checker")
    assert document["verification"]["passed"] is True and len(document["sites"]) == 1

def test_non_finite_weights_are_refused_by_every_entry_point(tmp_path):
    """The refusal lives in the pipeline core: the onnx-ir pass and torch programs get it too."""
    import onnx_ir as ir
    import torch

    from zflora_compile import FuseAdaptersPass, InputError, fuse_adapters

    model = ir.load(str(_lora_model(tmp_path, poison=(B_NAME, np.nan))))
    with pytest.raises(InputError, match="NaN"):
        FuseAdaptersPass("fuse")(model)

    class Lora(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 2, bias=False), torch.nn.Linear(2, 8, bias=False)
            with torch.no_grad():
                self.b.weight[0, 0] = float("inf")

        def forward(self, x):
            return self.w(x) + 2.0 * self.b(self.a(x))

    program = torch.export.export(Lora().eval(), (torch.randn(2, 3, 8),))
    with pytest.raises(InputError, match="Inf"):
        fuse_adapters(program, "merge")


def test_a_float64_output_of_float32_weights_is_judged_at_float32_tolerance():
    """``Cast(y, double)`` of an fp32 LoRA projection: merge reassociates fp32 sums, which fp64's
    1e-8 tolerance would call a mismatch (a false alarm the differential fuzzer found)."""
    import onnx_ir as ir

    from zflora_compile import fuse_adapters

    graph = lora_projection_graph([Proj(rank=4, scale=3.0, out=64)], in_features=64, seed=5)
    model = graph.model
    out = model.graph.outputs[0]
    cast = ir.node("Cast", [out], attributes={"to": ir.DataType.DOUBLE}, name="to_double")
    model.graph.append(cast)
    cast.outputs[0].name, cast.outputs[0].dtype, cast.outputs[0].shape = "y64", ir.DataType.DOUBLE, out.shape
    model.graph.outputs[0] = cast.outputs[0]
    for strategy in ("fuse", "merge"):
        fuse_adapters(ir.to_proto(model), strategy=strategy)


def test_no_verify_blames_an_unloadable_input_not_the_rewrite(tmp_path, capsys):
    """With ``--no-verify`` nothing loads the input before the target loads the written model: an
    input ONNX Runtime cannot load (an operator typo) said "ONNX Runtime cannot load the model" of
    the compiled output, exit 1 (found by review). It is the input's fault: exit 2, nothing written."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMull", ["x", "W"], ["y"])],
        "typo",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])],
        [numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")],
    )
    path = tmp_path / "typo.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    code = main(["compile", str(path), "-o", str(tmp_path / "out"), "--no-verify"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot load the input model" in err and "MatMull" in err
    assert not (tmp_path / "out").exists()
