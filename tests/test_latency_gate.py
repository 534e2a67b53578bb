"""The latency gate on the ORT target: pass, deterministic regression, inconclusive, report
schema, PNG, pipeline files.

No test depends on timing noise: the passing cases allow 100000% (a thousandfold slowdown,
beyond what a loaded shared CI machine produces on a sub-millisecond model), the failing cases
use a negative threshold (every per-round ratio fused/base > 0, so the whole interval lies above
it); the 50% case accepts pass (exit 0) or inconclusive (exit 4) and asserts the report either
way; the adaptive rounds and the inconclusive verdict run on synthetic device times.
"""

from __future__ import annotations

import json
import statistics
from importlib import resources
from pathlib import Path

import jsonschema
import pytest

from zflora_compile.cli import main
from zflora_compile.gate import gate_failure_message, gate_inconclusive_message, measure_pair
from zflora_compile.latency import DeviceTime

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_llama_lora.onnx"
SCHEMA = json.loads(resources.files("zflora_compile").joinpath("report_schema.json").read_text())
FAST = ["--prefill", "16", "--past", "16", "--rounds", "6", "--prefill-rounds", "4", "--warmup", "1", "--gate-budget-s", "5"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_gate_passes_with_a_generous_threshold(capsys, tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, EXAMPLE, "-o", out_dir, "--check-latency", "--max-overhead", "100000", "--json", *FAST)
    assert code == 0, err
    report = json.loads(out)
    jsonschema.validate(report, SCHEMA)
    latency = report["latency"]
    assert latency["passed"] is True and latency["max_overhead_pct"] == 100000 and latency["target"] == "ort"
    assert latency["emulated"] is False
    assert set(latency["phases"]) == {"decode", "prefill"}
    decode, prefill = latency["phases"]["decode"], latency["phases"]["prefill"]
    assert (decode["seq"], decode["past"], decode["rounds"]) == (1, 16, 6)
    assert (prefill["seq"], prefill["past"], prefill["rounds"]) == (16, 0, 4)
    for phase in (decode, prefill):
        assert set(phase["variants"]) == {"base", "unfused", "fused"}
        assert all(v["runs"] == phase["rounds"] and v["min_ms"] <= v["median_ms"] <= v["max_ms"] for v in phase["variants"].values())
        assert phase["variants"]["base"]["ratio_to_base"] == 1.0
        fused, base = phase["variants"]["fused"]["timings_ms"], phase["variants"]["base"]["timings_ms"]
        assert phase["ratios"] == pytest.approx([f / b for f, b in zip(fused, base)], rel=1e-3)
        assert phase["ratio_median"] == pytest.approx(statistics.median(phase["ratios"]), rel=1e-5)
        low, high = phase["ratio_interval"]
        assert low <= phase["ratio_median"] <= high <= 1001
        assert phase["overhead_pct"] == pytest.approx((phase["ratio_median"] - 1) * 100)
        assert phase["verdict"] == "pass" and phase["extra_rounds"] == 0 and phase["rounds_requested"] == phase["rounds"]
        assert "load_average_before" in phase and "load_average_after" in phase and "calibration" not in phase
    assert latency["verdict"] == "pass" and latency["threshold_ratio"] == pytest.approx(1001) and latency["budget_s"] == 5
    assert latency["worst_overhead_pct"] == max(decode["overhead_pct"], prefill["overhead_pct"])
    assert sorted(p.name for p in out_dir.iterdir()) == ["latency.png", "model.onnx", "model.optimized.onnx", "report.json"]
    assert (out_dir / "latency.png").read_bytes()[:8] == PNG_MAGIC
    assert "latency gate passed" in report["message"]


def test_gate_fails_with_exit_1_and_a_complete_report(capsys, tmp_path):
    out_dir, report_path = tmp_path / "out", tmp_path / "ci" / "zcompile.json"
    code, out, err = run(capsys, EXAMPLE, "-o", out_dir, "--check-latency", "--max-overhead", "-100", "--report", report_path, *FAST, "--phases", "decode")
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("zcompile: error: latency gate failed on target ort: fused vs base overhead decode")
    report = json.loads(report_path.read_text())
    jsonschema.validate(report, SCHEMA)
    assert report["status"] == "latency_gate_failed" and report["exit_code"] == 1
    assert report == json.loads((out_dir / "report.json").read_text())
    assert set(report["latency"]["phases"]) == {"decode"} and report["latency"]["passed"] is False
    assert report["latency"]["verdict"] == "regression" and report["latency"]["phases"]["decode"]["verdict"] == "regression"
    assert report["latency"]["phases"]["decode"]["ratio_interval"][0] > 0  # the whole interval above a ratio of 0
    assert (out_dir / "latency.png").read_bytes()[:8] == PNG_MAGIC
    assert "gate" in out and "FAILED" in out  # the table is printed even on failure


def test_report_file_is_written_on_bad_input_too(capsys, tmp_path):
    missing, report_path = tmp_path / "missing.onnx", tmp_path / "r.json"
    code, _, err = run(capsys, missing, "-o", tmp_path / "out", "--report", report_path)
    assert code == 2 and str(missing) in err
    report = json.loads(report_path.read_text())
    jsonschema.validate(report, SCHEMA)
    assert report["status"] == "error" and report["exit_code"] == 2
    assert not (tmp_path / "out").exists()


def test_gate_on_a_model_without_adapters_compares_equal_graphs(capsys, tmp_path):
    base_dir = tmp_path / "base"
    assert run(capsys, EXAMPLE, "-o", base_dir, "--strategy", "strip", "--quiet")[0] == 0
    code, out, err = run(capsys, base_dir / "model.onnx", "-o", tmp_path / "gated", "--check-latency", "--max-overhead", "100000", "--json", *FAST)
    assert code == 0, err
    report = json.loads(out)
    assert report["sites"] == [] and report["latency"]["passed"] is True
    assert report["output"]["op_counts"] == report["input"]["op_counts"]


def test_artifact_mismatch_fails_verification_and_writes_nothing(capsys, tmp_path, monkeypatch):
    from zflora_compile.targets import ort as ort_target

    original_load = ort_target.OrtTarget.load

    def corrupted_load(self, out_dir, model_path, shape, **kwargs):
        loaded = original_load(self, out_dir, model_path, shape, **kwargs)
        run_model = loaded.run
        loaded.run = lambda feeds: [output + 1.0 for output in run_model(feeds)]
        return loaded

    monkeypatch.setattr(ort_target.OrtTarget, "load", corrupted_load)
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, EXAMPLE, "-o", out_dir, "--json")
    assert code == 1
    assert "the ort artifact does not match model.onnx: output 'logits'" in err
    assert json.loads(out)["status"] == "verification_failed"
    assert not out_dir.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


