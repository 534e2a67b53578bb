"""Every bad argument is exit 2 with one line naming it, found before the model is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zflora_compile import build, model_io
from zflora_compile.cli import main
from zflora_compile.errors import InputError
from zflora_compile.gate import LatencyOptions
from zflora_compile.options import CompileOptions

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_llama_lora.onnx"

BAD = [
    (["--seed", "-1"], "--seed"),
    (["--rounds", "0"], "--rounds"),
    (["--prefill-rounds", "0"], "--prefill-rounds"),
    (["--warmup", "-1"], "--warmup"),
    (["--past", "-5"], "--past"),
    (["--prefill", "0"], "--prefill"),
    (["--max-overhead", "nan"], "--max-overhead"),
    (["--gate-budget-s", "-1"], "--gate-budget-s"),
    (["--gate-budget-s", "inf"], "--gate-budget-s"),
    (["--atol", "-1"], "--atol"),
    (["--rtol", "inf"], "--rtol"),
    (["--atol", "nan"], "--atol"),
    (["--max-rank-ratio", "-1"], "--max-rank-ratio"),
    (["--max-rank-ratio", "0"], "--max-rank-ratio"),
    (["--max-rank-ratio", "1.5"], "--max-rank-ratio"),
    (["--ort-provider", "tpu"], "tpu"),
    (["--threads", "0"], "--threads"),
    (["--precision", "fp16"], "--precision"),
    (["--target", "qnn", "--soc-model", "snapdragon"], "--soc-model"),
    (["--target", "qnn", "--htp-arch", "v73"], "--htp-arch"),
    (["--target", "trt", "--workspace-gib", "-1"], "--workspace-gib"),
    (["--target", "trt", "--workspace-gib", "nan"], "--workspace-gib"),
]


@pytest.fixture
def unreadable_model(monkeypatch):
    """The model must not be read: loading it fails the test."""

    def forbidden(*args, **kwargs):
        pytest.fail("the model was read before the arguments were checked")

    monkeypatch.setattr(build, "load_model", forbidden)
    monkeypatch.setattr(model_io, "load_model", forbidden)


@pytest.mark.parametrize(("argv", "named"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_argument_is_exit_2_before_the_model_is_read(capsys, tmp_path, unreadable_model, argv, named):
    report = tmp_path / "report.json"
    code = main([str(EXAMPLE), "-o", str(tmp_path / "out"), "--report", str(report), *argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    if code == 2 and lines and "not available" in lines[0] and "--target" in " ".join(argv):
        pytest.skip(f"the target's runtime is missing here: {lines[0]}")
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("zcompile: error: ") and named in lines[0], err
    assert not (tmp_path / "out").exists()
    assert json.loads(report.read_text())["exit_code"] == 2


def test_bad_max_rank_ratio_for_inspect(capsys, unreadable_model):
    code = main(["inspect", str(EXAMPLE), "--max-rank-ratio", "-1"])
    assert code == 2 and "--max-rank-ratio" in capsys.readouterr().err


@pytest.mark.parametrize(
    "make",
    [
        lambda: CompileOptions(seed=-1),
        lambda: CompileOptions(atol=float("nan")),
        lambda: CompileOptions(max_rank_ratio=-1),
        lambda: LatencyOptions(decode_rounds=0),
        lambda: LatencyOptions(past=-5),
        lambda: LatencyOptions(phases=()),
        lambda: LatencyOptions(budget_s=float("nan")),
    ],
)
def test_options_validate_themselves(make):
    with pytest.raises(InputError):
        make()


def test_output_under_a_regular_file_before_the_model_is_read(capsys, tmp_path, unreadable_model):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = main([str(EXAMPLE), "-o", str(blocker / "sub" / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "ENOTDIR" in err and str(blocker) in err, err
