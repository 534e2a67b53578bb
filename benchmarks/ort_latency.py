"""ONNX Runtime CPU latency of a LoRA-adapted decoder: base, unfused, merged, fused.

Builds a random-weight Llama-family decoder with Llama-3.2-1B layer shapes (hidden 2048, 32 query
/ 8 key-value heads, head_dim 64, intermediate 8192), ``--layers`` layers and a small vocabulary
(``--vocab``; the real 128,256-token LM head is left out so it does not dominate the latency),
puts a PEFT LoRA adapter (r=R, alpha=2R) on all seven projections of every layer, and exports it
once per rank with ``torch.onnx.export(dynamo=True)`` and a key/value cache. The four variants
all come from that one export, through the tool's own pipeline (``compile_file``, verification
on):

- ``base``:    ``strategy="strip"`` (the exact base model, the adapter removed);
- ``unfused``: the export as is (two extra GEMMs per adapted projection);
- ``merged``:  ``strategy="merge"`` (``W + s*A@B``, zero overhead, adapter not separable);
- ``fused``:   ``strategy="fuse"`` (two GEMMs per group of projections reading one tensor).

Each variant gets one ``InferenceSession`` (ORT_ENABLE_ALL, ``--threads`` intra-op threads).
Phases: ``decode`` (1 new token on a ``--past``-token KV cache) and ``prefill`` (``--prefill``
tokens on an empty cache, or a 1-token cache where the export cannot run an empty one). After
warm-up, the variants run in interleaved rounds (every round runs each variant once, in an order
rotated from round to round), timed with ``time.perf_counter``; medians and ratios therefore
come from one interleaved run on the same machine state.

Outputs: a rich table on stdout and a JSON file (``--out``). ``--quick`` uses tiny shapes so a
test can run the whole pipeline in seconds.

    python benchmarks/ort_latency.py                       # Llama-3.2-1B shapes, 2 layers, r=8,32
    python benchmarks/ort_latency.py --ranks 16 --layers 4 --past 512 --out /tmp/r16.json
    python benchmarks/ort_latency.py --quick --out /tmp/quick.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from zflora_compile.latency import interleaved, load_average, machine_info, summarize

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "ort_latency.json"
VARIANTS = ("base", "unfused", "merged", "fused")
STRATEGY_OF = {"base": "strip", "merged": "merge", "fused": "fuse"}  # unfused: the export as is
PHASES = ("decode", "prefill")
SCHEMA_VERSION = 1

# Llama-3.2-1B layer shapes (the LM head's 128,256-token vocabulary is replaced by --vocab).
FULL_MODEL = dict(
    hidden_size=2048,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    intermediate_size=8192,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=131072,
)
FULL = dict(layers=2, vocab=2048, ranks=[8, 32], prefill=128, past=128, decode_rounds=30, prefill_rounds=10, warmup=3)
QUICK_MODEL = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128)
QUICK = dict(layers=2, vocab=128, ranks=[4], prefill=16, past=8, decode_rounds=5, prefill_rounds=3, warmup=1)
REAL_VOCAB = 128256

# Independent check against PyTorch (fp32, different kernels and summation order).
TORCH_ATOL, TORCH_RTOL = 1e-3, 1e-3


_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ machine


def versions() -> dict:
    import onnx
    import onnx_ir
    import onnxruntime
    import peft
    import torch
    import transformers

    import zflora_compile

    out = {
        "zflora_compile": zflora_compile.__version__,
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "onnx": onnx.__version__,
        "onnx_ir": onnx_ir.__version__,
        "numpy": np.__version__,
    }
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "zflora_compile"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
            out["zflora_compile_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


# ------------------------------------------------------------------------------ settings


PROTOBUF_LIMIT = 2**31 - 64 * 2**20  # bytes, with headroom for the graph itself


def estimate_parameters(model: dict, rank: int) -> int:
    """Parameters of the Llama-shaped PEFT model (base + LoRA on all seven projections)."""
    h, inter = model["hidden_size"], model["intermediate_size"]
    q = model["num_attention_heads"] * model["head_dim"]
    kv = model["num_key_value_heads"] * model["head_dim"]
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]
    per_layer = sum(i * o + rank * (i + o) for i, o in shapes) + 2 * h
    return model["num_hidden_layers"] * per_layer + 2 * model["vocab_size"] * h + h


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="ONNX Runtime CPU latency of a LoRA-adapted Llama-3.2-1B-shaped decoder: base / unfused / merged / fused.",
    )
    full = FULL
    parser.add_argument("--quick", action="store_true", help="tiny shapes (hidden 64, 2 layers, vocab 128, rank 4, prefill 16, past 8, few rounds) for tests")
    parser.add_argument("--layers", type=int, default=None, help=f"decoder layers (default {full['layers']})")
    parser.add_argument("--vocab", type=int, default=None, help=f"vocabulary / LM head rows (default {full['vocab']}; the real {REAL_VOCAB} is left out)")
    parser.add_argument("--ranks", type=int, nargs="+", default=None, help="LoRA ranks, alpha = 2*rank (default: " + " ".join(map(str, full["ranks"])) + f"; quick {QUICK['ranks'][0]})")
    parser.add_argument("--past", type=int, default=None, help=f"KV-cache length for decode (default {full['past']}; quick {QUICK['past']})")
    parser.add_argument("--prefill", type=int, default=None, help=f"prompt tokens for prefill (default {full['prefill']}; quick {QUICK['prefill']})")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES), help="phases to time (default: both)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds for every phase (overrides the two below)")
    parser.add_argument("--decode-rounds", type=int, default=None, help=f"interleaved decode rounds (default {full['decode_rounds']})")
    parser.add_argument("--prefill-rounds", type=int, default=None, help=f"interleaved prefill rounds (default {full['prefill_rounds']})")
    parser.add_argument("--warmup", type=int, default=None, help=f"untimed runs per variant and phase before the rounds (default {full['warmup']})")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="ORT intra_op_num_threads (default: os.cpu_count())")
    parser.add_argument("--seed", type=int, default=0, help="model, adapter and input seed (default 0)")
    parser.add_argument("--workdir", type=Path, default=None, help="where exports and compiled models go (default: a temp dir, deleted at the end); keep it out of the repo")
    parser.add_argument("--keep-workdir", action="store_true", help="do not delete the default temp workdir")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file (default benchmarks/results/ort_latency.json)")
    args = parser.parse_args(argv)
    profile = QUICK if args.quick else FULL
    for key, value in profile.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.rounds is not None:
        args.decode_rounds = args.prefill_rounds = args.rounds
    for name in ("layers", "vocab", "past", "prefill", "decode_rounds", "prefill_rounds", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or any(r < 1 for r in args.ranks):
        parser.error("--warmup must be >= 0 and every rank >= 1")
    if args.vocab < 2:
        parser.error("--vocab must be >= 2")
    args.model = dict(QUICK_MODEL if args.quick else FULL_MODEL)
    args.model.update(num_hidden_layers=args.layers, vocab_size=args.vocab)
    largest = estimate_parameters(args.model, max(args.ranks)) * 4
    if largest > PROTOBUF_LIMIT:
        # zoo.export_onnx re-saves the export with onnx.save as one file (no external data).
        parser.error(
            f"the export would be ~{largest / 1e9:.2f} GB (fp32); zoo.export_onnx writes one file and protobuf "
            "caps it at 2 GB: use fewer --layers or a smaller --vocab"
        )
    if not args.quick:
        args.model["max_position_embeddings"] = max(args.model["max_position_embeddings"], args.past + args.prefill + 16)
    else:
        args.model["max_position_embeddings"] = max(256, args.past + args.prefill + 16)
    return args


# ------------------------------------------------------------------------------ inputs


def make_feeds(session, *, new_tokens: int, past: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    """input_ids [1, new], attention_mask [1, past+new] of ones, past k/v [1, kv, past, hd] ~ N(0, 0.5^2)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for info in session.get_inputs():
        if info.name == "input_ids":
            feeds[info.name] = rng.integers(0, vocab, size=(1, new_tokens)).astype(np.int64)
        elif info.name == "attention_mask":
            feeds[info.name] = np.ones((1, past + new_tokens), dtype=np.int64)
        elif info.name.startswith("past_key_values."):
            _, kv_heads, _, head_dim = info.shape
            feeds[info.name] = (rng.standard_normal((1, kv_heads, past, head_dim)) * 0.5).astype(np.float32)
        else:
            raise RuntimeError(f"unexpected model input {info.name!r}")
    return feeds


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def torch_logits(model, feeds: dict, layers: int, *, adapter: bool) -> np.ndarray:
    """Logits of the PEFT model (adapter on or off) for the same feeds, KV cache included."""
    import torch
    import transformers

    ids = torch.from_numpy(feeds["input_ids"])
    mask = torch.from_numpy(feeds["attention_mask"])
    past = [torch.from_numpy(feeds[n]).clone() for n in past_names(layers)]
    cache = None
    if past and past[0].shape[2] > 0:
        cache = transformers.DynamicCache(list(zip(past[0::2], past[1::2], strict=True)))
    context = contextlib.nullcontext() if adapter else model.disable_adapter()
    with torch.no_grad(), context:
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=cache is not None)
    return out.logits.float().numpy()


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def close(ref: np.ndarray, got: np.ndarray) -> bool:
    return ref.shape == got.shape and bool(np.all(np.abs(got.astype(np.float64) - ref) <= TORCH_ATOL + TORCH_RTOL * np.abs(ref)))


