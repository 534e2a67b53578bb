"""Train each adapter family on a tiny synthetic task on the CPU, save it, export it, inspect it.

    python examples/train_tiny.py                      # all families, ~1 minute each
    python examples/train_tiny.py --family zflora --steps 100 --out out/train_tiny

Task: modular arithmetic token sequences.  Every sequence starts at a random token in
``[0, M)`` and steps by a fixed ``K``: ``x[t+1] = (x[t] + K) mod M``.  The base model is a frozen
random tiny Llama (hidden 64, 2 layers), so everything it learns is in the adapter.  For each
family the script prints the loss as it falls, saves the adapter (safetensors + JSON), reloads
it onto a fresh base model and checks the logits, exports the unfused model to ONNX with the
dynamo exporter, runs ``zcompile inspect`` on the export, then ``zcompile`` itself: the trained
adapter is fused into widened projections (no GEMM of its own), verified against the unfused
export in ONNX Runtime, and written with its report.  Needs the torch extra.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import torch

from zflora_compile import cli, detect_adapters, zoo
from zflora_compile.adapters import (
    FAMILIES,
    AdapterConfig,
    attach_adapters,
    count_parameters,
    load_adapters,
    save_adapters,
    trainable_parameters,
)


def make_batch(gen: torch.Generator, *, batch: int, seq: int, modulus: int, step: int) -> torch.Tensor:
    start = torch.randint(0, modulus, (batch, 1), generator=gen)
    return (start + step * torch.arange(seq)) % modulus


def train_family(family: str, args, out_dir: pathlib.Path) -> dict:
    print(f"\n=== {family} ===")
    model = zoo.build_base_model(args.arch, seed=args.seed, initializer_range=args.init_range)
    torch.manual_seed(args.seed)
    model = attach_adapters(model, AdapterConfig(family=family, rank=args.rank, alpha=args.alpha))
    adapter_params, all_params = count_parameters(model)
    print(f"{adapter_params} adapter parameters ({100 * adapter_params / all_params:.1f}% of {all_params}), base frozen")

    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    model.train()
    losses = []
    report_every = max(1, args.steps // 10)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids = make_batch(gen, batch=args.batch, seq=args.seq, modulus=args.modulus, step=args.k)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step == 1 or step % report_every == 0 or step == args.steps:
            window = losses[-report_every:]
            print(f"step {step:4d}  loss {sum(window) / len(window):.4f}")
    model.eval()
    elapsed = time.perf_counter() - started
    head = max(1, min(5, len(losses) // 4))
    first, last = sum(losses[:head]) / head, sum(losses[-head:]) / head
    print(f"loss {first:.4f} -> {last:.4f} in {elapsed:.1f}s (chance level {math.log(args.modulus):.2f} over the {args.modulus} tokens used)")

    family_dir = out_dir / family
    adapter_dir = save_adapters(model, family_dir / "adapter")
    fresh = zoo.build_base_model(args.arch, seed=args.seed, initializer_range=args.init_range)
    reloaded = load_adapters(fresh, adapter_dir).eval()
    check = make_batch(gen, batch=2, seq=args.seq, modulus=args.modulus, step=args.k)
    with torch.no_grad():
        reload_diff = (model(input_ids=check).logits - reloaded(input_ids=check).logits).abs().max().item()
    print(f"saved {adapter_dir} (reloaded onto a fresh base: max abs logit diff {reload_diff:.2e})")

    onnx_path = zoo.export_onnx(model, family_dir / "model.onnx", exporter="dynamo")
    print(f"exported the unfused model: {onnx_path}")
    cli.main(["inspect", str(onnx_path)])
    sites = detect_adapters(str(onnx_path)).all_sites
    fused_dir = family_dir / "fused"
    code = cli.main([str(onnx_path), "-o", str(fused_dir), "--force", "--quiet"])
    report = json.loads((fused_dir / "report.json").read_text()) if code == 0 else {}
    verification = report.get("verification", {})
    print(
        f"zcompile {onnx_path} -o {fused_dir}: exit {code}; {report.get('message', 'failed')}; "
        f"verified against the unfused export: {verification.get('passed')} (max abs diff {verification.get('worst', {}).get('max_abs_diff', float('nan')):.2e})"
    )
    return {
        "family": family,
        "losses": losses,
        "first_loss": first,
        "last_loss": last,
        "reload_diff": reload_diff,
        "adapter_dir": adapter_dir,
        "onnx": onnx_path,
        "sites": len(sites),
        "compile_exit": code,
        "report": report,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=(*FAMILIES, "all"), default="all")
    parser.add_argument("--arch", choices=("llama", "mistral", "qwen2"), default="llama")
    parser.add_argument(
        "--init-range",
        type=float,
        default=0.2,
        help="std of the random base weights (HF's 0.02 makes the frozen LM head's logits too flat for FFA, "
        "whose output reaches the logits only through the final norm)",
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--modulus", type=int, default=32, help="tokens used: 0..M-1")
    parser.add_argument("--k", type=int, default=3, help="the step of the sequences")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/train_tiny"))
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    families = FAMILIES if args.family == "all" else (args.family,)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    return [train_family(family, args, args.out) for family in families]


if __name__ == "__main__":
    results = main()
    sys.exit(0 if all(r["last_loss"] < r["first_loss"] for r in results) else 1)
