"""Llama-shaped decoders with LoRA at real sizes, written straight to ONNX with streamed weights.

:func:`build_onnx` writes a runnable prefill decoder (``input_ids``, ``attention_mask``,
``position_ids`` -> ``logits``; embedding ``Gather``, RMSNorm, RoPE, grouped-query attention
with a causal and padding mask, SwiGLU MLP, untied LM head) in the unfused PEFT LoRA form
``y = x @ W + s * ((x @ A) @ B)`` on all seven projections, with every weight in one external
data file. Each tensor is generated and written in row chunks, so the builder's memory is a few
chunks whatever the model's size.

Every tensor is a pure function of ``(config.seed, tensor name, chunk index)``
(:func:`tensor_chunks`): :func:`build_peft_model` fills a transformers ``LlamaForCausalLM`` with a
PEFT LoRA adapter from the same generator, so both sides hold the same numbers. ONNX weights are
``[in, out]`` (``t @ W``); PyTorch's are their transposes.

The graph follows transformers' eager Llama: RMSNorm in fp32 then cast back and scaled; cos/sin
in fp32 cast to the model's dtype; scores ``(q @ k^T) * head_dim^-0.5`` in the model's dtype, the
mask added and the softmax taken in fp32. RoPE is the plain ``default`` kind with theta 500000
(Llama 3's theta, without its ``llama3`` long-context frequency scaling: a numerical detail that
changes no shape or op count).

Command line (used by ``compile_scale.py`` to measure the builder in a child process)::

    python benchmarks/scale_models.py build --size 1b --out DIR          # DIR/model.onnx + model.onnx.data
    python benchmarks/scale_models.py peft-merge --size 1b --out DIR     # merge_and_unload + dynamo export
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18
IR_VERSION = 9
ALIGN = 4096  # external data offsets aligned to the page size, so ONNX Runtime can mmap them
CHUNK_ELEMENTS = 1 << 22  # ~4M elements per generated chunk (16 MB in fp32)
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
DATA_NAME = "model.onnx.data"


@dataclasses.dataclass(frozen=True)
class ScaleConfig:
    """Shapes of a Llama-family decoder and its LoRA adapter (alpha / r is the scale)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    rank: int = 16
    alpha: int = 32
    dtype: str = "float16"
    seed: int = 0
    std: float = 0.02
    rope_theta: float = 500000.0
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def with_(self, **changes) -> "ScaleConfig":
        return dataclasses.replace(self, **changes)


