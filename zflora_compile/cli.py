"""``zcompile``: the command line.

    zcompile inspect MODEL                     table of adapter sites (and what was rejected, why)
    zcompile [compile] MODEL -o DIR [--strategy fuse|merge|strip] [--target ort|qnn|trt]
                       [--check-latency [--max-overhead PCT]]

Exit codes: 0 success (also when no adapter site is found), 1 verification or latency gate
failed, 2 unusable input or missing dependency (e.g. TensorRT), 3 internal error (a bug).
Subcommands share argument groups, in the manner of Polygraphy.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from rich.console import Console
from rich.table import Table

from zflora_compile._version import __version__
from zflora_compile.build import compile_file, default_output_dir
from zflora_compile.errors import ZcompileError, first_line
from zflora_compile.gate import LatencyOptions
from zflora_compile.graph.records import DEFAULT_MAX_RANK_RATIO
from zflora_compile.options import CompileOptions
from zflora_compile.planner import STRATEGIES
from zflora_compile.progress import NullProgress, RichProgress
from zflora_compile.report import InputInfo, Report
from zflora_compile.targets import TARGETS
from zflora_compile.targets.base import or_list
from zflora_compile.verify import TOLERANCES

SUBCOMMANDS = ("compile", "inspect")
EXIT_INTERNAL = 3


def _output_args() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("output")
    group.add_argument("--json", action="store_true", help="print the JSON report on stdout and nothing else")
    group.add_argument("-q", "--quiet", action="store_true", help="no progress or summary; errors only")
    group.add_argument("--debug", action="store_true", help="show a traceback for internal errors")
    group.add_argument("--report", type=Path, metavar="PATH", help="also write the JSON report here, on success and on failure (for pipelines)")
    return parent


def _model_args() -> argparse.ArgumentParser:
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
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("compile")
    group.add_argument("-o", "--output", type=Path, help="output directory (default: <model stem>_<strategy> beside the model)")
    group.add_argument("--strategy", choices=STRATEGIES, default="fuse", help="fuse (default): widened projections, adapters separable; merge: W + s*A@B; strip: base model")
    group.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    _target_args(parent)
    latency = parent.add_argument_group("latency gate")
    latency.add_argument("--check-latency", action="store_true", help="build base (strip), unfused and fused on the target, time them interleaved, fail (exit 1) above --max-overhead")
    latency.add_argument("--max-overhead", type=float, default=2.0, metavar="PCT", help="largest allowed fused/base - 1 per phase, in percent (default %(default)s)")
    latency.add_argument("--prefill", type=int, default=128, metavar="N", help="prompt tokens of the prefill phase (default %(default)s)")
    latency.add_argument("--past", type=int, default=128, metavar="N", help="KV-cache length of the decode phase (default %(default)s)")
    latency.add_argument("--phases", nargs="+", choices=("decode", "prefill"), default=["decode", "prefill"], help="phases to time and, for static-shape targets, to build (default: both)")
    latency.add_argument("--rounds", type=int, default=30, help="interleaved decode rounds (default %(default)s)")
    latency.add_argument("--prefill-rounds", type=int, default=10, help="interleaved prefill rounds (default %(default)s)")
    latency.add_argument("--warmup", type=int, default=3, help="untimed runs per variant and phase (default %(default)s)")
    verify = parent.add_argument_group("verification")
    verify.add_argument("--no-verify", dest="verify", action="store_false", help="skip the ONNX Runtime comparison (not recommended)")
    defaults = ", ".join(f"{k} {a:g}/{r:g}" for k, (a, r) in TOLERANCES.items())
    verify.add_argument("--atol", type=float, help=f"absolute tolerance (default by dtype, atol/rtol: {defaults})")
    verify.add_argument("--rtol", type=float, help="relative tolerance (default by dtype)")
    verify.add_argument("--seed", type=int, default=0, help="seed for the synthesized inputs (default %(default)s)")
    return parent


def _target_args(parent: argparse.ArgumentParser) -> None:
    """``--target`` and ``--precision``, then each registered target's own group of flags."""
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
        epilog="Exit codes: 0 ok, 1 verification failed, 2 bad input or missing dependency, 3 internal error.",
    )
    parser.add_argument("--version", action="version", version=f"zcompile {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    shared = [_model_args(), _output_args()]
    sub.add_parser("compile", parents=[*shared, _compile_args()], help="rewrite the adapters and write the model (default command)")
    sub.add_parser("inspect", parents=shared, help="list the adapter sites found, and what was rejected and why")
    return parser


def _lanes(site: dict) -> str:
    """``in+4(s=2) out+4`` for a widened projection: lanes read and written ((0): cut off / zeros appended)."""
    parts = [f"in+{r['rank']}" + ("(0)" if r["zero"] else f"(s={r['scale']:g})") for r in site["reads"]]
    parts += [f"out+{w['rank']}" + ("(0)" if w["zero"] else "") for w in site["writes"]]
    return " ".join(parts)


def _sites_table(sites: list[dict], title: str) -> Table:
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
            _lanes(s) if widened else str(s["rank"]),
            "" if widened else f"{s['scale']:g}",
            s.get("group", ""),
            f"{s['in_features']}→{s['out_features']}",
            "yes" if s.get("bias") else "",
        )
    return table


