"""Hand-built ONNX graphs of adapter branches no named family knows, and their near-misses.

One projection ``y = x @ W (+ b) + branch(x)`` reading ``hidden`` ``[batch, seq, IN]`` (symbolic
batch and sequence). Each builder returns ``(model, numbers)`` where ``numbers`` holds the weights
and the dense update ``dW`` the branch is *meant* to compute, worked out here with numpy from the
definitions, never through the package: the independent references of the tests (strip = the
base ``x @ W + b``; merge = ``x @ (W + dW) + b``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18
IN, OUT = 8, 12


@dataclasses.dataclass
class Numbers:
    W: np.ndarray
    bias: np.ndarray | None
    delta: np.ndarray | None  # None: the branch is not linear (no dense update exists)
    table: np.ndarray | None = None  # embedding graphs: the base table


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _model(nodes, initializers: dict, *, inputs=None, out_width=OUT) -> onnx.ModelProto:
    inputs = inputs or [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", IN])]
    graph = helper.make_graph(
        nodes,
        "branch",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", out_width])],
        initializer=[numpy_helper.from_array(np.asarray(v), name=k) for k, v in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def _base(rng, bias: bool, out=OUT):
    W = rng.standard_normal((IN, out)).astype(np.float32) * 0.3
    b = rng.standard_normal(out).astype(np.float32) * 0.1 if bias else None
    nodes = [helper.make_node("MatMul", ["hidden", "W"], ["proj_mm"], name="proj")]
    inits = {"W": W}
    out_name = "proj_mm"
    if bias:
        nodes.append(helper.make_node("Add", ["proj_mm", "b"], ["proj_out"], name="proj_bias"))
        inits["b"] = b
        out_name = "proj_out"
    return W, b, nodes, inits, out_name


def gaws(seed: int = 0, *, groups: int = 4, bias: bool = False, shared_reshape_reader: bool = False):
    """``reshape(reshape(x, [.., g, IN/g]) @ V, [.., OUT])``: ``dW = kron(I_g, V)``."""
    rng = _rng(seed)
    W, b, nodes, inits, proj = _base(rng, bias)
    s_in, s_out = IN // groups, OUT // groups
    V = rng.standard_normal((s_in, s_out)).astype(np.float32) * 0.2
    inits.update(V=V, split_shape=np.array([0, 0, groups, s_in], dtype=np.int64), join_shape=np.array([0, 0, OUT], dtype=np.int64))
    nodes += [
        helper.make_node("Reshape", ["hidden", "split_shape"], ["grouped"], name="gaws_split"),
        helper.make_node("MatMul", ["grouped", "V"], ["grouped_out"], name="gaws_mm"),
        helper.make_node("Reshape", ["grouped_out", "join_shape"], ["gaws_out"], name="gaws_join"),
        helper.make_node("Add", [proj, "gaws_out"], ["y"], name="adapter_add"),
    ]
    return _model(nodes, inits), Numbers(W, b, np.kron(np.eye(groups, dtype=np.float32), V))


def gaws_d(seed: int = 0, *, block: int = 2):
    """``reshape(G @ reshape(x, [.., g_in, s]), [.., OUT])`` with ``G`` on the left: ``dW = kron(G^T, I_s)``."""
    rng = _rng(seed)
    W, b, nodes, inits, proj = _base(rng, False)
    g_in, g_out = IN // block, OUT // block
    G = rng.standard_normal((g_out, g_in)).astype(np.float32) * 0.3
    inits.update(G=G, split_shape=np.array([0, 0, g_in, block], dtype=np.int64), join_shape=np.array([0, 0, OUT], dtype=np.int64))
    nodes += [
        helper.make_node("Reshape", ["hidden", "split_shape"], ["blocks"], name="gawsd_split"),
        helper.make_node("MatMul", ["G", "blocks"], ["mixed"], name="gawsd_mm"),
        helper.make_node("Reshape", ["mixed", "join_shape"], ["gawsd_out"], name="gawsd_join"),
        helper.make_node("Add", [proj, "gawsd_out"], ["y"], name="adapter_add"),
    ]
    return _model(nodes, inits), Numbers(W, b, np.kron(G.T, np.eye(block, dtype=np.float32)))


def lokr(seed: int = 0):
    """A Kronecker factor built from constants by ops (left unfolded): ``x @ (kron(C, D) * s)``."""
    rng = _rng(seed)
    W, b, nodes, inits, proj = _base(rng, True)
    C = rng.standard_normal((2, 3)).astype(np.float32)
    D = rng.standard_normal((4, 4)).astype(np.float32) * 0.1
    # kron(C, D)[i*4+k, j*4+l] = C[i, j] * D[k, l]: Unsqueeze both to [2,1,3,1] x [1,4,1,4], Mul, Reshape
    inits.update(C4=C.reshape(2, 1, 3, 1), D4=D.reshape(1, 4, 1, 4), kron_shape=np.array([IN, OUT], dtype=np.int64), s=np.array(0.5, dtype=np.float32))
    nodes += [
        helper.make_node("Mul", ["C4", "D4"], ["kron4"], name="lokr_outer"),
        helper.make_node("Reshape", ["kron4", "kron_shape"], ["kron"], name="lokr_kron"),
        helper.make_node("MatMul", ["hidden", "kron"], ["lokr_mm"], name="lokr_mm"),
        helper.make_node("Mul", ["lokr_mm", "s"], ["lokr_out"], name="lokr_scale"),
        helper.make_node("Add", ["lokr_out", proj], ["y"], name="adapter_add"),
    ]
    return _model(nodes, inits), Numbers(W, b, np.kron(C, D) * 0.5)


def loha(seed: int = 0, rank: int = 2):
    """``x @ ((A1 @ B1) * (A2 @ B2))``: a Hadamard product of two low-rank factors (LoHa)."""
    rng = _rng(seed)
    W, b, nodes, inits, proj = _base(rng, False)
    A1, A2 = (rng.standard_normal((IN, rank)).astype(np.float32) for _ in range(2))
    B1, B2 = (rng.standard_normal((rank, OUT)).astype(np.float32) * 0.2 for _ in range(2))
    inits.update(A1=A1, B1=B1, A2=A2, B2=B2)
    nodes += [
        helper.make_node("MatMul", ["A1", "B1"], ["w1"], name="loha_w1"),
        helper.make_node("MatMul", ["A2", "B2"], ["w2"], name="loha_w2"),
        helper.make_node("Mul", ["w1", "w2"], ["dw"], name="loha_hadamard"),
        helper.make_node("MatMul", ["hidden", "dw"], ["loha_out"], name="loha_mm"),
        helper.make_node("Add", [proj, "loha_out"], ["y"], name="adapter_add"),
    ]
    return _model(nodes, inits), Numbers(W, b, (A1 @ B1) * (A2 @ B2))


def vera(seed: int = 0, rank: int = 4):
    """``((x @ A) * d) @ B * b_vec``: frozen shared A, B and trainable vectors (VeRA)."""
    rng = _rng(seed)
    W, b, nodes, inits, proj = _base(rng, False)
    A = rng.standard_normal((IN, rank)).astype(np.float32)
    B = rng.standard_normal((rank, OUT)).astype(np.float32) * 0.3
    d = rng.standard_normal(rank).astype(np.float32)
    bv = rng.standard_normal(OUT).astype(np.float32)
    inits.update(A=A, B=B, d=d, bv=bv)
    nodes += [
        helper.make_node("MatMul", ["hidden", "A"], ["z"], name="vera_a"),
        helper.make_node("Mul", ["z", "d"], ["zd"], name="vera_d"),
        helper.make_node("MatMul", ["zd", "B"], ["zb"], name="vera_b"),
        helper.make_node("Mul", ["zb", "bv"], ["vera_out"], name="vera_bvec"),
        helper.make_node("Add", [proj, "vera_out"], ["y"], name="adapter_add"),
    ]
    return _model(nodes, inits), Numbers(W, b, (A * d) @ B * bv)


def two_loras(seed: int = 0):
    """Two LoRA adapters active at once: ``(x @ W + s1 x A1 B1) + s2 x A2 B2``."""
    rng = _rng(seed)
    W, b, nodes, inits, proj = _base(rng, True)
    A1, A2 = (rng.standard_normal((IN, 2)).astype(np.float32) for _ in range(2))
    B1, B2 = (rng.standard_normal((2, OUT)).astype(np.float32) * 0.2 for _ in range(2))
    inits.update(A1=A1, B1=B1, A2=A2, B2=B2, s1=np.array(2.0, dtype=np.float32), s2=np.array(0.5, dtype=np.float32))
    nodes += [
        helper.make_node("MatMul", ["hidden", "A1"], ["z1"], name="a1"),
        helper.make_node("MatMul", ["z1", "B1"], ["u1"], name="b1"),
        helper.make_node("Mul", ["u1", "s1"], ["l1"], name="s1_mul"),
        helper.make_node("Add", [proj, "l1"], ["first"], name="first_add"),
        helper.make_node("MatMul", ["hidden", "A2"], ["z2"], name="a2"),
        helper.make_node("MatMul", ["z2", "B2"], ["u2"], name="b2"),
        helper.make_node("Mul", ["u2", "s2"], ["l2"], name="s2_mul"),
        helper.make_node("Add", ["first", "l2"], ["y"], name="second_add"),
    ]
    return _model(nodes, inits), Numbers(W, b, 2.0 * A1 @ B1 + 0.5 * A2 @ B2)


def dora(seed: int = 0):
    """PEFT's DoRA at inference: ``r + ((c - 1) * (r - b) + c * s * (x @ A @ B))``, ``r = x @ W + b``,
    ``c = m / ||W + s A B||`` per output column (a constant here)."""
    rng = _rng(seed)
    W, b, nodes, inits, proj = _base(rng, True)
    A = rng.standard_normal((IN, 2)).astype(np.float32)
    B = rng.standard_normal((2, OUT)).astype(np.float32) * 0.2
    s = 2.0
    adapted = W + s * A @ B
    c = (np.linalg.norm(adapted, axis=0) * (1 + 0.1 * rng.standard_normal(OUT))) / np.linalg.norm(adapted, axis=0)
    c = c.astype(np.float32)
    inits.update(A=A, B=B, s=np.array(s, dtype=np.float32), c=c, c1=(c - 1).astype(np.float32))
    nodes += [
        helper.make_node("Sub", [proj, "b"], ["nobias"], name="dora_sub_bias"),
        helper.make_node("Mul", ["c1", "nobias"], ["base_part"], name="dora_base_scale"),
        helper.make_node("MatMul", ["hidden", "A"], ["z"], name="dora_a"),
        helper.make_node("MatMul", ["z", "B"], ["zb"], name="dora_b"),
        helper.make_node("Mul", ["zb", "s"], ["lora"], name="dora_s"),
        helper.make_node("Mul", ["lora", "c"], ["lora_part"], name="dora_lora_scale"),
        helper.make_node("Add", ["base_part", "lora_part"], ["dora_out"], name="dora_sum"),
        helper.make_node("Add", [proj, "dora_out"], ["y"], name="adapter_add"),
    ]
    delta = (W + s * A @ B) * c - W
    return _model(nodes, inits), Numbers(W, b, delta)


def embedding_lora(seed: int = 0, vocab: int = 10, rank: int = 2):
    """``E[ids] + s * (A_e[ids] @ B_e)``: ``dE = s * A_e @ B_e``."""
    rng = _rng(seed)
    E = rng.standard_normal((vocab, OUT)).astype(np.float32)
    Ae = rng.standard_normal((vocab, rank)).astype(np.float32)
    Be = rng.standard_normal((rank, OUT)).astype(np.float32) * 0.3
    inits = {"E": E, "Ae": Ae, "Be": Be, "s": np.array(1.5, dtype=np.float32)}
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["emb"], name="embed", axis=0),
        helper.make_node("Gather", ["Ae", "ids"], ["lanes"], name="embed_lora_a", axis=0),
        helper.make_node("MatMul", ["lanes", "Be"], ["lb"], name="embed_lora_b"),
        helper.make_node("Mul", ["lb", "s"], ["delta"], name="embed_lora_s"),
        helper.make_node("Add", ["emb", "delta"], ["y"], name="adapter_add"),
    ]
    ids = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])]
    return _model(nodes, inits, inputs=ids), Numbers(None, None, 1.5 * Ae @ Be, table=E)


# ---------------------------------------------------------------- near-misses


def relu_between(seed: int = 0):
    """``relu(x @ A) @ B``: adapter-shaped, not linear."""
    rng = _rng(seed)
    W, b, nodes, inits, proj = _base(rng, False)
    inits.update(A=rng.standard_normal((IN, 2)).astype(np.float32), B=rng.standard_normal((2, OUT)).astype(np.float32))
    nodes += [
        helper.make_node("MatMul", ["hidden", "A"], ["z"], name="a"),
        helper.make_node("Relu", ["z"], ["rz"], name="relu"),
        helper.make_node("MatMul", ["rz", "B"], ["out"], name="b"),
        helper.make_node("Add", [proj, "out"], ["y"], name="adapter_add"),
    ]
    return _model(nodes, inits), Numbers(W, b, None)


def token_mixing(seed: int = 0):
    """``mean over tokens (x @ A) @ B`` broadcast back: linear, but it mixes tokens."""
    rng = _rng(seed)
    W, b, nodes, inits, proj = _base(rng, False)
    inits.update(A=rng.standard_normal((IN, 2)).astype(np.float32), B=rng.standard_normal((2, OUT)).astype(np.float32), axes=np.array([1], dtype=np.int64))
    nodes += [
        helper.make_node("MatMul", ["hidden", "A"], ["z"], name="a"),
        helper.make_node("ReduceMean", ["z", "axes"], ["zm"], name="mean_over_tokens", keepdims=1),
        helper.make_node("MatMul", ["zm", "B"], ["out"], name="b"),
        helper.make_node("Add", [proj, "out"], ["y"], name="adapter_add"),
    ]
    return _model(nodes, inits), Numbers(W, b, None)


def token_pairs(seed: int = 0):
    """``reshape(reshape(x, [b, -1, 2*IN]) @ M, [b, -1, OUT])``: a reshape that packs two tokens
    into one row: linear in x, but each output token reads its neighbour."""
    rng = _rng(seed)
    W, b, nodes, inits, proj = _base(rng, False)
    inits.update(M=rng.standard_normal((2 * IN, 2 * OUT)).astype(np.float32) * 0.2, pairs=np.array([0, -1, 2 * IN], dtype=np.int64), back=np.array([0, -1, OUT], dtype=np.int64))
    nodes += [
        helper.make_node("Reshape", ["hidden", "pairs"], ["paired"], name="pair_tokens"),
        helper.make_node("MatMul", ["paired", "M"], ["mixed"], name="pair_mm"),
        helper.make_node("Reshape", ["mixed", "back"], ["out"], name="unpair"),
        helper.make_node("Add", [proj, "out"], ["y"], name="adapter_add"),
    ]
    return _model(nodes, inits), Numbers(W, b, None)


def constant_term(seed: int = 0):
    """``(x @ A + c) @ B``: affine, not linear (a constant after ``B`` is PEFT's ``lora_bias``: a LoRA site)."""
    rng = _rng(seed)
    W, b, nodes, inits, proj = _base(rng, False)
    inits.update(A=rng.standard_normal((IN, 2)).astype(np.float32), B=rng.standard_normal((2, OUT)).astype(np.float32), c=np.ones(2, dtype=np.float32))
    nodes += [
        helper.make_node("MatMul", ["hidden", "A"], ["z"], name="a"),
        helper.make_node("Add", ["z", "c"], ["zc"], name="plus_c"),
        helper.make_node("MatMul", ["zc", "B"], ["out"], name="b"),
        helper.make_node("Add", [proj, "out"], ["y"], name="adapter_add"),
    ]
    return _model(nodes, inits), Numbers(W, b, None)


def layer_scale(seed: int = 0):
    """A base model's LayerScale: ``(x @ W) * gamma`` with a per-column constant, no adapter."""
    rng = _rng(seed)
    W, b, nodes, inits, proj = _base(rng, False)
    inits["gamma"] = rng.uniform(0.5, 1.5, OUT).astype(np.float32)
    nodes.append(helper.make_node("Mul", [proj, "gamma"], ["y"], name="layer_scale"))
    return _model(nodes, inits), Numbers(W, b, None)


def head_mixing(seed: int = 0, heads: int = 2):
    """Heads regrouped across the last axis and back with a transpose between (``[.., h, d] -> [.., d, h]``):
    still token-wise linear, so it merges (its ``dW`` permutes ``A @ B``'s columns)."""
    rng = _rng(seed)
    W, b, nodes, inits, proj = _base(rng, False)
    A = rng.standard_normal((IN, 2)).astype(np.float32)
    B = rng.standard_normal((2, OUT)).astype(np.float32) * 0.3
    d = OUT // heads
    inits.update(A=A, B=B, heads_shape=np.array([0, 0, heads, d], dtype=np.int64), flat=np.array([0, 0, OUT], dtype=np.int64))
    nodes += [
        helper.make_node("MatMul", ["hidden", "A"], ["z"], name="a"),
        helper.make_node("MatMul", ["z", "B"], ["zb"], name="b"),
        helper.make_node("Reshape", ["zb", "heads_shape"], ["h"], name="split_heads"),
        helper.make_node("Transpose", ["h"], ["ht"], name="swap", perm=[0, 1, 3, 2]),
        helper.make_node("Reshape", ["ht", "flat"], ["out"], name="join"),
        helper.make_node("Add", [proj, "out"], ["y"], name="adapter_add"),
    ]
    ab = A @ B
    perm = np.arange(OUT).reshape(heads, d).T.reshape(-1)
    return _model(nodes, inits), Numbers(W, b, ab[:, perm])


LINEAR = {"gaws": gaws, "gaws_d": gaws_d, "lokr": lokr, "loha": loha, "vera": vera, "two_loras": two_loras, "dora": dora, "head_mixing": head_mixing}
NOT_LINEAR = {"relu_between": relu_between, "token_mixing": token_mixing, "token_pairs": token_pairs, "constant_term": constant_term}