# Llama-3.2-3B ties its LM head to the embedding in reality; here every size has an untied head
# (one more vocab x hidden matrix: 0.39 B parameters, 0.79 GB fp16 at 3B).
SIZES = {
    "1b": ScaleConfig("llama-3.2-1b", hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256),
    "3b": ScaleConfig("llama-3.2-3b", hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192, vocab=128256),
    "8b": ScaleConfig("llama-3.1-8b", hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256),
    "tiny": ScaleConfig("tiny", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=256, rank=4, alpha=8),
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One weight in ONNX layout: ``kind`` "normal" (N(0, std)) or "norm" (1 + N(0, std))."""

    name: str
    shape: tuple[int, ...]
    kind: str = "normal"

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))


def projection_shapes(cfg: ScaleConfig) -> dict[str, tuple[int, int]]:
    """``(in, out)`` of the seven projections."""
    q, kv = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    h, f = cfg.hidden, cfg.intermediate
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}


def proj_name(layer: int, proj: str) -> str:
    block = "self_attn" if proj in ATTN_PROJ else "mlp"
    return f"model.layers.{layer}.{block}.{proj}"


def tensor_specs(cfg: ScaleConfig) -> list[TensorSpec]:
    """Every weight of the model, in the order it is written to the data file."""
    specs = [TensorSpec("model.embed_tokens.weight", (cfg.vocab, cfg.hidden))]
    for layer in range(cfg.layers):
        specs.append(TensorSpec(f"model.layers.{layer}.input_layernorm.weight", (cfg.hidden,), "norm"))
        specs.append(TensorSpec(f"model.layers.{layer}.post_attention_layernorm.weight", (cfg.hidden,), "norm"))
        for proj, (fan_in, fan_out) in projection_shapes(cfg).items():
            stem = proj_name(layer, proj)
            specs.append(TensorSpec(f"{stem}.weight", (fan_in, fan_out)))
            specs.append(TensorSpec(f"{stem}.lora_A.default.weight", (fan_in, cfg.rank)))
            specs.append(TensorSpec(f"{stem}.lora_B.default.weight", (cfg.rank, fan_out)))
    specs.append(TensorSpec("model.norm.weight", (cfg.hidden,), "norm"))
    specs.append(TensorSpec("lm_head.weight", (cfg.hidden, cfg.vocab)))
    return specs


def parameter_count(cfg: ScaleConfig) -> int:
    return sum(spec.numel for spec in tensor_specs(cfg))


def model_bytes(cfg: ScaleConfig) -> int:
    """Bytes of the weights (the external data file, less its alignment padding)."""
    return parameter_count(cfg) * np.dtype(cfg.dtype).itemsize


def rows_per_chunk(spec: TensorSpec) -> int:
    """Rows of ``spec`` generated at a time: fixed by its shape, so every reader cuts the same chunks."""
    row = int(np.prod(spec.shape[1:])) if len(spec.shape) > 1 else spec.shape[0]
    return max(1, CHUNK_ELEMENTS // max(row, 1))


def tensor_chunks(spec: TensorSpec, cfg: ScaleConfig) -> Iterator[np.ndarray]:
    """``spec``'s values, row chunk by row chunk, in ``cfg.dtype``; chunk ``i`` is drawn from a
    Generator seeded with ``(cfg.seed, crc32(name), i)``: the same numbers for any reader."""
    rows = spec.shape[0] if len(spec.shape) > 1 else 1
    step = rows_per_chunk(spec) if len(spec.shape) > 1 else 1
    key = zlib.crc32(spec.name.encode())
    for index, start in enumerate(range(0, rows, step)):
        shape = (min(step, rows - start), *spec.shape[1:]) if len(spec.shape) > 1 else spec.shape
        rng = np.random.default_rng([cfg.seed, key, index])
        values = rng.standard_normal(shape, dtype=np.float32)
        values *= np.float32(cfg.std)
        if spec.kind == "norm":
            values += np.float32(1.0)
        yield values.astype(cfg.dtype, copy=False)


def tensor_array(spec: TensorSpec, cfg: ScaleConfig) -> np.ndarray:
    """The whole tensor (for the PyTorch side and small models)."""
    return np.concatenate(list(tensor_chunks(spec, cfg)), axis=0).reshape(spec.shape)


# ----------------------------------------------------------------------------------------- graph


class Graph:
    """Nodes and small inline constants of the decoder being written."""

    def __init__(self, cfg: ScaleConfig):
        self.cfg = cfg
        self.dtype = helper.np_dtype_to_tensor_dtype(np.dtype(cfg.dtype))
        self.nodes: list[onnx.NodeProto] = []
        self.constants: list[TensorProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self._names: dict[str, int] = {}

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        count = self._names.get(name, 0)
        self._names[name] = count + 1
        unique = name if count == 0 else f"{name}_{count}"
        output = f"{unique}_out"
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=unique, **attrs))
        return output

    def declare(self, value: str, elem_type: int, dims: list) -> str:
        """Record ``value``'s shape with symbolic dims, as exporters do: ONNX shape inference cannot
        know that a ``Range`` to the sequence length, or a ``Reshape`` with -1, has the sequence's
        size, and tools that cut the graph into regions need every boundary's shape."""
        self.value_info.append(helper.make_tensor_value_info(value, elem_type, dims))
        return value

    def const(self, name: str, array) -> str:
        self.constants.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def cast(self, x: str, to: int, name: str) -> str:
        """``Cast`` unless ``x`` already has that type (``to`` is the model's dtype and fp32)."""
        return x if to == self.dtype == TensorProto.FLOAT else self.op("Cast", [x], name, to=to)


def rms_norm(g: Graph, x: str, weight: str, stem: str) -> str:
    """transformers' LlamaRMSNorm: fp32 ``x * rsqrt(mean(x^2) + eps)``, cast back, times weight."""
    x32 = g.cast(x, TensorProto.FLOAT, f"{stem}/CastUp")
    var = g.op("ReduceMean", [g.op("Mul", [x32, x32], f"{stem}/Square"), "const.axes_last"], f"{stem}/ReduceMean", keepdims=1)
    inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, "const.eps"], f"{stem}/AddEps")], f"{stem}/Sqrt")], f"{stem}/Rsqrt")
    normed = g.cast(g.op("Mul", [x32, inv], f"{stem}/Normalize"), g.dtype, f"{stem}/CastDown")
    return g.op("Mul", [weight, normed], f"{stem}/Scale")