def _print_rejections(console: Console, rejected: list[dict]) -> None:
    for r in rejected:
        console.print(f"[yellow]left unfused[/yellow] {r['node']}: {r['reason']}")


def _run_inspect(args, console: Console) -> int:
    from zflora_compile.api import detect_adapters

    detection = detect_adapters(args.model, max_rank_ratio=args.max_rank_ratio)
    sites = [s.to_json() for s in detection.all_sites]
    rejected = [r.to_json() for r in detection.rejections]
    if args.json:
        print(json.dumps({"model": str(args.model), "sites": sites, "rejected": rejected}, indent=2))
        return 0
    if not args.quiet:
        if sites:
            console.print(_sites_table(sites, f"{len(sites)} adapter site(s) in {args.model}"))
        else:
            console.print(f"no adapter sites found in {args.model}")
        _print_rejections(console, rejected)
    return 0


def _run_compile(args, console: Console, err_console: Console) -> int:
    output = args.output or default_output_dir(args.model, args.strategy)
    options = _compile_options(args)
    show = not (args.quiet or args.json) and err_console.is_terminal
    report = compile_file(args.model, output, options, progress=RichProgress(err_console) if show else NullProgress())
    _save_report(args, report)
    if args.json:
        print(json.dumps(report, indent=2))
    elif not args.quiet:
        _print_summary(console, report)
    return 0


def _compile_options(args) -> CompileOptions:
    """The options the flags ask for; bad ones fail here, before the compile, with an error report."""
    try:
        return CompileOptions(
            strategy=args.strategy,
            target=args.target,
            verify=args.verify,
            atol=args.atol,
            rtol=args.rtol,
            max_rank_ratio=args.max_rank_ratio,
            seed=args.seed,
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
            ),
            check_latency=args.check_latency,
        )
    except ZcompileError as error:
        report = Report({"strategy": args.strategy, "target": args.target, "verify": args.verify}, InputInfo(path=str(args.model)))
        report.fail(error)
        error.report = report.to_json()
        raise


def _print_summary(console: Console, report: dict) -> None:
    if report.get("sites"):
        console.print(_sites_table(report["sites"], f"{len(report['sites'])} adapter site(s)"))
    _print_rejections(console, report.get("rejected", []))
    verification = report.get("verification", {})
    if verification.get("passed"):
        worst = verification["worst"]
        console.print(f"verified: max abs diff {worst['max_abs_diff']:.3g} ('{worst['output']}', {worst.get('case', '')}) over {len(verification['cases'])} input case(s)")
    elif verification.get("skipped"):
        console.print("[yellow]verification skipped[/yellow] (--no-verify)")
    target = report.get("target", {})
    check = target.get("check")
    if check:
        console.print(f"{target['name']} artifact ({', '.join(target['artifacts'])}) matches model.onnx: max abs diff {check['max_abs_diff']:.3g} (atol {check['atol']:g})")
    if report.get("latency"):
        console.print(_latency_table(report["latency"]))
    console.print(f"{report['message']}; wrote {report['output']['dir']}")


def _latency_table(latency: dict) -> Table:
    emulated = " (HTP emulator: not NPU latency)" if latency.get("emulated") else ""
    table = Table(title=f"latency on {latency['target']}{emulated}: medians of interleaved runs")
    for column in ("phase", "variant", "median ms", "min ms", "max ms", "x base"):
        table.add_column(column, justify="left" if column in ("phase", "variant") else "right")
    for name, phase in latency["phases"].items():
        for index, (variant, stats) in enumerate(phase["variants"].items()):
            label = f"{name} ({phase['seq']} tok, past {phase['past']})" if index == 0 else ""
            table.add_row(label, variant, f"{stats['median_ms']:.3f}", f"{stats['min_ms']:.3f}", f"{stats['max_ms']:.3f}", f"{stats['ratio_to_base']:.3f}")
    verdict = "[green]passed[/green]" if latency["passed"] else "[red]FAILED[/red]"
    table.caption = f"gate {verdict}: worst fused overhead {latency['worst_overhead_pct']:+.1f}% (max {latency['max_overhead_pct']:g}%)"
    return table


def _save_report(args, report: dict | None) -> None:
    if getattr(args, "report", None) is not None and report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in SUBCOMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "compile")
    args = build_parser().parse_args(argv)
    console = Console(highlight=False)
    err_console = Console(stderr=True, highlight=False)
    try:
        if args.command == "inspect":
            return _run_inspect(args, console)
        return _run_compile(args, console, err_console)
    except ZcompileError as error:
        report = getattr(error, "report", None)
        _save_report(args, report)
        if args.json and report is not None:
            print(json.dumps(report, indent=2))
        elif report is not None and report.get("latency") and not args.quiet:
            console.print(_latency_table(report["latency"]))
        print(f"zcompile: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("zcompile: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - a bug: one line, traceback with --debug
        if args.debug:
            traceback.print_exc()
        print(f"zcompile: internal error: {type(error).__name__}: {first_line(error)} (rerun with --debug for a traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
