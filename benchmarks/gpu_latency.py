"""PyTorch latency of adapted decoders on one GPU: base, LoRA unfused / fused (FX) / merged, and
FFBA / zFLoRA / DoRA / BD-LoRA / GAWS / GAWS-D unfused, (merged,) fused at LoRA's parameter budget.

Builds a random-weight Llama decoder with Llama-3.2-1B shapes (hidden 2048, 32 query / 8
key-value heads, head_dim 64, intermediate 8192, vocabulary 128,256; ``--layers`` layers, 16 by
default = the whole model), in fp16 or bf16, puts a PEFT LoRA adapter (r=``--rank``,
alpha=2r) on all seven projections of every layer, and exports it with ``torch.export`` twice
(static shapes, batch 1):

- ``decode``:  1 new token on a ``--past``-token KV cache (``DynamicCache``; the program returns
  logits and the updated cache);
- ``prefill``: ``--prefill`` tokens (128 by default), no cache (``use_cache=False``).

The four variants all come from the same export, through ``zflora_compile.fuse_adapters`` on the
ExportedProgram (verification in PyTorch eager on), and all run as ``program.module()``:

- ``base``:    ``strategy="strip"`` (the exact base model);
- ``unfused``: the export as is (two extra GEMMs per adapted projection);
- ``fused``:   ``strategy="fuse"`` (two GEMMs per group of projections reading one tensor);
- ``merged``:  ``strategy="merge"`` (``W + s*A@B``: zero overhead, adapter not separable).

``--families`` (default ``ffba zflora dora bdlora gaws gaws_d``) adds, for each family,
``<family>_unfused`` (its own ``torch.export``), ``<family>_fused`` (``fuse_adapters``, strategy
"fuse": whatever it does with the family, the GEMM column shows) and, for DoRA, BD-LoRA, GAWS and
GAWS-D, ``<family>_merged`` (strategy "merge"), at an equal parameter budget: the rank (FFA, FBA,
FFBA, zFLoRA, DoRA; BD-LoRA: the even rank, 2 blocks) or the GAWS group count / GAWS-D block size
per projection shape (``family_latency.gaws_factors``) whose adapter parameter count comes
closest to LoRA's (the sizes and counts are saved). DoRA and BD-LoRA are PEFT's
(``zoo.build_peft_variant``), GAWS / GAWS-D this package's (``adapters.gaws.build_gaws_model``,
no diag vector); all share the base weights (seed 0).

Modes: ``eager`` (the GraphModule called from Python) and, on CUDA, ``cuda_graphs`` (each call
captured once with ``torch.cuda.graphs`` on static inputs and replayed). A call is timed with
``time.perf_counter`` around the call and a ``torch.cuda.synchronize()``. After warm-up, the
variants run in interleaved rounds (``zflora_compile.latency.interleaved``: every round runs each
variant once, the order rotating from round to round); medians and ratios to ``base`` come from
``zflora_compile.latency.summarize``.

Outputs: a table on stdout and a JSON file (``--out``) naming the device (the GPU's name).
``--quick`` runs a tiny model (hidden 64, 2 layers, fp32, short cache) so that a test can run the
whole script on CPU in seconds; CUDA graphs are skipped without CUDA.

    python benchmarks/gpu_latency.py                                   # 16 layers, fp16, r=16, past 1024
    python benchmarks/gpu_latency.py --layers 4 --dtype bf16 --past 512 --out /tmp/gpu.json
    python benchmarks/gpu_latency.py --quick --device cpu --out /tmp/quick.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("base", "unfused", "fused", "merged")
STRATEGY_OF = {"base": "strip", "fused": "fuse", "merged": "merge"}  # unfused: the export as is
PHASES = ("decode", "prefill")
MODES = ("eager", "cuda_graphs")
SCHEMA_VERSION = 1
# family -> strategies compiled from its export, besides the export itself ("<family>_unfused")
FAMILY_STRATEGIES = {
    "ffa": ("fuse",),
    "fba": ("fuse",),
    "ffba": ("fuse",),
    "zflora": ("fuse",),
    "dora": ("merge", "fuse"),
    "bdlora": ("merge", "fuse"),
    "gaws": ("merge", "fuse"),
    "gaws_d": ("merge", "fuse"),
}
DEFAULT_FAMILIES = ("ffba", "zflora", "dora", "bdlora", "gaws", "gaws_d")
SUFFIX = {"merge": "merged", "fuse": "fused"}


def family_variants(family: str) -> list[tuple[str, str | None]]:
    """[(variant, strategy or None for the export as is)] of one family."""
    return [(f"{family}_unfused", None), *((f"{family}_{SUFFIX[s]}", s) for s in FAMILY_STRATEGIES[family])]


LLAMA_32_1B = dict(
    hidden_size=2048,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    intermediate_size=8192,
    vocab_size=128256,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
)
FULL = dict(layers=16, dtype="fp16", rank=16, past=1024, prefill=128, decode_rounds=50, prefill_rounds=20, warmup=5)
QUICK_MODEL = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=128)
QUICK = dict(layers=2, dtype="fp32", rank=4, past=16, prefill=16, decode_rounds=5, prefill_rounds=3, warmup=1)
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}

_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few rounds (CPU-friendly; for tests)")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    parser.add_argument("--layers", type=int, help=f"decoder layers (default {FULL['layers']}: all of Llama-3.2-1B)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help=f"weights and activations (default {FULL['dtype']}; --quick: fp32)")
    parser.add_argument("--rank", type=int, help=f"LoRA rank, alpha = 2 * rank (default {FULL['rank']})")
    parser.add_argument("--vocab", type=int, help="vocabulary size (default 128256, the real one)")
    parser.add_argument("--past", type=int, help=f"KV-cache length for decode (default {FULL['past']})")
    parser.add_argument("--prefill", type=int, help=f"prompt tokens for prefill (default {FULL['prefill']})")
    parser.add_argument("--decode-rounds", type=int, help=f"interleaved rounds, decode (default {FULL['decode_rounds']})")
    parser.add_argument("--prefill-rounds", type=int, help=f"interleaved rounds, prefill (default {FULL['prefill_rounds']})")
    parser.add_argument("--warmup", type=int, help=f"warm-up calls per variant (default {FULL['warmup']})")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--families", nargs="*", choices=tuple(FAMILY_STRATEGIES), default=list(DEFAULT_FAMILIES), help=f"other adapter families to measure (default: {' '.join(DEFAULT_FAMILIES)})")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="eager mode only")
    parser.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/gpu_latency_<gpu>.json)")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.variants = VARIANTS + tuple(variant for family in args.families for variant, _ in family_variants(family))
    return args


def device_info(torch, device) -> dict:
    info = {"type": device.type, "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device), cuda=torch.version.cuda, memory_gib=round(props.total_memory / 1024**3, 2), capability=f"{props.major}.{props.minor}")
    else:
        from zflora_compile.latency import machine_info

        machine = machine_info()
        info.update(name=machine.get("cpu_model") or platform.processor() or "cpu", cores=machine.get("usable_cores"))
    return info


def build_programs(args, torch, device) -> tuple[dict, dict]:
    """{phase: {variant: ExportedProgram}} and {phase: {variant: fuse report}}."""
    from zflora_compile import zoo
    from zflora_compile.errors import VerificationError
    from zflora_compile.fx import fuse_fx_with_report, linear_op_count

    shapes = dict(QUICK_MODEL if args.quick else LLAMA_32_1B)
    if args.vocab:
        shapes["vocab_size"] = args.vocab
    dtype = getattr(torch, DTYPES[args.dtype])
    log(f"building a {args.layers}-layer model ({shapes['hidden_size']} hidden, vocab {shapes['vocab_size']}), LoRA r={args.rank}")
    model = zoo.build_lora_model(
        "llama", r=args.rank, alpha=2 * args.rank, num_hidden_layers=args.layers, max_position_embeddings=max(4096, args.past + args.prefill + 8), **shapes
    )
    model = model.to(device=device, dtype=dtype).eval()
    exports = {
        "decode": dict(seq_len=1, with_cache=True, past_len=args.past, dynamic=False),
        "prefill": dict(seq_len=args.prefill, with_cache=False, dynamic=False),
    }
    budget = adapter_parameters(model)
    programs, reports = {phase: {} for phase in args.phases}, {phase: {} for phase in args.phases}
    args.family_ranks = {"lora": {"rank": args.rank, "adapter_parameters": budget}}

    def fuse_into(phase, unfused, variant, strategy):
        log(f"fuse_adapters({phase}, {variant}, strategy={strategy})")
        try:
            result, report = fuse_fx_with_report(unfused, strategy)
        except VerificationError as error:  # recorded, and measured anyway: the JSON says so
            report = error.report
            result, _ = fuse_fx_with_report(unfused, strategy, verify=False)
            report["verification_error"] = str(error)
        programs[phase][variant] = result
        reports[phase][variant] = {
            "strategy": strategy,
            "sites": len(report["sites"]),
            "gemm_count": report["output"]["gemm_count"],
            "verification_passed": report["verification"].get("passed"),
            "verification_worst": report["verification"].get("worst"),
            **({"verification_error": report["verification_error"]} if "verification_error" in report else {}),
        }

    for phase in args.phases:
        log(f"torch.export ({phase})")
        unfused = zoo.export_program(model, **exports[phase])
        programs[phase]["unfused"] = unfused
        reports[phase]["unfused"] = {"gemm_count": linear_op_count(unfused)}
        for variant, strategy in STRATEGY_OF.items():
            fuse_into(phase, unfused, variant, strategy)
    del model
    for family in args.families:
        size, predicted = equal_budget_size(family, budget, shapes, args)
        model = build_family_model(family, size, shapes, args, torch)
        count = adapter_parameters(model)
        assert count == predicted, (family, size, count, predicted)
        key = {"gaws": "groups", "gaws_d": "block"}.get(family, "rank")  # GAWS: {projection: factor}
        args.family_ranks[family] = {key: size, "adapter_parameters": count, "ratio_to_lora": round(count / budget, 4)}
        log(f"{family}: size {size} ({count:,} adapter parameters; LoRA: {budget:,})")
        model = model.to(device=device, dtype=dtype).eval()
        for phase in args.phases:
            log(f"torch.export ({phase}, {family})")
            unfused = zoo.export_program(model, **exports[phase])
            for variant, strategy in family_variants(family):
                if strategy is None:
                    programs[phase][variant] = unfused
                    reports[phase][variant] = {"gemm_count": linear_op_count(unfused), key: size}
                else:
                    fuse_into(phase, unfused, variant, strategy)
        del model
    return programs, reports


def _family_lib():
    """family_latency.py's helpers (GAWS factor search, rank search, adapter parameter count), one source."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import family_latency

    return family_latency