def projection(g: Graph, x: str, stem: str) -> str:
    """``x @ W + s * ((x @ A) @ B)``: PEFT's unfused LoRA linear, weights ``[in, out]``."""
    base = g.op("MatMul", [x, f"{stem}.weight"], f"{stem}/MatMul")
    low = g.op("MatMul", [x, f"{stem}.lora_A.default.weight"], f"{stem}/lora_A/MatMul")
    up = g.op("MatMul", [low, f"{stem}.lora_B.default.weight"], f"{stem}/lora_B/MatMul")
    scaled = g.op("Mul", [up, "const.lora_scale"], f"{stem}/Mul")
    return g.op("Add", [base, scaled], f"{stem}/Add")


def rotate(g: Graph, x: str, stem: str) -> str:
    """RoPE on ``x`` [b, heads, s, hd]: ``x * cos + rotate_half(x) * sin``."""
    x1 = g.op("Slice", [x, "const.zero1", "const.half1", "const.axis3"], f"{stem}/Slice1")
    x2 = g.op("Slice", [x, "const.half1", "const.hd1", "const.axis3"], f"{stem}/Slice2")
    rotated = g.op("Concat", [g.op("Neg", [x2], f"{stem}/Neg"), x1], f"{stem}/RotateHalf", axis=-1)
    return g.op("Add", [g.op("Mul", [x, "rope.cos"], f"{stem}/MulCos"), g.op("Mul", [rotated, "rope.sin"], f"{stem}/MulSin")], f"{stem}/Rope")


def heads(g: Graph, x: str, shape: str, stem: str) -> str:
    """[b, s, n*hd] -> [b, n, s, hd]."""
    return g.op("Transpose", [g.op("Reshape", [x, shape], f"{stem}/Reshape")], f"{stem}/Transpose", perm=[0, 2, 1, 3])


def repeat_kv(g: Graph, x: str, stem: str) -> str:
    """GQA: [b, kv, s, hd] -> [b, heads, s, hd] (each kv head repeated heads/kv times, as repeat_kv)."""
    if g.cfg.heads == g.cfg.kv_heads:
        return x
    grown = g.op("Expand", [g.op("Unsqueeze", [x, "const.axis2"], f"{stem}/Unsqueeze"), "const.rep_shape"], f"{stem}/Expand")
    out = g.op("Reshape", [grown, "const.rep_heads"], f"{stem}/Reshape")
    return g.declare(out, g.dtype, ["batch", g.cfg.heads, "sequence_length", g.cfg.head_dim])