# ------------------------------------------------------------------------------ build


def export_rank(args, rank: int, rank_dir: Path, past_probe: list[int]) -> tuple[Path, dict, dict]:
    """Build the PEFT model, export it, compute the PyTorch reference logits, free the model.

    Returns (export path, export info, {(phase, past_len, adapter): logits}).
    """
    import onnx
    import torch

    from zflora_compile import zoo

    started = time.perf_counter()
    model = zoo.build_lora_model(
        "llama", r=rank, alpha=2 * rank, targets=zoo.ALL_TARGETS["llama"], seed=args.seed, dtype=torch.float32, **args.model
    )
    build_s = time.perf_counter() - started
    params = sum(p.numel() for p in model.parameters())
    adapter_params = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    export_path = rank_dir / "export" / "model.onnx"
    started = time.perf_counter()
    zoo.export_onnx(model, export_path, exporter="dynamo", with_cache=True, past_len=max(2, min(args.past, 8)), seq_len=7)
    export_s = time.perf_counter() - started

    # The export must keep the cache axis symbolic (zoo checks the inputs; check them all here too).
    proto = onnx.load(str(export_path), load_external_data=False)
    axes = {}
    for value in proto.graph.input:
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        axes[value.name] = dims
        if value.name.startswith("past_key_values.") and not isinstance(dims[2], str):
            raise RuntimeError(f"export made the past axis of {value.name} static ({dims}); the benchmark needs it dynamic")
    del proto

    # PyTorch references for the exact feeds the benchmark times (independent of the tool).
    import onnxruntime as ort

    probe = ort.InferenceSession(str(export_path), providers=["CPUExecutionProvider"])
    references = {}
    feeds_by_key = {}
    if "decode" in args.phases:
        feeds_by_key[("decode", args.past)] = make_feeds(probe, new_tokens=1, past=args.past, vocab=args.vocab, seed=args.seed + 1)
    if "prefill" in args.phases:
        for p in past_probe:
            feeds_by_key[("prefill", p)] = make_feeds(probe, new_tokens=args.prefill, past=p, vocab=args.vocab, seed=args.seed + 2)
    del probe
    for (phase, past), feeds in feeds_by_key.items():
        for adapter in (True, False):
            references[(phase, past, adapter)] = torch_logits(model, feeds, args.layers, adapter=adapter)
    del model
    gc.collect()
    info = {
        "path_in_workdir": str(export_path.relative_to(args.workdir)),
        "exporter": "torch.onnx.export(dynamo=True, optimize=True) via zoo.export_onnx(with_cache=True)",
        "file_mb": round(export_path.stat().st_size / 1e6, 1),
        "parameters": params,
        "adapter_parameters": adapter_params,
        "build_s": round(build_s, 2),
        "export_s": round(export_s, 2),
        "input_dims": axes,
        "past_axis_dynamic": True,
    }
    return export_path, info, (references, feeds_by_key)


