"""``zcompile``: the command line.

    zcompile inspect MODEL                     table of adapter sites (and what was rejected, why)
    zcompile [compile] MODEL -o DIR [--strategy fuse|merge|strip] [--target ort]

Exit codes: 0 success (also when no adapter site is found), 1 verification failed,
2 unusable input or missing dependency, 3 internal error (a bug: please report it).
Subcommands share argument groups, in the manner of Polygraphy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import traceback
from pathlib import Path

from rich.console import Console
from rich.table import Table

from zflora_compile import __version__
from zflora_compile.compile import CompileOptions, compile_file, default_output_dir
from zflora_compile.errors import ZcompileError
from zflora_compile.passes.detect_onnx import DEFAULT_MAX_RANK_RATIO
from zflora_compile.passes.planner import STRATEGIES
from zflora_compile.targets import TARGETS
from zflora_compile.verify import TOLERANCES

SUBCOMMANDS = ("compile", "inspect")
EXIT_INTERNAL = 3


def _output_args() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("output")
    group.add_argument("--json", action="store_true", help="print the JSON report on stdout and nothing else")
    group.add_argument("-q", "--quiet", action="store_true", help="no progress or summary; errors only")
    group.add_argument("--debug", action="store_true", help="show a traceback for internal errors")
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
    group.add_argument("--target", choices=sorted(TARGETS), default="ort", help="runtime to build for (default %(default)s)")
    group.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    verify = parent.add_argument_group("verification")
    verify.add_argument("--no-verify", dest="verify", action="store_false", help="skip the ONNX Runtime comparison (not recommended)")
    defaults = ", ".join(f"{k} {a:g}/{r:g}" for k, (a, r) in TOLERANCES.items())
    verify.add_argument("--atol", type=float, help=f"absolute tolerance (default by dtype, atol/rtol: {defaults})")
    verify.add_argument("--rtol", type=float, help="relative tolerance (default by dtype)")
    verify.add_argument("--seed", type=int, default=0, help="seed for the synthesized inputs (default %(default)s)")
    return parent


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


@contextlib.contextmanager
def _quiet_step(_: str):
    yield


def _progress(console: Console, enabled: bool):
    if not enabled:
        return _quiet_step

    @contextlib.contextmanager
    def step(name: str):
        with console.status(f"[bold]{name}[/bold]…", spinner="dots"):
            yield
        console.print(f"[green]✓[/green] {name}")

    return step


def _sites_table(sites: list[dict], title: str) -> Table:
    table = Table(title=title)
    for column in ("site", "layer", "projection", "family", "rank", "scale", "group", "in→out", "bias"):
        table.add_column(column)
    for s in sites:
        table.add_row(
            s["id"],
            "" if s["layer"] is None else str(s["layer"]),
            s["projection"] or s["label"],
            s["family"],
            str(s["rank"]),
            f"{s['scale']:g}",
            s["group"],
            f"{s['in_features']}→{s['out_features']}",
            "yes" if s["bias"] else "",
        )
    return table


def _print_rejections(console: Console, rejected: list[dict]) -> None:
    for r in rejected:
        console.print(f"[yellow]left unfused[/yellow] {r['node']}: {r['reason']}")


def _run_inspect(args, console: Console) -> int:
    from zflora_compile.api import detect_adapters

    detection = detect_adapters(args.model, max_rank_ratio=args.max_rank_ratio)
    sites = [s.to_json() for s in detection.sites]
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
    options = CompileOptions(
        strategy=args.strategy,
        target=args.target,
        verify=args.verify,
        atol=args.atol,
        rtol=args.rtol,
        max_rank_ratio=args.max_rank_ratio,
        seed=args.seed,
        force=args.force,
    )
    show = not (args.quiet or args.json) and err_console.is_terminal
    report = compile_file(args.model, output, options, progress=_progress(err_console, show))
    if args.json:
        print(json.dumps(report, indent=2))
    elif not args.quiet:
        _print_summary(console, report)
    return 0


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
    console.print(f"{report['message']}; wrote {report['output']['dir']}")


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
        if args.json and report is not None:
            print(json.dumps(report, indent=2))
        print(f"zcompile: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("zcompile: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - a bug: one line, traceback with --debug
        if args.debug:
            traceback.print_exc()
        first = str(error).splitlines()[0] if str(error) else ""
        print(f"zcompile: internal error: {type(error).__name__}: {first} (rerun with --debug for a traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