def attention(g: Graph, x: str, layer: int) -> str:
    """Self-attention of one layer on the normed hidden states ``x``; returns o_proj's output."""
    stem = f"model.layers.{layer}.self_attn"
    q = rotate(g, heads(g, projection(g, x, f"{stem}.q_proj"), "const.q_heads", f"{stem}/q"), f"{stem}/q")
    k = rotate(g, heads(g, projection(g, x, f"{stem}.k_proj"), "const.kv_heads", f"{stem}/k"), f"{stem}/k")
    v = heads(g, projection(g, x, f"{stem}.v_proj"), "const.kv_heads", f"{stem}/v")
    k, v = repeat_kv(g, k, f"{stem}/k"), repeat_kv(g, v, f"{stem}/v")
    k_t = g.op("Transpose", [k], f"{stem}/kT", perm=[0, 1, 3, 2])
    scores = g.op("Mul", [g.op("MatMul", [q, k_t], f"{stem}/QK"), "const.attn_scale"], f"{stem}/Scale")
    masked = g.op("Add", [g.cast(scores, TensorProto.FLOAT, f"{stem}/CastScores"), "mask.bias"], f"{stem}/Mask")
    probs = g.cast(g.op("Softmax", [masked], f"{stem}/Softmax", axis=-1), g.dtype, f"{stem}/CastProbs")
    context = g.op("Transpose", [g.op("MatMul", [probs, v], f"{stem}/PV")], f"{stem}/ContextT", perm=[0, 2, 1, 3])
    merged = g.op("Reshape", [context, "const.merge_heads"], f"{stem}/Merge")
    return projection(g, merged, f"{stem}.o_proj")


def mlp(g: Graph, x: str, layer: int) -> str:
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    stem = f"model.layers.{layer}.mlp"
    gate = projection(g, x, f"{stem}.gate_proj")
    silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{stem}/Sigmoid")], f"{stem}/SiLU")
    return projection(g, g.op("Mul", [silu, projection(g, x, f"{stem}.up_proj")], f"{stem}/GateUp"), f"{stem}.down_proj")


def add_constants(g: Graph) -> None:
    """Shapes, axes and scalars the decoder's nodes read (inline, a few bytes each)."""
    cfg, np_dtype = g.cfg, np.dtype(g.cfg.dtype)
    hd = cfg.head_dim
    i64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
    for name, value in {
        "const.axes_last": i64(-1), "const.axis1": i64(1), "const.axis2": i64(2), "const.axis3": i64(3),
        "const.axes12": i64(1, 2), "const.axis0": i64(0), "const.zero1": i64(0), "const.half1": i64(hd // 2), "const.hd1": i64(hd),
        "const.q_heads": i64(0, 0, cfg.heads, hd), "const.kv_heads": i64(0, 0, cfg.kv_heads, hd),
        "const.rep_shape": i64(1, 1, cfg.heads // cfg.kv_heads, 1, 1), "const.rep_heads": i64(0, cfg.heads, -1, hd),
        "const.merge_heads": i64(0, 0, cfg.heads * hd),
        "const.zero": np.array(0, np.int64), "const.one": np.array(1, np.int64),
    }.items():
        g.const(name, value)
    g.const("const.eps", np.array(cfg.eps, np.float32))
    g.const("const.lora_scale", np.array(cfg.scale, np_dtype))
    g.const("const.attn_scale", np.array(hd**-0.5, np_dtype))
    g.const("rope.inv_freq", (1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd))).astype(np.float32))
    g.const("const.fzero", np.array(0.0, np.float32))
    g.const("const.fmin", np.array(np.finfo(np.float32).min, np.float32))


def rope_tables(g: Graph) -> None:
    """``rope.cos`` / ``rope.sin`` [b, 1, s, hd] from ``position_ids``, as LlamaRotaryEmbedding."""
    pos = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], "rope/CastPos", to=TensorProto.FLOAT), "const.axes_last"], "rope/Unsqueeze")
    freqs = g.op("Mul", [pos, "rope.inv_freq"], "rope/Freqs")
    emb = g.op("Concat", [freqs, freqs], "rope/Concat", axis=-1)
    for fn in ("Cos", "Sin"):
        table = g.cast(g.op(fn, [emb], f"rope/{fn}"), g.dtype, f"rope/Cast{fn}")
        g.nodes.append(helper.make_node("Unsqueeze", [table, "const.axis1"], [f"rope.{fn.lower()}"], name=f"rope/Unsqueeze{fn}"))


