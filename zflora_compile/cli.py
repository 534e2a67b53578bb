"""``zcompile``: the command line.

    zcompile inspect MODEL                     table of adapter sites (and what was rejected, why)
    zcompile [compile] MODEL -o DIR [--strategy fuse|merge|strip] [--target ort|qnn|trt] [--max-rank R] [--adapter-inputs]
    zcompile swap COMPILED --adapter OTHER -o OUT [--format onnx|onnx_adapter]   new adapter weights into a fused model
                       [--check-latency [--max-overhead PCT] [--gate-budget-s S] [--gate-calibrate] [--gate-sessions N] [--gate-cpus LIST]]

Exit codes: 0 success (also when no adapter site is found), 1 verification failed or latency
gate regression, 2 unusable input, bad arguments, a refusing environment (full disk, read-only
filesystem) or missing dependency (e.g. TensorRT), 3 internal error (a bug), 4 latency gate
inconclusive (the interval straddles --max-overhead), 128 + N on signal
N (130 SIGINT, 143 SIGTERM, 129 SIGHUP; temporary files are removed first).
Subcommands share argument groups, in the manner of Polygraphy. Heavy modules (ONNX Runtime,
onnx-ir, the compiler) are imported only after the arguments are parsed: ``--version`` is fast.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from zflora_compile._version import __version__

if TYPE_CHECKING:  # imported lazily at run time: --version stays fast
    from zflora_compile.options import CompileOptions

SUBCOMMANDS = ("compile", "inspect", "swap", "export")
EXIT_INTERNAL = 3


#: flags that take no value: ``zcompile -q MODEL ...`` is still short for ``zcompile compile -q MODEL ...``
_BARE_FLAGS = {"-q", "--quiet", "--json", "--debug", "--force", "--no-verify", "--check-latency", "--gate-calibrate", "--refit", "--adapter-inputs"}


def _output_args() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("output")
    group.add_argument("--json", action="store_true", help="print the JSON report on stdout and nothing else")
    group.add_argument("-q", "--quiet", action="store_true", help="no progress or summary; errors only")
    group.add_argument("--debug", action="store_true", help="show a traceback for internal errors")
    group.add_argument("--report", type=Path, metavar="PATH", help="also write the JSON report here, on success and on failure (for pipelines)")
    return parent


def _model_args() -> argparse.ArgumentParser:
    from zflora_compile.graph.records import DEFAULT_MAX_RANK_RATIO

    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("model")
    group.add_argument("model", type=Path, help="ONNX model (.onnx; external data beside it)")
    group.add_argument(
        "--max-rank-ratio",
        type=float,
        default=DEFAULT_MAX_RANK_RATIO,
        help="an adapter's rank must be at most this fraction of min(in, out) (default %(default)s)",
    )
    return parent


def _compile_args() -> argparse.ArgumentParser:
    from zflora_compile.planner import STRATEGIES
    from zflora_compile.verify import TOLERANCES

    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("compile")
    group.add_argument("-o", "--output", type=Path, help="output directory (default: <model stem>_<strategy> beside the model)")
    group.add_argument("--strategy", choices=STRATEGIES, default="fuse", help="fuse (default): widened projections, adapters separable; merge: W + s*A@B; strip: base model")
    group.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    group.add_argument("--memory-limit", type=float, default=None, metavar="GIB", help="memory the compile may use (default: what the machine has available now); the estimated peak must fit, else exit 2 before any work, with the numbers and a lighter setting that fits")
    group.add_argument(
        "--keep-scales",
        action="store_true",
        help="strip: keep constant per-column scales after projections as part of the base model (a LayerScale and an IA3 adapter look the same; without this flag strip refuses while there are any)",
    )
    group.add_argument("--max-rank", type=int, metavar="R", help="fuse: pad every fused group / lane block with zero lanes to rank R per adapted projection, so any adapter up to rank R swaps in (zcompile swap) with identical shapes; exact (zero lanes), verified")
    group.add_argument("--adapter-inputs", action="store_true", help="fuse: keep the adapter-owned tensors (widened weights, low-rank constants, column scales) as overridable graph inputs and write adapter.onnx_adapter (ONNX Runtime's adapter format)")
    _target_args(parent)
    latency = parent.add_argument_group("latency gate")
    latency.add_argument("--check-latency", action="store_true", help="build base (strip), unfused and fused on the target, time them in paired rounds; the 95%% bootstrap interval of the median fused/base ratio decides: pass (exit 0), regression above --max-overhead (exit 1), inconclusive (exit 4)")
    latency.add_argument("--max-overhead", type=float, default=2.0, metavar="PCT", help="largest allowed fused/base - 1 per phase, in percent (default %(default)s)")
    latency.add_argument("--gate-budget-s", type=float, default=60.0, metavar="S", help="seconds of further rounds a phase may spend while its verdict is inconclusive (default %(default)s; 0: none)")
    latency.add_argument("--gate-calibrate", action="store_true", help="also time base against itself (A/A) the same way and report it beside the gate: the noise floor")
    latency.add_argument("--gate-sessions", type=int, default=4, metavar="N", help="split each phase's rounds over up to N fresh loads of the artifacts (at least 5 rounds per load, an even number of loads), the load order reversed every other load: which session was loaded first favours it by ~1.5%% (reversal cancels it), and two sessions of one model can differ by up to ~10%% for their lifetime (several loads show it in the interval) (default %(default)s)")
    latency.add_argument("--gate-cpus", default=None, metavar="LIST", help="pin the process to these CPUs while timing (e.g. 2,3 or 0-3; Linux sched_setaffinity), so the scheduler does not move the runs; the report records the set (default: not pinned)")
    latency.add_argument("--prefill", type=int, default=128, metavar="N", help="prompt tokens of the prefill phase (default %(default)s)")
    latency.add_argument("--past", type=int, default=128, metavar="N", help="KV-cache length of the decode phase (default %(default)s)")
    latency.add_argument("--phases", nargs="+", choices=("decode", "prefill"), default=["decode", "prefill"], help="phases to time and, for static-shape targets, to build (default: both)")
    latency.add_argument("--rounds", type=int, default=30, help="interleaved decode rounds (default %(default)s)")
    latency.add_argument("--prefill-rounds", type=int, default=10, help="interleaved prefill rounds (default %(default)s)")
    latency.add_argument("--warmup", type=int, default=3, help="untimed runs per variant and phase (default %(default)s)")
    verify = parent.add_argument_group("verification")
    verify.add_argument(
        "--verify", dest="verify_mode", choices=("auto", "full", "regions", "off"), default="auto",
        help="full: both whole models in ONNX Runtime; regions: each rewritten region against the original's, one at a time "
        "(a model whose regions cannot be isolated is checked in full, the report says why); auto (default): full below 2 GiB of weights, regions above",
    )
    verify.add_argument("--no-verify", dest="verify", action="store_false", help="skip the ONNX Runtime comparison (not recommended; --verify off)")
    defaults = ", ".join(f"{k} {a:g}/{r:g}" for k, (a, r) in TOLERANCES.items())
    verify.add_argument("--atol", type=float, help=f"absolute tolerance (default by dtype, atol/rtol: {defaults})")
    verify.add_argument("--rtol", type=float, help="relative tolerance (default by dtype)")
    verify.add_argument("--seed", type=int, default=0, help="seed for the synthesized inputs (default %(default)s)")
    return parent


def _swap_args() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("swap")
    group.add_argument("model", type=Path, metavar="COMPILED", help="a model compiled with --strategy fuse (model.onnx) or zcompile's output directory")
    group.add_argument("--adapter", type=Path, required=True, metavar="OTHER", help="the new adapter: a PEFT LoRA/DoRA directory, an ONNX model with the same base, or a saved FFA/FBA/FFBA/zFLoRA adapter directory")
    group.add_argument("-o", "--output", type=Path, required=True, help="output directory (model.onnx or adapter.onnx_adapter, and report.json)")
    group.add_argument("--format", choices=("onnx", "onnx_adapter", "trt"), default="onnx", help="onnx (default): the swapped model; onnx_adapter: only ONNX Runtime's adapter file of the new weights (model compiled with --adapter-inputs); trt: the swapped model and its model.plan refitted (compiled with --target trt --refit)")
    group.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    group.add_argument("--no-verify", dest="verify", action="store_false", help="skip the ONNX Runtime comparison against the independent reference")
    group.add_argument("--atol", type=float, help="absolute tolerance (default by dtype)")
    group.add_argument("--rtol", type=float, help="relative tolerance (default by dtype)")
    group.add_argument("--seed", type=int, default=0, help="seed for the synthesized inputs (default %(default)s)")
    return parent


def _run_swap(args, console) -> int:
    from zflora_compile.errors import InputError
    from zflora_compile.report import report_text
    from zflora_compile.swap import swap_file

    for flag, value in (("--atol", args.atol), ("--rtol", args.rtol)):
        if value is not None and not value >= 0:
            raise InputError(f"{flag} must be a finite number >= 0, got {value}")
    report = swap_file(args.model, args.adapter, args.output, fmt=args.format, verify=args.verify, atol=args.atol, rtol=args.rtol, seed=args.seed, force=args.force)
    _save_report(args, report)
    if args.json:
        print(report_text(report), end="")
    elif not args.quiet:
        check = report["verification"]
        if check.get("passed"):
            console.print(f"verified against {check['reference']}: max abs diff {check['worst']['max_abs_diff']:.3g} over {len(check['cases'])} input case(s)")
        else:
            console.print(f"[yellow]not verified[/yellow]: {check.get('reason')}")
        console.print(f"{report['message']} in {report['timings_s']['total']:.2f} s; wrote {args.output}")
    return 0


def _target_args(parent: argparse.ArgumentParser) -> None:
    """``--target`` and ``--precision``, then each registered target's own group of flags."""
    from zflora_compile.targets import TARGETS
    from zflora_compile.targets.base import or_list

    group = parent.add_argument_group("target")
    group.add_argument("--target", choices=sorted(TARGETS), default="ort", help="; ".join(f"{name}: {cls.summary}" for name, cls in TARGETS.items()))
    precisions = sorted({p for cls in TARGETS.values() for p in cls.precisions})
    described = [f"{name}: {or_list([f'{cls.precisions[0]} (default)', *cls.precisions[1:]])}" for name, cls in TARGETS.items() if cls.precisions]
    described += [f"{name} runs the model's own precision" for name, cls in TARGETS.items() if not cls.precisions]
    group.add_argument("--precision", choices=precisions, help="; ".join(described))
    for name, cls in TARGETS.items():
        cls.add_arguments(parent.add_argument_group(f"target {name}"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zcompile",
        description="Find adapter (LoRA) subgraphs in an ONNX LLM, fuse / merge / strip them exactly, verify, and write the model.",
        epilog="Exit codes: 0 ok, 1 verification failed or latency gate regression, 2 bad input, bad arguments, environment (disk full, read-only) or missing dependency, 3 internal error, 4 latency gate inconclusive (more rounds: --rounds, --gate-budget-s), 128+N on signal N.",
    )
    parser.add_argument("--version", action="version", version=f"zcompile {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    shared = [_model_args(), _output_args()]
    sub.add_parser("compile", parents=[*shared, _compile_args()], help="rewrite the adapters and write the model (default command)")
    sub.add_parser("inspect", parents=shared, help="list the adapter sites found, and what was rejected and why")
    sub.add_parser("swap", parents=[_output_args(), _swap_args()], help="replace the adapter weights of a fused (compiled) model without recompiling (docs/swap.md)")
    from zflora_compile.export.cli import register

    register(sub)  # listed here; main() hands `zcompile export ...` to the export CLI, which owns its flags
    return parser


def _lanes(site: dict) -> str:
    """``in+4(s=2) out+4`` for a widened projection: lanes read and written ((0): cut off / zeros appended)."""
    parts = [f"in+{r['rank']}" + ("(0)" if r["zero"] else f"(s={r['scale']:g})") for r in site["reads"]]
    parts += [f"out+{w['rank']}" + ("(0)" if w["zero"] else "") for w in site["writes"]]
    return " ".join(parts)


def _sites_table(sites: list[dict], title: str):
    from rich.table import Table

    table = Table(title=title)
    for column in ("site", "layer", "projection", "family", "rank", "scale", "group", "in→out", "bias"):
        table.add_column(column)
    for s in sites:
        widened = "reads" in s
        table.add_row(
            s["id"],
            "" if s["layer"] is None else str(s["layer"]),
            s["projection"] or s["label"],
            s["family"],
            _lanes(s) if widened else (str(s["rank"]) if "rank" in s else f"dense ({s.get('branches', 1)} branch)"),
            "" if widened or "scale" not in s else f"{s['scale']:g}",
            s.get("group", ""),
            f"{s['in_features']}→{s['out_features']}",
            "yes" if s.get("bias") else "",
        )
    return table


def _print_rejections(console, rejected: list[dict]) -> None:
    for r in rejected:
        console.print(f"[yellow]left unfused[/yellow] {r['node']}: {r['reason']}")


def _print_unrecognized(console, unrecognized: list[dict]) -> None:
    for u in unrecognized:
        label = f" ({u['label']})" if u.get("label") else ""
        console.print(f"[red]unrecognized {u['kind']}[/red] {u['node']}{label}: {u['reason']}")


def _run_inspect(args, console) -> int:
    from zflora_compile import metadata
    from zflora_compile.api import detect_adapters
    from zflora_compile.report import accounting_line, report_text

    detection = detect_adapters(args.model, max_rank_ratio=args.max_rank_ratio)
    compiled = metadata.summary(metadata.read_file(args.model))
    sites = [s.to_json() for s in detection.all_sites]
    rejected = [r.to_json() for r in detection.rejections]
    unrecognized = [u.to_json() for u in detection.unrecognized]
    listing = {
        "model": str(args.model),
        "status": "ok",
        "exit_code": 0,
        "sites": sites,
        "rejected": rejected,
        "unrecognized": unrecognized,
        "accounting": detection.accounting.to_json(),
        "compiled": compiled,
    }
    _save_report(args, listing)
    if args.json:
        print(report_text(listing), end="")
        return 0
    if not args.quiet:
        if sites:
            console.print(_sites_table(sites, f"{len(sites)} adapter site(s) in {args.model}"))
        else:
            console.print(f"no adapter sites found in {args.model}")
        _print_rejections(console, rejected)
        _print_unrecognized(console, unrecognized)
        tally = accounting_line(detection)
        if tally:
            console.print(tally)
        _print_compiled(console, compiled)
    return 0


def _print_compiled(console, compiled: dict | None) -> None:
    """What zflora-compile compiled into the model (its ``zflora.compiled`` metadata)."""
    if compiled is None:
        return
    if compiled.get("unreadable"):
        console.print(f"compiled: metadata '{compiled['key']}' is unreadable (edited after zflora-compile wrote it)")
        return
    for entry in compiled["compilations"]:
        families = ", ".join(entry.get("families", [])) or "no adapter"
        parts = [f"{len(entry.get('sites', []))} site(s)"]
        for key, what in (("groups", "fused group(s)"), ("widened", "widened projection(s)"), ("merged", "merged weight(s)")):
            if entry.get(key):
                parts.append(f"{len(entry[key])} {what}")
        removed = entry.get("removed")
        if removed:
            parts.append(f"removed {len(removed.get('groups', []))} fused group(s) and {len(removed.get('widened', []))} widened projection(s)")
        if entry.get("strategy") == "swap":
            adapter = entry.get("adapter") or {}
            console.print(f"compiled: swap by zflora-compile {entry.get('version')}: {len(entry.get('swapped', []))} adapter tensor(s) from {adapter.get('kind')} adapter {adapter.get('source')}")
            continue
        console.print(f"compiled: {entry.get('strategy')} by zflora-compile {entry.get('version')} ({families}): {', '.join(parts)}")
        for group in entry.get("groups", []):
            padded = f", --max-rank {group['max_rank']}" if group.get("max_rank") else ""
            console.print(f"  fused group {group['name']}: {group['base_width']} base + {group['rank_width']} adapter lane column(s) ({', '.join(group['sites'])}{padded})")
        for site in entry.get("widened", []):
            console.print(f"  widened {site['family']} {site.get('label') or site['site']}: {site['widened_shape']} from [{site['in_features']}, {site['out_features']}]")
        for site in entry.get("merged", []):
            console.print(f"  merged {site['family']} {site.get('label') or site['site']} (not separable)")


def _run_compile(args, console, err_console) -> int:
    from zflora_compile.build import compile_file, default_output_dir
    from zflora_compile.progress import NullProgress, RichProgress
    from zflora_compile.report import report_text

    output = args.output or default_output_dir(args.model, args.strategy)
    options = _compile_options(args)
    show = not (args.quiet or args.json) and err_console.is_terminal
    report = compile_file(args.model, output, options, progress=RichProgress(err_console) if show else NullProgress())
    _save_report(args, report)
    if args.json:
        print(report_text(report), end="")
    elif not args.quiet:
        _print_summary(console, report)
    return 0


def _compile_options(args) -> CompileOptions:
    """The options the flags ask for; bad ones fail here, before the model is read, with an error report."""
    from zflora_compile.errors import InputError, ZcompileError
    from zflora_compile.gate import LatencyOptions
    from zflora_compile.options import CompileOptions
    from zflora_compile.report import InputInfo, Report
    from zflora_compile.targets import TARGETS

    try:
        for flag, value in (("--atol", args.atol), ("--rtol", args.rtol)):
            if value is not None and not value >= 0:
                raise InputError(f"{flag} must be a finite number >= 0, got {value}")
        if not args.verify and args.verify_mode not in ("auto", "off"):
            raise InputError(f"--no-verify contradicts --verify {args.verify_mode}")
        return CompileOptions(
            strategy=args.strategy,
            target=args.target,
            verify=args.verify and args.verify_mode != "off",
            verify_mode=args.verify_mode if args.verify else "off",
            atol=args.atol,
            rtol=args.rtol,
            max_rank_ratio=args.max_rank_ratio,
            seed=args.seed,
            keep_scales=args.keep_scales,
            force=args.force,
            target_options=TARGETS[args.target].options_from_args(args),
            latency=LatencyOptions(
                max_overhead_pct=args.max_overhead,
                prefill=args.prefill,
                past=args.past,
                decode_rounds=args.rounds,
                prefill_rounds=args.prefill_rounds,
                warmup=args.warmup,
                phases=tuple(args.phases),
                budget_s=args.gate_budget_s,
                calibrate=args.gate_calibrate,
                sessions=args.gate_sessions,
                cpus=args.gate_cpus,
            ),
            check_latency=args.check_latency,
            max_rank=args.max_rank,
            adapter_inputs=args.adapter_inputs,
            memory_limit_gib=args.memory_limit,
        )
    except ZcompileError as error:
        report = Report({"strategy": args.strategy, "target": args.target, "verify": args.verify and args.verify_mode != "off"}, InputInfo(path=str(args.model)))
        report.fail(error)
        error.report = report.to_json()
        raise


def _print_summary(console, report: dict) -> None:
    if report.get("sites"):
        console.print(_sites_table(report["sites"], f"{len(report['sites'])} adapter site(s)"))
    _print_rejections(console, report.get("rejected", []))
    _print_unrecognized(console, report.get("unrecognized", []))
    verification = report.get("verification", {})
    if verification.get("passed"):
        worst = verification["worst"]
        how = f" ({verification['mode']}: {verification['mode_reason']})" if verification.get("mode") else ""
        if "regions" in verification and not verification["regions"]:
            console.print(f"verified: no node changed{how}")
        elif "regions" in verification:
            console.print(f"verified {len(verification['regions'])} region(s): max abs diff {worst['max_abs_diff']:.3g} ('{worst['output']}', {worst.get('case', '')}){how}")
        else:
            console.print(f"verified: max abs diff {worst['max_abs_diff']:.3g} ('{worst['output']}', {worst.get('case', '')}) over {len(verification['cases'])} input case(s){how}")
    elif verification.get("skipped"):
        console.print("[yellow]verification skipped[/yellow] (--no-verify)")
    target = report.get("target", {})
    check = target.get("check")
    if check and check.get("skipped"):
        console.print(f"target {target['name']}: {check['skipped']}")
    elif check:
        how = f", {len(check['regions'])} region(s)" if check.get("mode") == "regions" else ""
        console.print(f"{target['name']} artifact ({', '.join(target['artifacts'])}) matches model.onnx{how}: max abs diff {check['max_abs_diff']:.3g} (atol {check['atol']:g})")
    if report.get("latency"):
        console.print(_latency_table(report["latency"]))
    console.print(f"{report['message']}; wrote {report['output']['dir']}")


def _latency_table(latency: dict):
    from rich.table import Table

    emulated = " (HTP emulator: not NPU latency)" if latency.get("emulated") else ""
    table = Table(title=f"latency on {latency['target']}{emulated}: medians of interleaved runs; fused/base: median per-round ratio, 95% interval")
    for column in ("phase", "variant", "median ms", "min ms", "max ms", "x base"):
        table.add_column(column, justify="left" if column in ("phase", "variant") else "right")
    for name, phase in latency["phases"].items():
        for index, (variant, stats) in enumerate(phase["variants"].items()):
            label = f"{name} ({phase['seq']} tok, past {phase['past']})" if index == 0 else ""
            table.add_row(label, variant, f"{stats['median_ms']:.3f}", f"{stats['min_ms']:.3f}", f"{stats['max_ms']:.3f}", f"{stats['ratio_to_base']:.3f}")
        if "ratio_interval" in phase:
            low, high = phase["ratio_interval"]
            table.add_row("", "fused/base", "", "", "", f"{phase['ratio_median']:.3f} [{low:.3f}, {high:.3f}] {phase['verdict']}, {phase['rounds']} rounds")
        aa = phase.get("calibration")
        if aa:
            low, high = aa["ratio_interval"]
            table.add_row("", "A/A base/base", "", "", "", f"{aa['ratio_median']:.3f} [{low:.3f}, {high:.3f}] (noise floor)")
    verdict = latency.get("verdict", "pass" if latency["passed"] else "regression")
    shown = {"pass": "[green]passed[/green]", "regression": "[red]FAILED[/red]", "inconclusive": "[yellow]INCONCLUSIVE[/yellow]"}[verdict]
    table.caption = f"gate {shown}: worst fused overhead {latency['worst_overhead_pct']:+.1f}% (max {latency['max_overhead_pct']:g}%)"
    return table


def _save_report(args, report: dict | None) -> None:
    """``--report PATH``: the report written there (strict JSON), replaced atomically."""
    path = getattr(args, "report", None)
    if path is None or report is None:
        return
    from zflora_compile.report import report_text

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(report_text(report))
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()


def _check_report_path(args) -> None:
    """``--report`` must be writable before any work is done (its directory is created if missing)."""
    from zflora_compile.errors import InputError

    path = getattr(args, "report", None)
    if path is None:
        return
    if path.is_dir():
        raise InputError(f"--report {path}: is a directory")
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise InputError(f"--report {path}: {parent} is not a directory (ENOTDIR)")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"--report {path}: permission denied (EACCES)")


def _normalize(argv: list[str]) -> list[str]:
    """``zcompile [flags] MODEL ...`` is short for ``zcompile compile [flags] MODEL ...``."""
    if not argv or argv[0] in SUBCOMMANDS or argv[0] in ("-h", "--help", "--version"):
        return argv
    for index, token in enumerate(argv):
        if token in SUBCOMMANDS and all(t in _BARE_FLAGS for t in argv[:index]):
            return [token, *argv[:index], *argv[index + 1 :]]  # zcompile -q inspect MODEL
        if token not in _BARE_FLAGS:
            break
    return ["compile", *argv]


class _Signals:
    """SIGTERM and SIGHUP (and SIGINT) raise :class:`Interrupted`, once: every ``finally`` and
    ``with`` block on the way out removes its staging directory and temporary files, as SIGINT
    always did; a second signal during that cleanup is ignored."""

    NAMES = ("SIGINT", "SIGTERM", "SIGHUP")

    def __enter__(self):
        self.saved = {}
        if threading_is_main():
            for name in self.NAMES:
                number = getattr(signal, name, None)
                if number is not None:
                    self.saved[number] = signal.signal(number, self._raise)
        return self

    def _raise(self, signum, frame):
        from zflora_compile.errors import Interrupted

        for number in self.saved:
            signal.signal(number, signal.SIG_IGN)
        raise Interrupted(signum)

    def __exit__(self, *exc):
        for number, handler in self.saved.items():
            signal.signal(number, handler)
        return False


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _quiet_libraries(debug: bool):
    """Library log output (onnx-ir's shape-inference tracebacks, numpy warnings) is silenced;
    ``--debug`` shows it."""
    root = logging.getLogger()
    saved_level, saved_capture = root.level, logging.raiseExceptions
    handler = logging.NullHandler()
    with warnings.catch_warnings():
        if debug:
            logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        else:
            warnings.simplefilter("ignore")
            root.addHandler(handler)
            root.setLevel(logging.CRITICAL + 1)
        try:
            yield
        finally:
            root.removeHandler(handler)
            root.setLevel(saved_level)
            logging.raiseExceptions = saved_capture


def main(argv: list[str] | None = None) -> int:
    argv = _normalize(list(sys.argv[1:] if argv is None else argv))
    if argv[:1] == ["--version"]:
        print(f"zcompile {__version__}")
        return 0
    if argv[:1] == ["export"]:  # adapters for serving engines (docs/serving.md): their own flags and errors
        from zflora_compile.export.cli import main as export_main

        with _Signals():
            return export_main(argv[1:])
    args = build_parser().parse_args(argv)
    from zflora_compile import progress

    saved, progress.SHOW_LIBRARY_OUTPUT = progress.SHOW_LIBRARY_OUTPUT, args.debug
    try:
        with _Signals(), _quiet_libraries(args.debug):
            return _main(args)
    finally:
        progress.SHOW_LIBRARY_OUTPUT = saved


def _error_line(message: str) -> None:
    print(f"zcompile: error: {message}", file=sys.stderr)


def _main(args) -> int:
    from rich.console import Console

    from zflora_compile.errors import EnvironmentProblem, Interrupted, ZcompileError, first_line

    console = Console(highlight=False)
    err_console = Console(stderr=True, highlight=False)
    report = None
    report_usable = False
    error_seen: list = [None]
    try:
        try:
            _check_report_path(args)
            report_usable = True
            if args.command == "inspect":
                return _run_inspect(args, console)
            if args.command == "swap":
                return _run_swap(args, console)
            return _run_compile(args, console, err_console)
        except ZcompileError as error:
            error_seen[0] = error
            report = getattr(error, "report", None)
            if args.json and report is not None:
                from zflora_compile.report import report_text

                print(report_text(report), end="")
            elif report is not None and report.get("latency") and not args.quiet:
                console.print(_latency_table(report["latency"]))
            _error_line(str(error))
            code = error.exit_code
        except (KeyboardInterrupt, Interrupted) as error:
            report = getattr(error, "report", None)
            code = getattr(error, "exit_code", 130)
            print(f"zcompile: {error if str(error) else 'interrupted (SIGINT)'}", file=sys.stderr)
        except OSError as error:
            report = getattr(error, "report", None)
            _error_line(str(EnvironmentProblem.from_os_error(error)))
            code = 2
        except Exception as error:  # noqa: BLE001 - a bug: one line, traceback with --debug
            report = getattr(error, "report", None)
            if args.debug:
                traceback.print_exc()
            print(f"zcompile: internal error: {type(error).__name__}: {first_line(error)} (rerun with --debug for a traceback)", file=sys.stderr)
            code = EXIT_INTERNAL
        if code not in (0,) and args.json and report is not None and not isinstance(error_seen[0], ZcompileError):
            from zflora_compile.report import report_text

            print(report_text(report), end="")  # an internal error or an interruption: --json still gets the report
        if report is None and getattr(args, "report", None) is not None:
            report = _bare_report(args, code)
        try:
            if report_usable:
                _save_report(args, report)
        except OSError as error:
            _error_line(f"{EnvironmentProblem.from_os_error(error, args.report, 'writing --report')}")
        return code
    except (KeyboardInterrupt, Interrupted):  # a signal while reporting a failure
        return 130


def _bare_report(args, code: int) -> dict:
    """The report of a run that failed before the compile started (bad arguments, inspect)."""
    from zflora_compile.report import InputInfo, Report

    report = Report({"command": args.command}, InputInfo(path=str(args.model)))
    report.exit_code, report.message = code, "failed before the compile started"
    return report.to_json()


if __name__ == "__main__":
    sys.exit(main())
