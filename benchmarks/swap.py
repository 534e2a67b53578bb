"""Swap adapters into one compiled model vs compiling each adapted model from scratch.

A tiny Llama (``--hidden``, ``--layers``; seeded random base) with a PEFT LoRA of rank
``--base-rank`` on every projection is exported (dynamo) and compiled once with
``--max-rank`` (``compile_file``, strategy fuse, target ort, verification on). Then for each of
``--adapters`` new PEFT LoRA adapters on the same base (ranks cycling through ``--ranks``, each
drawn from its own seed; saved with ``save_pretrained`` and exported to ONNX, neither timed):

- swap: ``zflora_compile.swap.swap_file(compiled, peft_dir, out)``, the whole ``zcompile swap``
  (load, map, rewrite the adapter tensors, write, verify against the numpy-merged reference);
  also ``swap_no_verify`` (``--no-verify``);
- compile: ``compile_file(adapter.onnx, out)``, the whole ``zcompile`` of the adapted export
  (detect, plan, rewrite, verify, build the ORT target's optimized model);
- ratio: compile / swap; max |diff|: the swapped model's logits against the from-scratch compile's
  (ONNX Runtime CPU, seeded token ids, sequence lengths 1, 7 and 16).

Prints a table, saves JSON (``--out``, default ``benchmarks/results/swap.json``) with the machine,
versions, settings, every adapter's figures and the medians.

    python benchmarks/swap.py                          # 5 adapters, hidden 512, 8 layers
    python benchmarks/swap.py --quick --out /tmp/s.json   # 4 adapters, hidden 64, 1 layer
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "swap.json"
SEQ_LENS = (1, 7, 16)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--base-rank", type=int, default=8)
    parser.add_argument("--max-rank", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=5)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 12, 16])
    parser.add_argument("--quick", action="store_true", help="hidden 64, 1 layer, 4 adapters (ranks 2 4 6 8, max rank 8)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.base_rank, args.max_rank, args.adapters, args.ranks = 64, 1, 4, 8, 4, [2, 4, 6, 8]
    if args.adapters < 4:
        parser.error("--adapters must be >= 4")
    if max(args.ranks) > args.max_rank:
        parser.error(f"--ranks must be <= --max-rank {args.max_rank}")
    return args


def logits(path: Path, vocab: int) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    outs = []
    for seq in SEQ_LENS:
        feeds = {"input_ids": rng.integers(0, vocab, size=(1, seq)).astype(np.int64), "attention_mask": np.ones((1, seq), np.int64)}
        outs.append(session.run(None, feeds)[0])
    return outs


def main(argv=None) -> int:
    args = parse_args(argv)
    import onnxruntime
    import torch
    from rich.console import Console
    from rich.table import Table

    from zflora_compile import __version__, zoo
    from zflora_compile.build import compile_file
    from zflora_compile.latency import machine_info
    from zflora_compile.options import CompileOptions
    from zflora_compile.swap import swap_file

    console = Console()
    config = dict(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="zflora-swap-bench-") as tmp:
        tmp = Path(tmp)

        def adapted(rank: int, seed: int):
            model = zoo.build_lora_model(r=rank, alpha=2 * rank, seed=0, **config)  # the seed-0 base
            zoo._randomize_lora(model, seed)
            return model

        base_onnx = zoo.export_onnx(adapted(args.base_rank, 1), tmp / "base" / "model.onnx")
        start = time.perf_counter()
        compile_file(base_onnx, tmp / "compiled", CompileOptions(max_rank=args.max_rank))
        compile_padded_s = time.perf_counter() - start
        compiled = tmp / "compiled" / "model.onnx"
        for index in range(args.adapters):
            rank, seed = args.ranks[index % len(args.ranks)], 100 + index
            model = adapted(rank, seed)
            peft_dir = tmp / f"adapter{index}"
            model.save_pretrained(peft_dir)
            onnx_path = zoo.export_onnx(model, tmp / f"export{index}" / "model.onnx")
            start = time.perf_counter()
            report = swap_file(compiled, peft_dir, tmp / f"swapped{index}")
            swap_s = time.perf_counter() - start
            start = time.perf_counter()
            swap_file(compiled, peft_dir, tmp / f"swapped_nv{index}", verify=False)
            swap_nv_s = time.perf_counter() - start
            start = time.perf_counter()
            compile_file(onnx_path, tmp / f"scratch{index}", CompileOptions())
            compile_s = time.perf_counter() - start
            got, want = logits(tmp / f"swapped{index}" / "model.onnx", 512), logits(tmp / f"scratch{index}" / "model.onnx", 512)
            diff = max(float(np.abs(a - b).max()) for a, b in zip(got, want))
            rows.append({
                "adapter": index, "rank": rank, "seed": seed,
                "swap_s": round(swap_s, 4), "swap_no_verify_s": round(swap_nv_s, 4), "compile_s": round(compile_s, 4),
                "ratio": round(compile_s / swap_s, 2), "ratio_no_verify": round(compile_s / swap_nv_s, 2),
                "max_abs_diff": diff, "swap_verification_max_abs_diff": report["verification"]["worst"]["max_abs_diff"],
            })
            del model
    table = Table(title=f"swap vs compile from scratch: hidden {args.hidden}, {args.layers} layer(s), LoRA on every projection, --max-rank {args.max_rank}")
    for column in ("adapter", "rank", "swap s", "swap s (no verify)", "compile s", "compile / swap", "max |diff| vs scratch"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["adapter"]), str(r["rank"]), f"{r['swap_s']:.3f}", f"{r['swap_no_verify_s']:.3f}", f"{r['compile_s']:.3f}", f"{r['ratio']:.1f}x", f"{r['max_abs_diff']:.3g}")
    medians = {key: statistics.median(r[key] for r in rows) for key in ("swap_s", "swap_no_verify_s", "compile_s", "ratio", "ratio_no_verify")}
    medians["max_abs_diff_max"] = max(r["max_abs_diff"] for r in rows)
    table.caption = f"medians: swap {medians['swap_s']:.3f} s ({medians['swap_no_verify_s']:.3f} s without verification), compile {medians['compile_s']:.3f} s, compile/swap {medians['ratio']:.1f}x ({medians['ratio_no_verify']:.1f}x)"
    console.print(table)
    results = {
        "benchmark": "swap",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": {"zflora_compile": __version__, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "python": sys.version.split()[0]},
        "settings": {
            "quick": args.quick, "hidden": args.hidden, "layers": args.layers, "base_rank": args.base_rank, "max_rank": args.max_rank,
            "adapters": args.adapters, "ranks": args.ranks, "seq_lens": list(SEQ_LENS), "compile_padded_s": round(compile_padded_s, 4),
            "swap": "swap_file(compiled, peft_dir, out): the whole zcompile swap, verification against the numpy-merged reference included",
            "compile": "compile_file(adapter.onnx, out): the whole zcompile (fuse, verify, ORT target)",
        },
        "adapters": rows,
        "medians": medians,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {args.out} ({results['total_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