def compile_variants(export_path: Path, rank_dir: Path) -> dict[str, dict]:
    """compile_file for strip / merge / fuse with verification on; raises if any fails."""
    from zflora_compile.build import compile_file
    from zflora_compile.options import CompileOptions
    from zflora_compile.errors import ZcompileError

    reports = {}
    for variant, strategy in STRATEGY_OF.items():
        started = time.perf_counter()
        try:
            report = compile_file(export_path, rank_dir / variant, CompileOptions(strategy=strategy, verify=True, force=True))
        except ZcompileError as error:
            raise SystemExit(f"compile_file(strategy={strategy!r}) failed: {error}") from None
        if not report.get("verification", {}).get("passed"):
            raise SystemExit(f"compile_file(strategy={strategy!r}) did not verify: {report.get('message')}")
        log(f"  {variant:<8} strategy={strategy:<5} {report['message']}; verify max|diff| {report['verification']['worst']['max_abs_diff']:.3g} ({time.perf_counter() - started:.1f}s)")
        reports[variant] = report
    return reports


def variant_info(reports: dict, export_path: Path) -> dict[str, dict]:
    first = reports["fused"]
    info = {
        "unfused": {
            "strategy": None,
            "source": "the export as is",
            "model": str(export_path),
            "model_in_workdir": str(export_path.relative_to(export_path.parents[2])),
            "gemm_count": first["input"]["gemm_count"],
            "nodes": first["input"]["nodes"],
            "op_counts": first["input"]["op_counts"],
            "file_mb": round(export_path.stat().st_size / 1e6, 1),
            "verification": {"passed": None, "max_abs_diff": None, "note": "the reference the other variants are verified against"},
        }
    }
    for variant, report in reports.items():
        model_path = Path(report["output"]["dir"]) / "model.onnx"
        files = [Path(report["output"]["dir"]) / name for name in report["output"]["files"] if name != "report.json"]
        verification = report["verification"]
        info[variant] = {
            "strategy": STRATEGY_OF[variant],
            "source": f"compile_file(strategy={STRATEGY_OF[variant]!r}, verify=True)",
            "model": str(model_path),
            "model_in_workdir": str(model_path.relative_to(export_path.parents[2])),
            "gemm_count": report["output"]["gemm_count"],
            "nodes": report["output"]["nodes"],
            "op_counts": report["output"]["op_counts"],
            "file_mb": round(sum(f.stat().st_size for f in files) / 1e6, 1),
            "compile_timings_s": report.get("timings_s"),
            "verification": {
                "passed": verification["passed"],
                "max_abs_diff": verification["worst"]["max_abs_diff"],
                "worst": verification["worst"],
                "reference": verification.get("reference"),
                "cases": [c["case"] for c in verification["cases"]],
            },
        }
    return {v: info[v] for v in VARIANTS}


