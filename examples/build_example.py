"""Build the small adapted model the README's main command compiles.

A random-weight Llama-family decoder (hidden 128, 2 layers, 4 query / 2 key-value heads,
vocabulary 512) with a PEFT LoRA adapter (r=8, alpha=16) on all seven projections of every
layer, exported with ``torch.onnx.export(dynamo=True)`` with a key/value cache, the way
optimum and ONNX Runtime GenAI export decoders (``past_key_values.*`` in, ``present.*`` out).
The repository ships the result as ``examples/tiny_llama_lora.onnx`` so the main command runs
without torch; this script rebuilds it (needs the ``torch`` extra)::

    python examples/build_example.py [--out examples/tiny_llama_lora.onnx] [--exporter dynamo]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import onnx_ir as ir

from zflora_compile import zoo

CONFIG = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256, vocab_size=512)


def build(out: Path, exporter: str = "dynamo", seed: int = 0) -> Path:
    model = zoo.build_lora_model("llama", r=8, alpha=16, seed=seed, **CONFIG)
    with tempfile.TemporaryDirectory() as tmp:
        exported = zoo.export_onnx(model, Path(tmp) / "model.onnx", exporter=exporter, with_cache=True)
        onnx_model = ir.load(exported)
        out.parent.mkdir(parents=True, exist_ok=True)
        ir.save(onnx_model, out)  # one self-contained file: the weights are small
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("tiny_llama_lora.onnx"))
    parser.add_argument("--exporter", choices=zoo.EXPORTERS, default="dynamo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = build(args.out, args.exporter, args.seed)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
