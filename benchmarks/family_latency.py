"""ONNX Runtime CPU latency of every adapter family, unfused and fused, against the base model.

One run, one machine state: a random-weight decoder with Llama-3.2-1B layer shapes (``--layers``
layers, a ``--vocab``-row LM head) and a KV cache, exported three times with the dynamo exporter:

- LoRA (PEFT, rank ``--lora-rank``, alpha 2r) on all seven projections of every layer;
- FFBA (``zflora_compile.adapters``, both blocks of every layer);
- zFLoRA (``zflora_compile.adapters``, both blocks of every layer, zero embedding lanes);

FFBA's and zFLoRA's ranks are chosen so that their adapter parameter counts match LoRA's as
closely as an integer rank allows (**equal parameter budget**; the counts are printed and saved).
Variants, all through the tool's own pipeline with verification on:

    base             compile_file(LoRA export, strategy="strip")   the exact base model
    lora_unfused     the LoRA export as is
    lora_merged      strategy "merge"
    lora_fused       strategy "fuse"
    ffba_unfused / ffba_fused       the FFBA export / strategy "fuse"
    zflora_unfused / zflora_fused   the zFLoRA export / strategy "fuse"

Phases: decode (1 token on a ``--past``-token cache) and prefill (``--prefill`` tokens on an
empty cache, or a 1-token cache when an export cannot run an empty one). After warm-up, every
round runs each variant once in an order rotated per round; medians and ratios to base come from
that one interleaved run. Prints a table, saves JSON (``--out``). ``--quick``: tiny shapes, for
the test that keeps this script working.

    python benchmarks/family_latency.py                 # 2 layers, LoRA r=16 budget
    python benchmarks/family_latency.py --quick --out /tmp/families.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ort_latency import FULL_MODEL, QUICK_MODEL, REAL_VOCAB, log, make_feeds, make_session, max_abs_diff, versions  # noqa: E402

from zflora_compile.latency import interleaved, load_average, machine_info, summarize  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "family_latency.json"
VARIANTS = ("base", "lora_unfused", "lora_merged", "lora_fused", "ffba_unfused", "ffba_fused", "zflora_unfused", "zflora_fused")
FULL = dict(layers=2, vocab=2048, lora_rank=16, prefill=128, past=128, decode_rounds=60, prefill_rounds=12, warmup=3)
QUICK = dict(layers=2, vocab=128, lora_rank=4, prefill=16, past=8, decode_rounds=5, prefill_rounds=3, warmup=1)
SCHEMA_VERSION = 1


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes for tests (hidden 64, vocab 128, LoRA rank 4)")
    parser.add_argument("--layers", type=int, default=None, help=f"decoder layers (default {FULL['layers']})")
    parser.add_argument("--vocab", type=int, default=None, help=f"LM head rows (default {FULL['vocab']}; the real {REAL_VOCAB} is left out)")
    parser.add_argument("--lora-rank", type=int, default=None, help=f"LoRA rank; sets the parameter budget (default {FULL['lora_rank']})")
    parser.add_argument("--past", type=int, default=None, help=f"KV-cache length for decode (default {FULL['past']})")
    parser.add_argument("--prefill", type=int, default=None, help=f"prompt tokens for prefill (default {FULL['prefill']})")
    parser.add_argument("--decode-rounds", type=int, default=None, help=f"interleaved decode rounds (default {FULL['decode_rounds']})")
    parser.add_argument("--prefill-rounds", type=int, default=None, help=f"interleaved prefill rounds (default {FULL['prefill_rounds']})")
    parser.add_argument("--warmup", type=int, default=None, help=f"untimed runs per variant and phase (default {FULL['warmup']})")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="ORT intra_op_num_threads (default: os.cpu_count())")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="exports and compiled models (default: a temp dir, deleted at the end)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results (default benchmarks/results/family_latency.json)")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("layers", "vocab", "lora_rank", "past", "prefill", "decode_rounds", "prefill_rounds", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    args.model = dict(QUICK_MODEL if args.quick else FULL_MODEL)
    args.model.update(num_hidden_layers=args.layers, vocab_size=args.vocab)
    args.model["max_position_embeddings"] = max(256, args.past + args.prefill + 16)
    return args


def adapter_parameters(model) -> int:
    """Parameters of the adapter only (PEFT ``lora_A``/``lora_B``, or this package's adapter matrices)."""
    from zflora_compile.adapters.attach import is_adapter_parameter

    return sum(p.numel() for name, p in model.named_parameters() if ".lora_" in name or is_adapter_parameter(name))


def build_family(args, family: str, rank: int):
    import torch

    from zflora_compile import zoo
    from zflora_compile.adapters import AdapterConfig, attach_adapters, randomize_adapters

    if family == "lora":
        return zoo.build_lora_model("llama", r=rank, alpha=2 * rank, targets=zoo.ALL_TARGETS["llama"], seed=args.seed, dtype=torch.float32, **args.model)
    base = zoo.build_base_model("llama", seed=args.seed, dtype=torch.float32, **args.model)
    model = attach_adapters(base, AdapterConfig(family=family, rank=rank, alpha=2 * rank))
    return randomize_adapters(model, seed=args.seed + 1).eval()


def equal_budget_rank(args, family: str, budget: int) -> tuple[int, int]:
    """The rank whose adapter parameter count is closest to ``budget`` (counts are linear in r)."""
    model = build_family(args, family, 1)
    per_rank = adapter_parameters(model)
    del model
    rank = max(1, round(budget / per_rank))
    return rank, rank * per_rank


def export(args, family: str, rank: int) -> tuple[Path, int]:
    from zflora_compile import zoo

    model = build_family(args, family, rank)
    params = adapter_parameters(model)
    path = args.workdir / family / "export" / "model.onnx"
    started = time.perf_counter()
    zoo.export_onnx(model, path, exporter="dynamo", with_cache=True, past_len=max(2, min(args.past, 8)), seq_len=7)
    log(f"{family}: rank {rank}, {params:,} adapter parameters, exported in {time.perf_counter() - started:.1f}s")
    del model
    gc.collect()
    return path, params


def compile_variant(source: Path, out: Path, strategy: str) -> dict:
    from zflora_compile.build import compile_file
    from zflora_compile.options import CompileOptions

    report = compile_file(source, out, CompileOptions(strategy=strategy, verify=True, force=True))
    assert report["verification"]["passed"], report["message"]
    log(f"  {out.name}: {report['message']}; verify max|diff| {report['verification']['worst']['max_abs_diff']:.3g}")
    return report


def counts(report: dict, side: str) -> dict:
    part = report[side]
    return {"gemm_count": part["gemm_count"], "nodes": part["nodes"], "op_counts": part["op_counts"]}


def prepare(args) -> tuple[dict, dict]:
    """Exports and compiled variants: {variant: model path}, {variant: info}."""
    lora_path, lora_params = export(args, "lora", args.lora_rank)
    ranks = {"lora": (args.lora_rank, lora_params)}
    for family in ("ffba", "zflora"):
        ranks[family] = equal_budget_rank(args, family, lora_params)
    paths, info = {"lora_unfused": lora_path}, {}
    reports = {
        "base": compile_variant(lora_path, args.workdir / "base", "strip"),
        "lora_merged": compile_variant(lora_path, args.workdir / "lora_merged", "merge"),
        "lora_fused": compile_variant(lora_path, args.workdir / "lora_fused", "fuse"),
    }
    info["lora_unfused"] = counts(reports["lora_fused"], "input")
    for family in ("ffba", "zflora"):
        path, params = export(args, family, ranks[family][0])
        ranks[family] = (ranks[family][0], params)
        paths[f"{family}_unfused"] = path
        reports[f"{family}_fused"] = compile_variant(path, args.workdir / f"{family}_fused", "fuse")
        info[f"{family}_unfused"] = counts(reports[f"{family}_fused"], "input")
    for variant, report in reports.items():
        paths[variant] = Path(report["output"]["dir"]) / "model.onnx"
        info[variant] = {**counts(report, "output"), "verify_max_abs_diff": report["verification"]["worst"]["max_abs_diff"]}
    for variant in VARIANTS:
        family = "lora" if variant == "base" else variant.split("_")[0]
        info[variant].update(family=family, rank=None if variant == "base" else ranks[family][0], adapter_parameters=0 if variant == "base" else ranks[family][1])
    return paths, info


def run_phase(sessions: dict, feeds: dict, rounds: int, warmup: int) -> tuple[dict, dict]:
    logits = {v: s.run(["logits"], feeds)[0] for v, s in sessions.items()}
    runners = {v: (lambda s=s: s.run(None, feeds)) for v, s in sessions.items()}
    times, _ = interleaved(runners, rounds=rounds, warmup=max(warmup - 1, 0))
    return summarize(times), logits


def prefill_feeds(args, sessions: dict) -> tuple[dict, int]:
    """Empty cache if every variant runs it, else a 1-token cache."""
    any_session = next(iter(sessions.values()))
    for past in (0, 1):
        feeds = make_feeds(any_session, new_tokens=args.prefill, past=past, vocab=args.vocab, seed=args.seed + 2)
        try:
            for session in sessions.values():
                session.run(["logits"], feeds)
            return feeds, past
        except Exception:  # noqa: BLE001 - an export that cannot take an empty cache
            continue
    raise SystemExit("prefill fails with past length 0 and 1")


def render(results: dict) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 150))
    s = results["settings"]
    table = Table(
        title=f"ONNX Runtime {results['versions']['onnxruntime']} CPU, {s['threads']} thread(s); {s['layers']} layers of Llama-3.2-1B shapes"
        if not s["quick"]
        else "QUICK (tiny shapes; timings only show the pipeline runs)",
        box=box.SIMPLE_HEAVY,
        title_justify="left",
    )
    for column in ("variant", "rank", "adapter params", "GEMMs", "nodes", "decode ms", "x base", "prefill ms", "x base", "verify max|d|"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    decode, prefill = results["phases"]["decode"]["variants"], results["phases"]["prefill"]["variants"]
    for variant in VARIANTS:
        v = results["variants"][variant]
        table.add_row(
            variant,
            "" if v["rank"] is None else str(v["rank"]),
            f"{v['adapter_parameters']:,}",
            str(v["gemm_count"]),
            str(v["nodes"]),
            f"{decode[variant]['median_ms']:.2f}",
            f"{decode[variant]['ratio_to_base']:.3f}",
            f"{prefill[variant]['median_ms']:.2f}",
            f"{prefill[variant]['ratio_to_base']:.3f}",
            "reference" if "verify_max_abs_diff" not in v else f"{v['verify_max_abs_diff']:.1e}",
            style="bold" if variant.endswith("fused") and not variant.endswith("unfused") else None,
        )
    console.print(table)
    for note in results["notes"]:
        console.print(f"- {note}", highlight=False)
    for phase, data in results["phases"].items():
        effect = ", ".join(f"{f} {v:.3g}" for f, v in data["adapter_effect_max_abs_logit_diff"].items())
        console.print(f"- {phase}: max |logit(unfused) - logit(base)| (the adapter's effect): {effect}", highlight=False)


def main(argv=None) -> int:
    args = parse_args(argv)
    temp = args.workdir is None
    args.workdir = Path(tempfile.mkdtemp(prefix="zflora-families-")) if temp else args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    started_wall, started = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    machine = machine_info()
    try:
        paths, info = prepare(args)
        sessions = {v: make_session(str(paths[v]), args.threads) for v in VARIANTS}
        decode_feeds = make_feeds(sessions["base"], new_tokens=1, past=args.past, vocab=args.vocab, seed=args.seed + 1)
        phases = {}
        for phase, feeds, past, rounds in (
            ("decode", decode_feeds, args.past, args.decode_rounds),
            ("prefill", *prefill_feeds(args, sessions), args.prefill_rounds),
        ):
            log(f"{phase}: past {past}, {rounds} interleaved rounds of {len(VARIANTS)} variants")
            stats, logits = run_phase(sessions, feeds, rounds, args.warmup)
            for variant in VARIANTS:  # fused equals its unfused export on the timed inputs too
                family = variant.split("_")[0]
                reference = logits["lora_unfused" if variant == "base" else f"{family}_unfused"]
                stats[variant]["max_abs_diff_vs_unfused"] = None if variant == "base" else max_abs_diff(reference, logits[variant])
            effect = {f: max_abs_diff(logits["base"], logits[f"{f}_unfused"]) for f in ("lora", "ffba", "zflora")}
            phases[phase] = {
                "past_length": past,
                "new_tokens": int(feeds["input_ids"].shape[1]),
                "rounds": rounds,
                "adapter_effect_max_abs_logit_diff": effect,  # unfused vs base: the adapters are live
                "variants": stats,
            }
        del sessions
    finally:
        if temp:
            shutil.rmtree(args.workdir, ignore_errors=True)
    machine["load_average_end"] = load_average()
    results = {
        "benchmark": "family_latency",
        "schema_version": SCHEMA_VERSION,
        "created_utc": started_wall.isoformat(timespec="seconds"),
        "command": ["family_latency.py", *(argv if argv is not None else sys.argv[1:])],
        "wall_time_s": round(time.perf_counter() - started, 1),
        "machine": machine,
        "versions": versions(),
        "settings": {
            "quick": args.quick,
            "layers": args.layers,
            "vocab": args.vocab,
            "model": args.model,
            "dtype": "float32",
            "threads": args.threads,
            "lora_targets": "all 7 projections",
            "ffba_zflora_targets": "attention and MLP blocks of every layer",
            "alpha": "2 * rank",
            "decode": {"new_tokens": 1, "past_length": args.past},
            "prefill": {"new_tokens": args.prefill},
            "warmup_runs_per_variant": args.warmup,
        },
        "variants": info,
        "phases": phases,
        "notes": [
            "Equal parameter budget: FFBA and zFLoRA ranks are the integers whose adapter parameter counts come closest to LoRA's.",
            "Medians and ratios to base come from one interleaved run (each round runs every variant once, order rotated).",
            f"Machine: {machine['cpu_model']}, {machine['logical_cores']} logical cores; load average {machine['load_average_start']} at start, "
            f"{machine['load_average_end']} at end.",
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)) + "\n")
    render(results)
    log(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