# ------------------------------------------------------------------------------ timing


def make_session(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def time_phase(sessions: dict, feeds: dict, *, rounds: int, warmup: int) -> tuple[dict[str, list[float]], list[list[str]], dict[str, np.ndarray]]:
    """Warm-up, then interleaved rounds; returns raw times (ms), the per-round orders, first outputs."""
    logits = {variant: sessions[variant].run(["logits"], feeds)[0] for variant in VARIANTS}  # also the first warm-up run
    runners = {variant: (lambda s=sessions[variant]: s.run(None, feeds)) for variant in VARIANTS}
    times, orders = interleaved(runners, rounds=rounds, warmup=max(warmup - 1, 0))
    return times, orders, logits


def choose_prefill_past(sessions: dict, references: dict, feeds_by_key: dict) -> tuple[int, str]:
    """0 if the export runs (and matches PyTorch) with an empty cache, else 1."""
    if ("prefill", 0) in feeds_by_key:
        try:
            got = sessions["unfused"].run(["logits"], feeds_by_key[("prefill", 0)])[0]
            if close(references[("prefill", 0, True)], got):
                return 0, "empty KV cache (past length 0): the export runs it and matches PyTorch"
            reason = f"past length 0 runs but differs from PyTorch (max|diff| {max_abs_diff(references[('prefill', 0, True)], got):.3g})"
        except Exception as error:  # noqa: BLE001 - any runtime failure means: fall back
            reason = f"past length 0 fails in ONNX Runtime ({str(error).splitlines()[0][:200]})"
        return 1, f"1-token KV cache (past length 1): {reason}"
    return 1, "1-token KV cache (past length 1)"


def run_rank(args, rank: int, console) -> dict:
    rank_dir = args.workdir / f"r{rank}"
    log(f"rank {rank}: building and exporting (alpha {2 * rank}, LoRA on all 7 projections of {args.layers} layers)")
    export_path, export_info, (references, feeds_by_key) = export_rank(args, rank, rank_dir, past_probe=[0, 1])
    log(f"rank {rank}: exported {export_info['file_mb']} MB in {export_info['export_s']}s; compiling base/merged/fused (verification on)")
    reports = compile_variants(export_path, rank_dir)
    variants = variant_info(reports, export_path)
    groups = [{"group": g["group"], "sites": len(g["sites"]), "labels": g["labels"]} for g in reports["fused"]["groups"]]
    sites = len(reports["fused"]["sites"])
    rejected = len(reports["fused"]["rejected"])

    log(f"rank {rank}: loading {len(VARIANTS)} ORT sessions (ORT_ENABLE_ALL, {args.threads} threads)")
    sessions = {v: make_session(variants[v]["model"], args.threads) for v in VARIANTS}

    phases = {}
    for phase in args.phases:
        if phase == "decode":
            past, new, rounds, note = args.past, 1, args.decode_rounds, f"1 new token on a {args.past}-token KV cache"
        else:
            past, note = choose_prefill_past(sessions, references, feeds_by_key)
            new, rounds = args.prefill, args.prefill_rounds
            note = f"{args.prefill} prompt tokens on an {note}" if past == 0 else f"{args.prefill} prompt tokens on a {note}"
        feeds = feeds_by_key[(phase, past)]
        log(f"rank {rank}: {phase}: {note}; {args.warmup} warm-up + {rounds} interleaved rounds")
        times, orders, logits = time_phase(sessions, feeds, rounds=rounds, warmup=args.warmup)
        stats = summarize(times)
        # Outputs on the timed inputs: the fused/merged variants equal the unfused export, base
        # equals PyTorch with the adapter disabled, and the adapter really changes the logits.
        checks = {}
        for variant in VARIANTS:
            ref = references[(phase, past, variant != "base")]
            checks[variant] = {
                "torch_max_abs_diff": max_abs_diff(ref, logits[variant]),
                "torch_close": close(ref, logits[variant]),
                "torch_reference": "PEFT model, adapter disabled" if variant == "base" else "PEFT model, adapter enabled",
                "max_abs_diff_vs_unfused": max_abs_diff(logits["unfused"], logits[variant]),
            }
            stats[variant]["output_check"] = checks[variant]
        phases[phase] = {
            "description": note,
            "new_tokens": new,
            "past_length": past,
            "input_shapes": {k: list(v.shape) for k, v in feeds.items()},
            "warmup_runs_per_variant": args.warmup,
            "rounds": rounds,
            "round_orders": orders,
            "adapter_effect_max_abs_logit_diff": max_abs_diff(logits["base"], logits["unfused"]),
            "variants": stats,
        }
        line = ", ".join(f"{v} {stats[v]['median_ms']:.2f}" for v in VARIANTS)
        log(f"rank {rank}: {phase} medians (ms): {line}")
    del sessions
    gc.collect()
    return {
        "rank": rank,
        "alpha": 2 * rank,
        "scale": 2.0,
        "adapter_sites": sites,
        "rejected_sites": rejected,
        "groups": groups,
        "export": export_info,
        "variants": variants,
        "phases": phases,
    }


# ------------------------------------------------------------------------------ output


def render(results: dict, console) -> None:
    from rich import box
    from rich.table import Table

    s = results["settings"]
    m = results["machine"]
    model = s["model"]
    title = (
        f"ONNX Runtime {results['versions']['onnxruntime']} CPU, {s['ort']['intra_op_num_threads']} intra-op thread(s) — "
        f"{s['layers']}-layer decoder, hidden {model['hidden_size']}, {model['num_attention_heads']}/{model['num_key_value_heads']} heads, "
        f"head_dim {model['head_dim']}, intermediate {model['intermediate_size']}, vocab {s['vocab']}"
    )
    table = Table(title=title, box=box.SIMPLE_HEAVY, title_justify="left")
    for name, justify in [
        ("rank", "right"), ("phase", "left"), ("variant", "left"), ("GEMMs", "right"), ("nodes", "right"),
        ("median ms", "right"), ("min ms", "right"), ("max ms", "right"), ("x base", "right"),
        ("paired x base", "right"), ("verify max|d|", "right"), ("torch max|d|", "right"),
    ]:
        table.add_column(name, justify=justify)
    for entry in results["results"]:
        for p_index, (phase, ph) in enumerate(entry["phases"].items()):
            for v_index, variant in enumerate(VARIANTS):
                st, vi = ph["variants"][variant], entry["variants"][variant]
                verification = vi["verification"]
                vtext = "reference" if verification["passed"] is None else f"{verification['max_abs_diff']:.1e}"
                ratio = st["ratio_to_base"]
                style = "bold" if variant == "fused" else None
                table.add_row(
                    str(entry["rank"]) if p_index == 0 and v_index == 0 else "",
                    f"{phase} (past {ph['past_length']}, +{ph['new_tokens']})" if v_index == 0 else "",
                    variant,
                    str(vi["gemm_count"]),
                    str(vi["nodes"]),
                    f"{st['median_ms']:.2f}",
                    f"{st['min_ms']:.2f}",
                    f"{st['max_ms']:.2f}",
                    f"{ratio:.3f}",
                    f"{st['paired_ratio_to_base_median']:.3f}",
                    vtext,
                    f"{st['output_check']['torch_max_abs_diff']:.1e}",
                    style=style,
                    end_section=v_index == len(VARIANTS) - 1,
                )
    console.print(table)
    for line in results["notes"]:
        console.print(f"- {line}", highlight=False)
    console.print(
        f"- machine: {m['cpu_model']}, {m['logical_cores']} logical cores, {m['memory_gib']} GiB; "
        f"load average {m['load_average_start']} at start, {m.get('load_average_end')} at end",
        highlight=False,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    from rich.console import Console

    console = Console(width=max(Console().width, 160))
    temp_workdir = args.workdir is None
    if temp_workdir:
        args.workdir = Path(tempfile.mkdtemp(prefix="zflora-ort-latency-"))
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.workdir == REPO or REPO in args.workdir.parents:
        log(f"warning: --workdir {args.workdir} is inside the repository; exports are large, keep them out of it")
    started_wall = dt.datetime.now(dt.timezone.utc)
    started = time.perf_counter()
    machine = machine_info()
    log(f"workdir {args.workdir}; machine {machine['cpu_model']}, {machine['logical_cores']} cores, load {machine['load_average_start']}")
    try:
        results_per_rank = [run_rank(args, rank, console) for rank in args.ranks]
    finally:
        if temp_workdir and not args.keep_workdir:
            shutil.rmtree(args.workdir, ignore_errors=True)
    machine["load_average_end"] = load_average()
    prefill_pasts = sorted({e["phases"]["prefill"]["past_length"] for e in results_per_rank if "prefill" in e["phases"]})
    notes = [
        "Medians, min/max and ratios to base come from ONE interleaved run: every round runs base, unfused, merged and "
        "fused once each in an order rotated per round, on the same machine state; 'paired x base' is the median over "
        "rounds of (variant time / base time in the same round).",
        (
            f"QUICK mode: tiny test shapes (hidden {args.model['hidden_size']}, vocab {args.vocab}), not Llama-3.2-1B; "
            "these timings only show that the pipeline runs."
        )
        if args.quick
        else (
            f"The LM head has {args.vocab} rows: the real Llama-3.2-1B head ({REAL_VOCAB} tokens x {args.model['hidden_size']}, "
            f"~{REAL_VOCAB * args.model['hidden_size'] * 4 / 1e9:.2f} GB fp32) is left out so it does not dominate the latency; "
            f"the {args.layers} layers have Llama-3.2-1B shapes, random weights, fp32."
        ),
        "All four variants come from one export per rank: base = compile_file(strategy='strip') (exact base model), "
        "unfused = the export as is, merged = strategy 'merge', fused = strategy 'fuse'; the tool's verification was on "
        "and passed for each ('verify max|d|': worst abs diff vs the export, for base vs the export with B = 0).",
        "'torch max|d|': logits on the timed inputs vs the PyTorch PEFT model (adapter disabled for base), "
        "an independent check (fp32, different kernels).",
    ]
    if prefill_pasts:
        if prefill_pasts == [0]:
            notes.append("Prefill runs on an empty KV cache (past length 0); the export accepts it and matches PyTorch.")
        else:
            notes.append(f"Prefill runs on a {prefill_pasts}-token KV cache: see phases.prefill.description for why past length 0 was not used.")
    results = {
        "benchmark": "ort_latency",
        "schema_version": SCHEMA_VERSION,
        "created_utc": started_wall.isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv] if argv is None else ["ort_latency.py", *argv],
        "wall_time_s": round(time.perf_counter() - started, 1),
        "notes": notes,
        "machine": machine,
        "versions": versions(),
        "settings": {
            "quick": args.quick,
            "arch": "llama",
            "shapes_of": "tiny test config" if args.quick else "Llama-3.2-1B (layer shapes only)",
            "layers": args.layers,
            "vocab": args.vocab,
            "real_vocab_left_out": None if args.quick else REAL_VOCAB,
            "model": args.model,
            "dtype": "float32",
            "ranks": args.ranks,
            "alpha": "2 * rank",
            "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            "phases": args.phases,
            "decode": {"new_tokens": 1, "past_length": args.past, "rounds": args.decode_rounds},
            "prefill": {"new_tokens": args.prefill, "past_length": prefill_pasts, "rounds": args.prefill_rounds},
            "warmup_runs_per_variant": args.warmup,
            "variants": list(VARIANTS),
            "interleaving": "each round runs every variant once; round i starts at variant i mod 4 of " + ", ".join(VARIANTS),
            "timer": "time.perf_counter around InferenceSession.run(None, feeds); Python GC disabled during rounds",
            "ort": {
                "provider": "CPUExecutionProvider",
                "graph_optimization_level": "ORT_ENABLE_ALL",
                "intra_op_num_threads": args.threads,
                "inter_op_num_threads": 1,
                "execution_mode": "ORT_SEQUENTIAL",
            },
            "seed": args.seed,
            "workdir": str(args.workdir) + (" (temporary, deleted)" if temp_workdir and not args.keep_workdir else ""),
        },
        "ranks": args.ranks,
        "results": results_per_rank,
    }
    for entry in results_per_rank:
        for info in entry["variants"].values():
            info.pop("model", None)  # absolute path into the workdir; model_in_workdir stays
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    render(results, console)
    console.print(f"- wall time {results['wall_time_s']} s; results written to {args.out}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