def adapter_parameters(model) -> int:
    return _family_lib().adapter_parameters(model)


def build_family_model(family: str, size, shapes: dict, args, torch, layers: int | None = None):
    """``family`` at ``size`` (rank, or {projection: factor} for GAWS / GAWS-D) on the seed-0 base."""
    from zflora_compile import zoo
    from zflora_compile.adapters import AdapterConfig, attach_adapters, randomize_adapters

    config = dict(shapes, num_hidden_layers=layers or args.layers, max_position_embeddings=max(4096, args.past + args.prefill + 8))
    if family in ("dora", "bdlora"):
        return zoo.build_peft_variant(family, "llama", r=size, seed=0, **config)
    if family in ("gaws", "gaws_d"):
        from zflora_compile.adapters.gaws import build_gaws_model

        factors = {"groups": size} if family == "gaws" else {"block": size}
        return build_gaws_model(family, "llama", seed=0, diag=False, **factors, **config)
    base = zoo.build_base_model("llama", seed=0, **config)
    return randomize_adapters(attach_adapters(base, AdapterConfig(family=family, rank=size, alpha=2 * size)), seed=1)


def equal_budget_size(family: str, budget: int, shapes: dict, args) -> tuple:
    """(size, adapter parameter count) closest to ``budget``: the rank (a multiple of 2 for
    BD-LoRA's 2 blocks: ``family_latency.closest_rank``), or the
    GAWS / GAWS-D factor per projection (``family_latency.gaws_factors``)."""
    import torch

    lib = _family_lib()
    if family in ("gaws", "gaws_d"):
        factors, count, _ = lib.gaws_factors(lib.shapes_of(argparse.Namespace(**shapes)), args.layers, budget)
        return factors, count
    step = 2 if family == "bdlora" else 1
    return lib.closest_rank(lambda rank: adapter_parameters(build_family_model(family, rank, shapes, args, torch)), budget, step)