def mask_bias(g: Graph) -> None:
    """``mask.bias`` [b, 1, s, s] fp32: 0 where key j <= query i and attention_mask[j], else fp32 min."""
    seq = g.op("Gather", [g.op("Shape", ["input_ids"], "mask/Shape"), "const.one"], "mask/SeqLen", axis=0)
    idx = g.declare(g.op("Range", ["const.zero", seq, "const.one"], "mask/Range"), TensorProto.INT64, ["sequence_length"])
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [idx, "const.axis0"], "mask/Cols"), g.op("Unsqueeze", [idx, "const.axis1"], "mask/Rows")], "mask/Causal")
    padding = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], "mask/CastBool", to=TensorProto.BOOL), "const.axes12"], "mask/Padding")
    allowed = g.op("And", [causal, padding], "mask/Allowed")
    g.nodes.append(helper.make_node("Where", [allowed, "const.fzero", "const.fmin"], ["mask.bias"], name="mask/Where"))


def decoder_graph(cfg: ScaleConfig) -> Graph:
    """All nodes of the decoder (weights referenced by name, written separately)."""
    g = Graph(cfg)
    add_constants(g)
    rope_tables(g)
    mask_bias(g)
    hidden = g.op("Gather", ["model.embed_tokens.weight", "input_ids"], "model.embed_tokens/Gather", axis=0)
    for layer in range(cfg.layers):
        stem = f"model.layers.{layer}"
        normed = rms_norm(g, hidden, f"{stem}.input_layernorm.weight", f"{stem}/input_layernorm")
        hidden = g.op("Add", [hidden, attention(g, normed, layer)], f"{stem}/AddAttn")
        normed = rms_norm(g, hidden, f"{stem}.post_attention_layernorm.weight", f"{stem}/post_attention_layernorm")
        hidden = g.op("Add", [hidden, mlp(g, normed, layer)], f"{stem}/AddMlp")
    final = rms_norm(g, hidden, "model.norm.weight", "model.norm")
    g.nodes.append(helper.make_node("MatMul", [final, "lm_head.weight"], ["logits"], name="lm_head/MatMul"))
    return g


# ---------------------------------------------------------------------------------------- writer


