"""ONNX Runtime CPU latency of every adapter family, unfused and fused, against the base model.

One run, one machine state: a random-weight decoder with Llama-3.2-1B layer shapes (``--layers``
layers, a ``--vocab``-row LM head) and a KV cache, exported three times with the dynamo exporter:

- LoRA (PEFT, rank ``--lora-rank``, alpha 2r) on all seven projections of every layer;
- FFBA (``zflora_compile.adapters``, both blocks of every layer);
- zFLoRA (``zflora_compile.adapters``, both blocks of every layer, zero embedding lanes);
- DoRA (PEFT ``LoraConfig(use_dora=True)``, all seven projections, ``zoo.build_peft_variant``);
- BD-LoRA (PEFT ``use_bdlora``, 2 blocks: block-diagonal B on q/k/v/gate/up, A on o/down);
- GAWS and GAWS-D (``zflora_compile.adapters.gaws``, all seven projections, no diag vector);

and one more export per family above (each family is its own export; all share the base weights).
**Equal parameter budget**: every family's size is chosen so that its adapter parameter count
comes as close to LoRA's (rank ``--lora-rank``) as the family allows: the integer rank for
FFBA / zFLoRA / DoRA (DoRA adds the magnitude vectors), the even rank for BD-LoRA (2 blocks),
and for GAWS / GAWS-D one group count (block size) per projection shape (q/o, k/v, gate/up,
down), searched over the divisors 2..64 of gcd(in, out) (parameters in*out/g^2 per module: the counts jump by factors of
4, so only some sums are reachable). The sizes and counts are printed and saved.
Variants, all through the tool's own pipeline with verification on:

    base             compile_file(LoRA export, strategy="strip")   the exact base model
    lora_unfused     the LoRA export as is
    lora_merged      strategy "merge"
    lora_fused       strategy "fuse"
    ffba_unfused / ffba_fused       the FFBA export / strategy "fuse"
    zflora_unfused / zflora_fused   the zFLoRA export / strategy "fuse"
    <f>_unfused / <f>_merged / <f>_fused  for f in dora, bdlora, gaws, gaws_d: the export /
                     strategy "merge" / strategy "fuse" (whatever fuse does with the family:
                     the GEMM column shows it)

Every variant's GEMMs (MatMul / Gemm / FusedMatMul / Einsum nodes of its ONNX file, attention
included) are counted and shown. A variant that fails to compile or verify is recorded with the
tool's error and left out of the timing (the script still exits 0 and says so).

Phases: decode (1 token on a ``--past``-token cache) and prefill (``--prefill`` tokens on an
empty cache, or a 1-token cache when an export cannot run an empty one). After warm-up, every
round runs each variant once in an order rotated per round; medians and ratios to base come from
that one interleaved run. Prints a table, saves JSON (``--out``). ``--quick``: tiny shapes, for
the test that keeps this script working. ``--families``: a subset of the families after LoRA
(LoRA, and the base it strips to, always run).

    python benchmarks/family_latency.py                 # 2 layers, LoRA r=16 budget, every family
    python benchmarks/family_latency.py --quick --out /tmp/families.json
    python benchmarks/family_latency.py --quick --families dora gaws --out /tmp/families.json
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
# family -> the strategies compiled from its export (besides the export itself, "<family>_unfused")
STRATEGIES = {
    "lora": ("merge", "fuse"),
    "ffba": ("fuse",),
    "zflora": ("fuse",),
    "dora": ("merge", "fuse"),
    "bdlora": ("merge", "fuse"),
    "gaws": ("merge", "fuse"),
    "gaws_d": ("merge", "fuse"),
}
FAMILIES = tuple(STRATEGIES)
OTHER_FAMILIES = FAMILIES[1:]
SUFFIX = {"merge": "merged", "fuse": "fused"}
GEMM_OPS = ("MatMul", "Gemm", "FusedMatMul", "Einsum")
GAWS_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GAWS_FACTORS = (2, 64)  # searched group counts / block sizes (divisors of gcd(in, out) in this range)
BDLORA_BLOCKS = 2  # zoo.build_peft_variant("bdlora"): nblocks=2, so the rank must be even
FULL = dict(layers=2, vocab=2048, lora_rank=16, prefill=128, past=128, decode_rounds=60, prefill_rounds=12, warmup=3)
QUICK = dict(layers=2, vocab=128, lora_rank=4, prefill=16, past=8, decode_rounds=5, prefill_rounds=3, warmup=1)
SCHEMA_VERSION = 2


def variants_of(families) -> tuple[str, ...]:
    out = ["base"]
    for family in families:
        out += [f"{family}_unfused", *(f"{family}_{SUFFIX[s]}" for s in STRATEGIES[family])]
    return tuple(out)


VARIANTS = variants_of(FAMILIES)


def family_of(variant: str) -> str:
    return "lora" if variant == "base" else variant.rsplit("_", 1)[0]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes for tests (hidden 64, vocab 128, LoRA rank 4)")
    parser.add_argument("--families", nargs="*", choices=OTHER_FAMILIES, default=list(OTHER_FAMILIES), help="families besides LoRA (default: all)")
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
    args.families = ["lora", *(f for f in OTHER_FAMILIES if f in args.families)]
    args.variants = variants_of(args.families)
    args.model = dict(QUICK_MODEL if args.quick else FULL_MODEL)
    args.model.update(num_hidden_layers=args.layers, vocab_size=args.vocab)
    args.model["max_position_embeddings"] = max(256, args.past + args.prefill + 16)
    return args


def adapter_parameters(model) -> int:
    """Parameters of the adapter only: PEFT ``lora_*`` (DoRA's magnitude and BD-LoRA's blocks
    included), this package's adapter matrices, GAWS's ``gaws_*``."""
    from zflora_compile.adapters.attach import is_adapter_parameter

    return sum(
        p.numel() for name, p in model.named_parameters() if ".lora_" in name or is_adapter_parameter(name) or name.rsplit(".", 1)[-1].startswith("gaws_")
    )


def size_label(family: str, size) -> str:
    """Rank, or the GAWS group count / GAWS-D block size per projection (q k v o gate up down)."""
    if isinstance(size, dict):
        return " ".join(str(size[t]) for t in GAWS_TARGETS)
    return str(size)


def build_family(args, family: str, size):
    import torch

    from zflora_compile import zoo
    from zflora_compile.adapters import AdapterConfig, attach_adapters, randomize_adapters
    from zflora_compile.adapters.gaws import build_gaws_model

    if family == "lora":
        return zoo.build_lora_model("llama", r=size, alpha=2 * size, targets=zoo.ALL_TARGETS["llama"], seed=args.seed, dtype=torch.float32, **args.model)
    if family in ("dora", "bdlora"):  # alpha 2r, all seven projections, seeded random adapter weights
        return zoo.build_peft_variant(family, "llama", r=size, seed=args.seed, dtype=torch.float32, **args.model)
    if family in ("gaws", "gaws_d"):
        factors = {"groups": size} if family == "gaws" else {"block": size}
        return build_gaws_model(family, "llama", seed=args.seed, diag=False, targets=GAWS_TARGETS, dtype=torch.float32, **factors, **args.model)
    base = zoo.build_base_model("llama", seed=args.seed, dtype=torch.float32, **args.model)
    model = attach_adapters(base, AdapterConfig(family=family, rank=size, alpha=2 * size))
    return randomize_adapters(model, seed=args.seed + 1).eval()


def count_at(args, family: str, size) -> int:
    model = build_family(args, family, size)
    count = adapter_parameters(model)
    del model
    gc.collect()
    return count


def equal_budget_rank(args, family: str, budget: int, step: int = 1) -> tuple[int, int]:
    """The rank (a multiple of ``step``) whose adapter parameter count is closest to ``budget``."""
    return closest_rank(lambda rank: count_at(args, family, rank), budget, step)


def closest_rank(count, budget: int, step: int = 1) -> tuple[int, int]:
    """``(rank, count)``: the multiple of ``step`` whose ``count(rank)`` is closest to ``budget``.

    Counts are affine in the rank (DoRA's magnitude vectors are the constant part): measured at
    ``step`` and ``2 * step``."""
    low, high = count(step), count(2 * step)
    slope = (high - low) / step
    offset = low - slope * step
    ideal = max(step, (budget - offset) / slope)
    candidates = {max(step, step * int(ideal // step)), max(step, step * (int(ideal // step) + 1))}
    rank = min(sorted(candidates), key=lambda r: abs(offset + slope * r - budget))
    return rank, int(round(offset + slope * rank))


def projection_shapes(args) -> dict[str, tuple[int, int]]:
    """(in, out) of every adapted projection of one decoder layer."""
    from zflora_compile import zoo

    return shapes_of(zoo.tiny_config("llama", **args.model))


def shapes_of(config) -> dict[str, tuple[int, int]]:
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}


def gaws_factors(shapes: dict[str, tuple[int, int]], layers: int, budget: int) -> tuple[dict, int, dict]:
    """GAWS groups / GAWS-D blocks per projection name (``shapes``: (in, out) per projection of one
    layer) whose count, ``layers`` times the sum of in*out/g^2, is closest to ``budget``;
    projections of one shape (q/o, k/v, gate/up) share a factor; ties: the most uniform choice.
    Returns (factors, count, the closest single factor for every projection and its count)."""
    import itertools
    import math

    lo, hi = GAWS_FACTORS
    kinds = sorted(set(shapes.values()), key=lambda shape: [shapes[t] for t in GAWS_TARGETS].index(shape))
    options = []
    for fan_in, fan_out in kinds:
        members = sum(1 for t in GAWS_TARGETS if shapes[t] == (fan_in, fan_out))
        common = math.gcd(fan_in, fan_out)
        options.append([(g, members * fan_in * fan_out // (g * g)) for g in range(lo, hi + 1) if common % g == 0])
    per_layer = budget / layers
    best = None
    for choice in itertools.product(*options):
        total = sum(c for _, c in choice)
        factors = [g for g, _ in choice]
        key = (abs(total - per_layer), max(factors) / min(factors), sum(factors))
        if best is None or key < best[0]:
            best = (key, dict(zip(kinds, factors)), total)
    _, by_shape, total = best
    factors = {t: by_shape[shapes[t]] for t in GAWS_TARGETS}
    uniform = {}
    for g in range(lo, hi + 1):
        if all(math.gcd(*shapes[t]) % g == 0 for t in GAWS_TARGETS):
            uniform[g] = layers * sum(shapes[t][0] * shapes[t][1] // (g * g) for t in GAWS_TARGETS)
    g_best = min(uniform, key=lambda g: abs(uniform[g] - budget))
    return factors, layers * total, {"groups": g_best, "adapter_parameters": uniform[g_best]}


def equal_budget_factors(args, budget: int) -> tuple[dict, int, dict]:
    return gaws_factors(projection_shapes(args), args.layers, budget)


def gemm_nodes(path: Path) -> int:
    """MatMul / Gemm / FusedMatMul / Einsum nodes of an ONNX file (subgraphs and functions too)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def walk(nodes) -> int:
        count = 0
        for node in nodes:
            count += node.op_type in GEMM_OPS
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    count += walk(attr.g.node)
                for graph in attr.graphs:
                    count += walk(graph.node)
        return count

    return walk(model.graph.node) + sum(walk(function.node) for function in model.functions)


def export(args, family: str, size) -> tuple[Path, int]:
    from zflora_compile import zoo

    model = build_family(args, family, size)
    params = adapter_parameters(model)
    path = args.workdir / family / "export" / "model.onnx"
    started = time.perf_counter()
    zoo.export_onnx(model, path, exporter="dynamo", with_cache=True, past_len=max(2, min(args.past, 8)), seq_len=7)
    log(f"{family}: size {size_label(family, size)}, {params:,} adapter parameters, exported in {time.perf_counter() - started:.1f}s")
    del model
    gc.collect()
    return path, params


def compile_variant(source: Path, out: Path, strategy: str) -> dict:
    """The tool's report; ``{"error": ...}`` when it raises or does not verify."""
    from zflora_compile.build import compile_file
    from zflora_compile.options import CompileOptions

    started = time.perf_counter()
    try:
        report = compile_file(source, out, CompileOptions(strategy=strategy, verify=True, force=True))
    except Exception as error:  # noqa: BLE001 - recorded and reported, the other variants still run
        log(f"  {out.name}: FAILED: {type(error).__name__}: {error}")
        return {"error": f"{type(error).__name__}: {error}"}
    if not report.get("verification", {}).get("passed"):
        log(f"  {out.name}: NOT VERIFIED: {report.get('message')}")
        return {"error": f"verification did not pass: {report.get('message')}", "report": report}
    log(f"  {out.name}: {report['message']}; verify max|diff| {report['verification']['worst']['max_abs_diff']:.3g} ({time.perf_counter() - started:.1f}s)")
    return report


def counts(report: dict, side: str) -> dict:
    part = report[side]
    return {"tool_gemm_count": part["gemm_count"], "nodes": part["nodes"], "op_counts": part["op_counts"]}


def onnx_counts(path: Path) -> dict:
    import collections

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {"nodes": len(model.graph.node), "op_counts": dict(sorted(collections.Counter(n.op_type for n in model.graph.node).items()))}


def choose_sizes(args, budget: int) -> dict:
    """{family: {"size": rank or {projection: factor}, "predicted": count, ...}} at LoRA's budget."""
    sizes = {}
    for family in args.families[1:]:
        if family in ("gaws", "gaws_d"):
            factors, predicted, uniform = equal_budget_factors(args, budget)
            sizes[family] = {"size": factors, "predicted": predicted, "closest_single_factor": uniform}
        else:
            rank, predicted = equal_budget_rank(args, family, budget, step=BDLORA_BLOCKS if family == "bdlora" else 1)
            sizes[family] = {"size": rank, "predicted": predicted}
        log(f"{family}: size {size_label(family, sizes[family]['size'])} -> {sizes[family]['predicted']:,} adapter parameters (LoRA: {budget:,})")
    return sizes


def prepare(args) -> tuple[dict, dict, list]:
    """Exports and compiled variants: {variant: model path}, {variant: info}, [failures]."""
    lora_path, lora_params = export(args, "lora", args.lora_rank)
    sizes = {"lora": {"size": args.lora_rank, "predicted": lora_params}, **choose_sizes(args, lora_params)}
    sources, reports = {"lora": (lora_path, lora_params)}, {"base": compile_variant(lora_path, args.workdir / "base", "strip")}
    for family in args.families:
        if family != "lora":
            sources[family] = export(args, family, sizes[family]["size"])
        path = sources[family][0]
        for strategy in STRATEGIES[family]:
            variant = f"{family}_{SUFFIX[strategy]}"
            reports[variant] = compile_variant(path, args.workdir / variant, strategy)
    paths, info, failures = {}, {}, []
    for family in args.families:
        path, params = sources[family]
        paths[f"{family}_unfused"] = path
        info[f"{family}_unfused"] = {"model": "the export as is", **onnx_counts(path)}
    for variant, report in reports.items():
        if "error" in report:
            info[variant] = {"error": report["error"], "verified": False}
            failures.append(variant)
            continue
        paths[variant] = Path(report["output"]["dir"]) / "model.onnx"
        info[variant] = {
            **counts(report, "output"),
            "strategy": report.get("strategy") or ("strip" if variant == "base" else variant.rsplit("_", 1)[1]),
            "message": report.get("message"),
            "verified": True,
            "verify_max_abs_diff": report["verification"]["worst"]["max_abs_diff"],
        }
    for variant in args.variants:
        family = family_of(variant)
        entry = info[variant]
        entry.update(family=family, size=None if variant == "base" else sizes[family]["size"], adapter_parameters=0 if variant == "base" else sources[family][1])
        if family in ("gaws", "gaws_d") and variant != "base":
            entry["closest_single_factor"] = sizes[family]["closest_single_factor"]
        if variant in paths:
            entry["gemm_count"] = gemm_nodes(paths[variant])
    return paths, info, failures


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

    console = Console(width=max(Console().width, 170))
    s = results["settings"]
    table = Table(
        title=f"ONNX Runtime {results['versions']['onnxruntime']} CPU, {s['threads']} thread(s); {s['layers']} layers of Llama-3.2-1B shapes"
        if not s["quick"]
        else "QUICK (tiny shapes; timings only show the pipeline runs)",
        box=box.SIMPLE_HEAVY,
        title_justify="left",
    )
    for column in ("variant", "rank / g,b (q k v o gate up down)", "adapter params", "GEMMs", "nodes", "decode ms", "x base", "prefill ms", "x base", "verify max|d|"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    decode, prefill = results["phases"]["decode"]["variants"], results["phases"]["prefill"]["variants"]
    for variant in s["variants"]:
        v = results["variants"][variant]
        if "error" in v:
            table.add_row(variant, size_label(v["family"], v["size"]), f"{v['adapter_parameters']:,}", "", "", "FAILED", "", "", "", "see below", style="red")
            continue
        table.add_row(
            variant,
            "" if v["size"] is None else size_label(v["family"], v["size"]),
            f"{v['adapter_parameters']:,}",
            str(v["gemm_count"]),
            str(v["nodes"]),
            f"{decode[variant]['median_ms']:.2f}",
            f"{decode[variant]['ratio_to_base']:.3f}",
            f"{prefill[variant]['median_ms']:.2f}",
            f"{prefill[variant]['ratio_to_base']:.3f}",
            "" if variant.endswith("_unfused") else f"{v['verify_max_abs_diff']:.1e}",
            style="bold" if variant.endswith("_fused") else None,
        )
    console.print(table)
    for variant in s["variants"]:
        if "error" in results["variants"][variant]:
            console.print(f"- {variant} FAILED: {results['variants'][variant]['error']}", highlight=False, markup=False)
    for note in results["notes"]:
        console.print(f"- {note}", highlight=False, markup=False)
    for phase, data in results["phases"].items():
        effect = ", ".join(f"{f} {v:.3g}" for f, v in data["adapter_effect_max_abs_logit_diff"].items())
        console.print(f"- {phase}: max |logit(unfused) - logit(base)| (the adapter's effect): {effect}", highlight=False)


def peak_rss_gib() -> float | None:
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)
    except Exception:  # noqa: BLE001 - not on every platform
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    temp = args.workdir is None
    args.workdir = Path(tempfile.mkdtemp(prefix="zflora-families-")) if temp else args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    started_wall, started = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    machine = machine_info()
    try:
        paths, info, failures = prepare(args)
        timed = [v for v in args.variants if v in paths]
        if "base" not in timed:
            raise SystemExit(f"the base model (strip) failed: {info['base']['error']}")
        sessions = {v: make_session(str(paths[v]), args.threads) for v in timed}
        decode_feeds = make_feeds(sessions["base"], new_tokens=1, past=args.past, vocab=args.vocab, seed=args.seed + 1)
        phases = {}
        for phase, feeds, past, rounds in (
            ("decode", decode_feeds, args.past, args.decode_rounds),
            ("prefill", *prefill_feeds(args, sessions), args.prefill_rounds),
        ):
            log(f"{phase}: past {past}, {rounds} interleaved rounds of {len(timed)} variants")
            stats, logits = run_phase(sessions, feeds, rounds, args.warmup)
            for variant in timed:  # a compiled variant equals its unfused export on the timed inputs too
                reference = logits["lora_unfused" if variant == "base" else f"{family_of(variant)}_unfused"]
                stats[variant]["max_abs_diff_vs_unfused"] = None if variant == "base" else max_abs_diff(reference, logits[variant])
            effect = {f: max_abs_diff(logits["base"], logits[f"{f}_unfused"]) for f in args.families}
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
    machine["peak_rss_gib"] = peak_rss_gib()
    budget = info["lora_unfused"]["adapter_parameters"]
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
            "families": args.families,
            "variants": list(args.variants),
            "layers": args.layers,
            "vocab": args.vocab,
            "model": args.model,
            "dtype": "float32",
            "threads": args.threads,
            "lora_targets": "all 7 projections",
            "ffba_zflora_targets": "attention and MLP blocks of every layer",
            "dora_bdlora_targets": "all 7 projections (zoo.build_peft_variant; BD-LoRA 2 blocks: B block-diagonal on q/k/v/gate/up, A on o/down)",
            "gaws_targets": "all 7 projections, diag=False, scale 1 (zflora_compile.adapters.gaws.build_gaws_model)",
            "alpha": "2 * rank (LoRA, FFBA, zFLoRA, DoRA, BD-LoRA)",
            "gemm_ops": list(GEMM_OPS),
            "decode": {"new_tokens": 1, "past_length": args.past},
            "prefill": {"new_tokens": args.prefill},
            "warmup_runs_per_variant": args.warmup,
        },
        "equal_parameter_budget": {
            family: {
                "size": info[f"{family}_unfused"]["size"],
                "adapter_parameters": info[f"{family}_unfused"]["adapter_parameters"],
                "ratio_to_lora": round(info[f"{family}_unfused"]["adapter_parameters"] / budget, 4),
                **({"closest_single_factor": info[f"{family}_unfused"]["closest_single_factor"]} if family in ("gaws", "gaws_d") else {}),
            }
            for family in args.families
        },
        "failures": {variant: info[variant]["error"] for variant in failures},
        "variants": info,
        "phases": phases,
        "notes": [
            "Equal parameter budget: FFBA / zFLoRA / DoRA ranks are the integers, BD-LoRA's the even integer, whose adapter parameter "
            "counts come closest to LoRA's; GAWS / GAWS-D take one group count (block size) per projection shape (q/o, k/v, gate/up, down), the combination "
            f"of divisors {GAWS_FACTORS[0]}..{GAWS_FACTORS[1]} of gcd(in, out) whose count comes closest (size column: q k v o gate up down).",
            "GEMMs: MatMul / Gemm / FusedMatMul / Einsum nodes of each variant's ONNX file, attention included.",
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