def _inputs(program, device):
    args, kwargs = program.example_inputs
    return tuple(a.to(device) for a in args), {k: v.to(device) for k, v in kwargs.items()}


def eager_runner(torch, module, args, kwargs, device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run():
        with torch.no_grad():
            module(*args, **kwargs)
        sync()

    return run


def cuda_graph_runner(torch, module, args, kwargs):
    """Capture one call on static inputs; the runner replays it."""
    static_args = tuple(a.clone() for a in args)
    static_kwargs = {k: v.clone() for k, v in kwargs.items()}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(3):
            module(*static_args, **static_kwargs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        module(*static_args, **static_kwargs)

    def run():
        graph.replay()
        torch.cuda.synchronize()

    run.keep_alive = (graph, static_args, static_kwargs)  # the graph's memory lives as long as the runner
    return run


def measure(args, torch, device, programs) -> dict:
    from zflora_compile.latency import interleaved, load_average, summarize

    results = {}
    for phase in args.phases:
        rounds = args.decode_rounds if phase == "decode" else args.prefill_rounds
        modules = {variant: programs[phase][variant].module() for variant in args.variants}
        inputs = {variant: _inputs(programs[phase][variant], device) for variant in args.variants}
        results[phase] = {}
        for mode in MODES:
            if mode == "cuda_graphs" and device.type != "cuda":
                results[phase][mode] = {"skipped": "no CUDA device"}
                continue
            if mode == "cuda_graphs" and args.no_cuda_graphs:
                results[phase][mode] = {"skipped": "--no-cuda-graphs"}
                continue
            runners, errors = {}, {}
            for variant in args.variants:
                call_args, call_kwargs = inputs[variant]
                try:
                    if mode == "eager":
                        runners[variant] = eager_runner(torch, modules[variant], call_args, call_kwargs, device)
                    else:
                        runners[variant] = cuda_graph_runner(torch, modules[variant], call_args, call_kwargs)
                except Exception as error:  # noqa: BLE001 - e.g. an op that cannot be captured
                    errors[variant] = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            if errors:
                results[phase][mode] = {"skipped": "capture failed", "errors": errors}
                log(f"{phase}/{mode}: skipped ({errors})")
                continue
            log(f"{phase}/{mode}: {args.warmup} warm-up + {rounds} interleaved rounds")
            load_before = load_average()
            times, orders = interleaved(runners, rounds=rounds, warmup=args.warmup)
            results[phase][mode] = {
                "rounds": rounds,
                "warmup": args.warmup,
                "load_average": {"before": load_before, "after": load_average()},
                "variants": summarize(times, baseline="base"),
                "orders": orders,
            }
            del runners
        del modules
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def table(results: dict, reports: dict, variants=VARIANTS) -> str:
    lines = [f"{'phase':8} {'mode':12} {'variant':15} {'GEMMs':>6} {'median ms':>10} {'p25-p75 ms':>17} {'x base':>7}"]
    for phase, modes in results.items():
        for mode, data in modes.items():
            if "variants" not in data:
                lines.append(f"{phase:8} {mode:12} {'-':15} {'':>6} {'skipped: ' + data['skipped']}")
                continue
            for variant in variants:
                stats = data["variants"][variant]
                spread = f"{stats['p25_ms']:.3f}-{stats['p75_ms']:.3f}"
                gemms = reports[phase][variant]["gemm_count"]
                lines.append(f"{phase:8} {mode:12} {variant:15} {gemms:>6} {stats['median_ms']:>10.3f} {spread:>17} {stats['ratio_to_base']:>7.3f}")
    return "\n".join(lines)


def default_out(device: dict) -> Path:
    slug = "".join(c if c.isalnum() else "_" for c in device["name"]).strip("_").lower()[:40] or device["type"]
    return REPO / "benchmarks" / "results" / f"gpu_latency_{slug}.json"


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    if not args.quick and device.type != "cuda":
        log("warning: no CUDA device; measuring the full-size model on CPU (use --quick for a smoke run)")
    info = device_info(torch, device)
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        programs, reports = build_programs(args, torch, device)
    results = measure(args, torch, device, programs)
    payload = {
        "benchmark": "gpu_latency",
        "schema_version": SCHEMA_VERSION,
        "started_utc": started,
        "device": info,
        "settings": {
            "quick": args.quick,
            "model": "Llama (random weights), " + ("tiny shapes" if args.quick else "Llama-3.2-1B shapes"),
            "shapes": dict(QUICK_MODEL if args.quick else LLAMA_32_1B, **({"vocab_size": args.vocab} if args.vocab else {})),
            "layers": args.layers,
            "dtype": DTYPES[args.dtype],
            "lora": {"rank": args.rank, "alpha": 2 * args.rank, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
            "families": args.families,
            "equal_parameter_budget": args.family_ranks,
            "batch": 1,
            "decode": {"new_tokens": 1, "past_length": args.past},
            "prefill": {"new_tokens": args.prefill, "past_length": 0, "use_cache": False},
            "phases": args.phases,
        },
        "variants": {phase: reports[phase] for phase in args.phases},
        "results": results,
        "notes": [
            "all variants are ExportedProgram.module() of one torch.export per phase; base/fused/merged come from zflora_compile.fuse_adapters (strip/fuse/merge)",
            "interleaved rounds (zflora_compile.latency.interleaved), order rotated every round; medians and ratios of medians to base",
            "wall time per call with torch.cuda.synchronize(); cuda_graphs: one capture per variant with torch.cuda.graphs, replayed",
        ],
    }
    out = args.out or default_out(info)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"device: {info['name']} ({info['type']}), {args.layers} layers, {DTYPES[args.dtype]}, LoRA r={args.rank}, past {args.past}, prefill {args.prefill}")
    print(table(results, payload["variants"], args.variants))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