@pytest.mark.parametrize(("max_overhead", "expected"), [("100000", 0), ("-100", 1)])
def test_pipeline_example_stops_on_a_regression(tmp_path, max_overhead, expected):
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "examples" / "pipeline.sh"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", str(script), str(EXAMPLE), "ort", max_overhead], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == expected, done.stderr
    report = json.loads((tmp_path / "build" / "reports" / "tiny_llama_lora_ort.json").read_text())
    jsonschema.validate(report, SCHEMA)
    assert report["exit_code"] == expected
    assert ("deploy: build/tiny_llama_lora_ort" in done.stdout) == (expected == 0)
    assert ("blocked:" in done.stderr) == (expected == 1)


def test_gate_at_50_percent_passes_or_says_it_is_inconclusive(capsys, tmp_path):
    """The shipped example at --max-overhead 50: pass (exit 0) or, on a noisy machine,
    inconclusive (exit 4) with the interval in the message; never a regression verdict silently."""
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, EXAMPLE, "-o", out_dir, "--check-latency", "--max-overhead", "50", "--json", "--gate-calibrate", *FAST)
    report = json.loads(out)
    jsonschema.validate(report, SCHEMA)
    latency = report["latency"]
    assert code in (0, 4), err
    assert latency["threshold_ratio"] == pytest.approx(1.5) and latency["calibrated"] is True
    for phase in latency["phases"].values():
        low, high = phase["ratio_interval"]
        assert low <= phase["ratio_median"] <= high
        assert phase["verdict"] in ("pass", "inconclusive")
        assert phase["rounds"] == phase["rounds_requested"] + phase["extra_rounds"] == len(phase["ratios"])
        assert phase["calibration"]["verdict"] in ("pass", "inconclusive", "regression")
        assert len(phase["calibration"]["ratios"]) == phase["calibration"]["rounds"]
    if code == 0:
        assert report["status"] == "ok" and latency["verdict"] == "pass" and "latency gate passed" in report["message"]
    else:
        assert report["status"] == "latency_gate_inconclusive" and report["exit_code"] == 4 and latency["verdict"] == "inconclusive"
        assert "latency gate inconclusive" in err and "more rounds" in err
    assert (out_dir / "latency.png").read_bytes()[:8] == PNG_MAGIC


