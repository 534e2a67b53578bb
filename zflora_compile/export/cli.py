"""``zcompile export {peft,bdlora-tp,hf-zflora}``: ``register(subparsers)`` for the main CLI, and
``main(argv)`` for ``python -m zflora_compile.export``.

``register`` adds the ``export`` parser and sets ``args.run`` (``run(args) -> exit code``).
Errors: a ``ZcompileError`` (``InputError``: exit 2) or an ``OSError`` prints one line on stderr;
nothing is written (each exporter builds its output in a temp dir next to it and renames it).
"""

from __future__ import annotations

import argparse
import sys

PROG = "zcompile export"


def _add_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="export_command", required=True, metavar="{peft,bdlora-tp,hf-zflora}")
    force = argparse.ArgumentParser(add_help=False)
    force.add_argument("--force", action="store_true", help="replace OUT if it exists")

    p = sub.add_parser("peft", parents=[force], help="engine-neutral PEFT LoRA: true per-module scale folded into lora_B, config scale 1")
    p.add_argument("adapter", help="PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors or .bin)")
    p.add_argument("-o", "--output", required=True, help="output adapter directory")
    p.add_argument("--uniform-rank", action="store_true", help="zero-pad every module to the largest rank, so no rank_pattern is needed")

    p = sub.add_parser("bdlora-tp", parents=[force], help="BD-LoRA: one rank-r/N LoRA per tensor-parallel shard, a manifest, and a densified plain LoRA")
    p.add_argument("adapter", help="PEFT BD-LoRA adapter directory (LoraConfig(use_bdlora=...))")
    p.add_argument("--shards", type=int, required=True, help="tensor-parallel degree N (the blocks must be block diagonal at N)")
    p.add_argument("-o", "--output", required=True, help="output directory: manifest.json, shard-<i>/, dense/")

    p = sub.add_parser("hf-zflora", parents=[force], help="fused zFLoRA as a standard Hugging Face checkpoint (hidden size d+r)")
    p.add_argument("adapter", help="zflora_compile zFLoRA adapter directory (save_adapters)")
    p.add_argument("--base", required=True, help="the base model's Hugging Face directory (config.json + weights)")
    p.add_argument("-o", "--output", required=True, help="output model directory (config.json + model.safetensors)")
    p.add_argument("--pad-to", type=int, default=None, metavar="MULTIPLE", help="zero-pad the hidden size d+r up to a multiple (quantisation group size; always also of num_attention_heads); exact")


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``export`` (with its sub-subcommands) to the main CLI's subparsers; ``args.run(args)`` runs it."""
    parser = subparsers.add_parser("export", help="export adapters for serving engines (PEFT neutral, BD-LoRA shards, zFLoRA checkpoint)")
    _add_commands(parser)
    parser.set_defaults(run=run)
    return parser


def _dispatch(args) -> list[str]:
    """Run the export; returns warning lines."""
    if args.export_command == "peft":
        from zflora_compile.export.peft_neutral import export_peft

        summary = export_peft(args.adapter, args.output, uniform_rank=args.uniform_rank, force=args.force)
        return [summary["note"]] if summary["note"].startswith("mixed") else []
    if args.export_command == "bdlora-tp":
        from zflora_compile.export.bdlora_tp import export_bdlora_tp

        export_bdlora_tp(args.adapter, args.output, shards=args.shards, force=args.force)
        return []
    from zflora_compile.export.hf_zflora import export_hf_zflora_dir

    export_hf_zflora_dir(args.adapter, args.base, args.output, pad_to=args.pad_to, force=args.force)
    return []


def run(args) -> int:
    """Run the parsed ``export`` command; one line on stderr and the error's exit code on failure."""
    from zflora_compile.errors import EnvironmentProblem, ZcompileError

    try:
        for line in _dispatch(args):
            print(f"{PROG}: warning: {line}", file=sys.stderr)
    except ZcompileError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:
        print(f"{PROG}: error: {EnvironmentProblem.from_os_error(error)}", file=sys.stderr)
        return 2
    print(f"{PROG}: wrote {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Export adapters for serving engines (docs/serving.md).")
    _add_commands(parser)
    args = parser.parse_args(argv)
    return run(args)