def write_weights(cfg: ScaleConfig, data_path: Path) -> list[TensorProto]:
    """Generate every weight chunk by chunk into ``data_path``; return external-data TensorProtos."""
    dtype = helper.np_dtype_to_tensor_dtype(np.dtype(cfg.dtype))
    protos = []
    with open(data_path, "wb") as f:
        for spec in tensor_specs(cfg):
            offset = f.tell()
            if offset % ALIGN:
                offset += ALIGN - offset % ALIGN
                f.seek(offset)
            for chunk in tensor_chunks(spec, cfg):
                f.write(np.ascontiguousarray(chunk).data)
            length = f.tell() - offset
            tensor = TensorProto(name=spec.name, data_type=dtype, dims=list(spec.shape), data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            protos.append(tensor)
        f.flush()
        os.fsync(f.fileno())
    return protos


def build_onnx(cfg: ScaleConfig, out_dir: Path) -> Path:
    """Write ``out_dir/model.onnx`` + ``model.onnx.data``; returns the model's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    g = decoder_graph(cfg)
    weights = write_weights(cfg, out_dir / DATA_NAME)
    dtype = g.dtype
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence_length"]) for n in ("input_ids", "attention_mask", "position_ids")]
    outputs = [helper.make_tensor_value_info("logits", dtype, ["batch", "sequence_length", cfg.vocab])]
    graph = helper.make_graph(g.nodes, f"{cfg.name}-lora-r{cfg.rank}", inputs, outputs, initializer=g.constants + weights, value_info=g.value_info)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION, producer_name="benchmarks.scale_models")
    path = out_dir / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


# --------------------------------------------------------------------------------- torch / PEFT


def transformers_config(cfg: ScaleConfig):
    import transformers

    return transformers.LlamaConfig(
        hidden_size=cfg.hidden, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        intermediate_size=cfg.intermediate, vocab_size=cfg.vocab, rms_norm_eps=cfg.eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=8192, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        attn_implementation="eager", pad_token_id=None, bos_token_id=None, eos_token_id=None,
    )


def _torch_value(spec: TensorSpec, cfg: ScaleConfig, torch_dtype):
    """``spec``'s tensor in PyTorch layout: linear weights (2-D, but not the embedding) transposed."""
    import torch

    array = tensor_array(spec, cfg)
    if array.ndim == 2 and spec.name != "model.embed_tokens.weight":
        array = np.ascontiguousarray(array.T)
    return torch.from_numpy(array).to(torch_dtype)


def build_peft_model(cfg: ScaleConfig, torch_dtype=None):
    """A transformers LlamaForCausalLM + PEFT LoRA (r, alpha, all seven projections) holding the
    generator's numbers (the ONNX builder's, transposed). Allocated empty, then filled tensor by
    tensor (peak: the model plus one tensor)."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    torch_dtype = torch_dtype or getattr(torch, cfg.dtype)
    config = transformers_config(cfg)
    with torch.device("meta"):
        base = transformers.LlamaForCausalLM(config)
    base = base.to(torch_dtype).to_empty(device="cpu")
    base.model.rotary_emb = LlamaRotaryEmbedding(config)  # its inv_freq buffer is computed, not a weight
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=list(ATTN_PROJ + MLP_PROJ), init_lora_weights=False)
    model = get_peft_model(base, lora)
    params = dict(model.named_parameters())
    filled = set()
    with torch.no_grad():
        for spec in tensor_specs(cfg):
            name = peft_parameter_name(spec.name)
            params[name].copy_(_torch_value(spec, cfg, torch_dtype))
            filled.add(name)
    missing = set(params) - filled
    if missing:
        raise RuntimeError(f"parameters the generator did not fill: {sorted(missing)[:5]}")
    return model.eval()


def peft_parameter_name(name: str) -> str:
    """The PeftModel parameter that holds generator tensor ``name``."""
    if ".lora_" not in name and name.endswith("_proj.weight"):
        name = name[: -len("weight")] + "base_layer.weight"
    return "base_model.model." + name


# ------------------------------------------------------------------------------------ children


def peft_merge_export(cfg: ScaleConfig, out_dir: Path) -> dict:
    """The user's merge without zcompile: build the PEFT model (same weights), ``merge_and_unload()``,
    then a fresh ``torch.onnx.export(..., dynamo=True)`` with external data (``zoo.export_onnx``,
    prefill graph: input_ids, attention_mask -> logits). Returns the seconds of each phase."""
    import torch

    from zflora_compile import zoo

    times = {}
    start = time.perf_counter()
    model = build_peft_model(cfg)
    times["build_peft_model_s"] = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        merged = model.merge_and_unload()
    del model
    times["merge_and_unload_s"] = time.perf_counter() - start
    start = time.perf_counter()
    path = zoo.export_onnx(merged, Path(out_dir) / "model.onnx")
    times["export_s"] = time.perf_counter() - start
    times["merge_plus_export_s"] = times["merge_and_unload_s"] + times["export_s"]
    return {"phases_s": {k: round(v, 3) for k, v in times.items()}, "model": str(path)}


def _config_from_args(args) -> ScaleConfig:
    cfg = SIZES[args.size]
    changes = {"dtype": args.dtype} if args.dtype else {}
    if args.layers:
        changes["layers"] = args.layers
    return cfg.with_(**changes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="build a Llama-shaped LoRA decoder (ONNX, streamed) or run PEFT merge + export")
    parser.add_argument("command", choices=("build", "peft-merge"))
    parser.add_argument("--size", choices=sorted(SIZES), required=True)
    parser.add_argument("--dtype", choices=("float16", "float32"))
    parser.add_argument("--layers", type=int, help="override the layer count (tests)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--result", type=Path, help="write the phases' seconds here as JSON")
    args = parser.parse_args(argv)
    cfg = _config_from_args(args)
    start = time.perf_counter()
    if args.command == "build":
        result = {"model": str(build_onnx(cfg, args.out))}
    else:
        result = peft_merge_export(cfg, args.out)
    result["total_s"] = round(time.perf_counter() - start, 3)
    if args.result:
        args.result.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