def _device_runner(values):
    sequence = iter(values)
    return lambda: DeviceTime(next(sequence))


def test_adaptive_rounds_stop_at_the_budget_when_inconclusive():
    """Ratios alternating 1.00 / 1.04 around a 1.02 threshold never decide: further batches run
    until the budget is spent, and the verdict stays inconclusive."""
    import itertools

    runners = {"base": (lambda: DeviceTime(1.0)), "fused": _device_runner(itertools.cycle([1.0, 1.04]))}
    # 2 s: a batch's cost includes a gc.collect(), which takes a second in a test process with a
    # large heap on a loaded machine; a budget below one batch's cost rightly runs none
    measured = measure_pair(runners, ("base", "fused"), rounds=6, warmup=0, threshold=1.02, budget_s=2.0)
    assert measured["verdict"] == "inconclusive" and measured["stopped_by_budget"] is True
    assert measured["extra_rounds"] > 0 and measured["interval"]["rounds"] == 6 + measured["extra_rounds"]
    assert measured["interval"]["low"] <= 1.02 < measured["interval"]["high"]
    none = measure_pair({"base": (lambda: DeviceTime(1.0)), "fused": _device_runner(itertools.cycle([1.0, 1.04]))}, ("base", "fused"), rounds=6, warmup=0, threshold=1.02, budget_s=0)
    assert none["verdict"] == "inconclusive" and none["extra_rounds"] == 0


def test_adaptive_rounds_continue_until_conclusive():
    """The first batch straddles the threshold; the rounds after it are clearly faster: more rounds decide."""
    import itertools

    fused = itertools.chain([1.0, 1.04] * 3, itertools.repeat(0.9))
    measured = measure_pair({"base": (lambda: DeviceTime(1.0)), "fused": _device_runner(fused)}, ("base", "fused"), rounds=6, warmup=0, threshold=1.02, budget_s=60)
    assert measured["verdict"] == "pass" and measured["extra_rounds"] > 0 and measured["stopped_by_budget"] is False


def test_regression_and_inconclusive_messages_on_synthetic_phases():
    def phase(verdict, low, median, high):
        return {"verdict": verdict, "overhead_pct": median, "overhead_interval_pct": [low, high], "rounds": 30}

    latency = {"target": "ort", "max_overhead_pct": 2.0, "budget_s": 60.0, "phases": {"decode": phase("regression", 8.0, 10.0, 12.0), "prefill": phase("inconclusive", 0.5, 1.5, 3.0)}}
    assert gate_failure_message(latency) == "latency gate failed on target ort: fused vs base overhead decode +10.0% (95% interval +8.0% .. +12.0%, 30 rounds) exceeds --max-overhead 2% (the whole interval lies above it)"
    message = gate_inconclusive_message(latency)
    assert message.startswith("latency gate inconclusive on target ort: fused vs base overhead prefill +1.5% (95% interval +0.5% .. +3.0%, 30 rounds) straddles --max-overhead 2%")
    assert "more rounds" in message and "--gate-budget-s" in message


def test_inconclusive_gate_exits_4_and_writes_the_output(capsys, tmp_path, monkeypatch):
    """Forced inconclusive (the verdict function says so, no budget for more rounds): exit 4,
    status latency_gate_inconclusive, the complete output directory and report kept."""
    from zflora_compile import gate

    monkeypatch.setattr(gate, "verdict", lambda interval, threshold: "inconclusive")
    out_dir, report_path = tmp_path / "out", tmp_path / "r.json"
    code, out, err = run(capsys, EXAMPLE, "-o", out_dir, "--check-latency", "--report", report_path, *FAST, "--gate-budget-s", "0", "--phases", "decode")
    assert code == 4, err
    assert err.strip().splitlines()[-1].startswith("zcompile: error: latency gate inconclusive on target ort: fused vs base overhead decode")
    report = json.loads(report_path.read_text())
    jsonschema.validate(report, SCHEMA)
    assert report["status"] == "latency_gate_inconclusive" and report["exit_code"] == 4
    assert report == json.loads((out_dir / "report.json").read_text())
    decode = report["latency"]["phases"]["decode"]
    assert report["latency"]["verdict"] == "inconclusive" and decode["verdict"] == "inconclusive"
    assert decode["extra_rounds"] == 0 and decode["stopped_by_budget"] is True and decode["rounds"] == 6
    assert (out_dir / "latency.png").read_bytes()[:8] == PNG_MAGIC and (out_dir / "model.onnx").exists()
    assert "INCONCLUSIVE" in out


def _loads_favouring_the_first_loaded(calls):
    """A/A on synthetic device times: the session loaded first runs 4% faster than the one loaded
    second, whatever it is (the load-order bias of two sessions of one model). ``load(block)``
    reverses the order on odd blocks, as the gate's loader does."""

    def load(block):
        calls.append(block)
        order = ["base", "base_again"] if block % 2 == 0 else ["base_again", "base"]
        times = {order[0]: 1.0, order[1]: 1.04}
        return {name: (lambda t=times[name]: DeviceTime(t)) for name in ("base", "base_again")}

    return load


def test_loads_hold_five_rounds_each_in_an_even_number():
    from zflora_compile.latency import load_count

    assert [load_count(r, 4) for r in (4, 9, 10, 19, 20, 30, 200)] == [1, 1, 2, 2, 4, 4, 4]
    assert load_count(30, 1) == 1 and load_count(30, 3) == 2


def test_one_load_turns_the_load_order_bias_into_a_false_regression():
    calls = []
    measured = measure_pair(_loads_favouring_the_first_loaded(calls), ("base", "base_again"), rounds=10, warmup=1, threshold=1.02, budget_s=0, sessions=1)
    assert calls == [0] and measured["verdict"] == "regression"
    assert measured["interval"]["median"] == pytest.approx(1.04)


def test_reversed_loads_cancel_the_load_order_bias():
    """Two loads, the order reversed: 5 rounds at 1.04 and 5 at 1/1.04, a stratified bootstrap:
    the interval is the one value between them (1.0008), inside a 2% threshold: pass, not the
    false regression one load gives."""
    calls = []
    measured = measure_pair(_loads_favouring_the_first_loaded(calls), ("base", "base_again"), rounds=10, warmup=1, threshold=1.02, budget_s=0, sessions=2)
    assert calls == [0, 1] and measured["blocks"] == [0] * 5 + [1] * 5
    assert [item["rounds"] for item in measured["loads"]] == [5, 5]
    assert [item["ratio_median"] for item in measured["loads"]] == pytest.approx([1.04, 1 / 1.04])
    assert measured["verdict"] == "pass"
    assert measured["interval"]["low"] == pytest.approx(measured["interval"]["high"]) == pytest.approx((1.04 + 1 / 1.04) / 2)


def test_further_rounds_load_fresh_sessions():
    """An inconclusive first batch runs more rounds, each batch in two new loads (one in each
    load order), warmed up again."""
    import itertools

    calls, warm = [], []
    fused = itertools.chain([1.0, 1.04] * 3, itertools.repeat(0.9))

    def load(block):
        calls.append(block)
        return {"base": (lambda: (warm.append(block), DeviceTime(1.0))[1]), "fused": _device_runner_shared(fused)}

    measured = measure_pair(load, ("base", "fused"), rounds=6, warmup=2, threshold=1.02, budget_s=60, sessions=1)
    assert measured["verdict"] == "pass" and calls[:2] == [0, 1] and measured["extra_rounds"] > 0
    assert measured["blocks"][:6] == [0] * 6 and set(measured["blocks"][6:]) == set(calls[1:])
    assert warm.count(1) == 2 + measured["loads"][1]["rounds"]  # two warm-up runs in the second load too
    assert len(calls) % 2 == 1 and [item["rounds"] for item in measured["loads"][1:3]] == [3, 3]  # further loads come in pairs


def _device_runner_shared(sequence):
    return lambda: DeviceTime(next(sequence))


def test_gate_cpus_are_validated_and_pinning_is_restored():
    import os

    from zflora_compile.errors import InputError
    from zflora_compile.gate import parse_cpus, pinned

    allowed = sorted(os.sched_getaffinity(0))
    assert parse_cpus(f"{allowed[0]}") == (allowed[0],)
    if allowed == list(range(allowed[0], allowed[-1] + 1)):
        assert parse_cpus(f"{allowed[0]}-{allowed[-1]}") == tuple(allowed)
    for text, message in (("x", "CPU numbers"), ("3-1", "not a CPU range"), ("4096", "not one this process may run on")):
        with pytest.raises(InputError, match=message):
            parse_cpus(text)
    with pinned((allowed[0],)) as pinning:
        assert os.sched_getaffinity(0) == {allowed[0]} and pinning == {"pinned": True, "cpus": [allowed[0]], "previous": allowed}
    assert sorted(os.sched_getaffinity(0)) == allowed


def test_gate_cpus_outside_the_machine_exit_2(capsys, tmp_path):
    code, out, err = run(capsys, EXAMPLE, "-o", tmp_path / "out", "--check-latency", "--gate-cpus", "4096", *FAST)
    assert code == 2 and "--gate-cpus: CPU 4096" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_pinned_gate_reports_its_loads_and_bound_timer(capsys, tmp_path):
    import os

    cpu = sorted(os.sched_getaffinity(0))[0]
    from zflora_compile.latency import load_count

    code, out, err = run(capsys, EXAMPLE, "-o", tmp_path / "out", "--check-latency", "--max-overhead", "100000", "--json", "--gate-cpus", str(cpu), "--gate-sessions", "3", *FAST, "--rounds", "10")
    assert code == 0, err
    latency = json.loads(out)["latency"]
    assert latency["pinning"]["pinned"] is True and latency["pinning"]["cpus"] == [cpu] and latency["sessions"] == 3
    decode, prefill = latency["phases"]["decode"], latency["phases"]["prefill"]
    assert [len(decode["loads"]), len(prefill["loads"])] == [load_count(10, 3), load_count(4, 3)] == [2, 1]  # >= 5 rounds a load, an even number
    for phase in (decode, prefill):
        assert [item["load"] for item in phase["loads"]] == list(range(len(phase["loads"])))
        assert sum(item["rounds"] for item in phase["loads"]) == phase["rounds"]
        assert "bound run" in phase["timer"]


def test_bound_run_computes_what_run_computes(tmp_path):
    """ORT I/O binding: the bound call writes into the buffers bound once; its outputs equal run()'s."""
    import numpy as np
    import onnxruntime as ort

    from zflora_compile.targets.ort import bound_run
    from zflora_compile.verify import input_specs, make_feeds

    session = ort.InferenceSession(str(EXAMPLE), providers=["CPUExecutionProvider"])
    for seq, past in ((1, 16), (16, 0)):
        feeds = make_feeds(input_specs(EXAMPLE), None, seq=seq, past=past, seed=1)
        call = bound_run(session, feeds)
        _, buffers, _ = call()
        expected = session.run(None, feeds)
        assert len(buffers) == len(expected)
        for buffer, value in zip(buffers, expected):
            assert np.array_equal(buffer.numpy(), value)
