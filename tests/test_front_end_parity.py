"""One family module, two front-ends: the same graph gives the same sites, rejections and plan.

Every rule case of the hand-built tests (LoRA spellings and near-misses, FFA/FBA lanes, zFLoRA
reads, RoPE layouts) is built once in onnx-ir and mirrored op for op into torch.fx
(``tests/fx_mirror.py``). Both go through the same family modules, each through its own graph
view; the reports (sites, rejections with their reasons, the plan of every strategy) must be
equal once ONNX value names are spelled as FX node names. The FX rewrite of every case is also
run against the FX original (eager, the mirror's inputs), so the parity is of working rewrites.
"""

from __future__ import annotations

import re

import copy

import numpy as np
import onnx_ir as ir
import pytest
import torch

from zflora_compile import families
from zflora_compile.errors import PlanError
from zflora_compile.graph.onnx_ir import OnnxGraph
from zflora_compile.graph.torch_fx import FxConstants, FxGraph
from zflora_compile.pipeline import infer_shapes
from zflora_compile.planner import STRATEGIES, plan

try:
    from fx_mirror import example_inputs, normalise, op_words, to_fx
    from graphs import GraphBuilder, Proj, lora_projection_graph, qkv
    from test_rope_layouts import D, F32, build, zflora_stream_graph
    from test_rules_handbuilt import ACCOUNTED, NEGATIVE, POSITIVE
except ImportError:  # tests/ became a package
    from tests.fx_mirror import example_inputs, normalise, op_words, to_fx
    from tests.graphs import GraphBuilder, Proj, lora_projection_graph, qkv
    from tests.test_rope_layouts import D, F32, build, zflora_stream_graph
    from tests.test_rules_handbuilt import ACCOUNTED, NEGATIVE, POSITIVE

R = 4


def _const(gb, rng, name, shape):
    return gb.initializer(name, (rng.standard_normal(shape) * 0.3).astype(F32))


def _scaled(gb, value, name):
    return gb.op("Mul", [value, gb.initializer(f"{name}.s", np.array(2.0, dtype=F32))], f"{name}/Mul")


def lanes_graph(host_op: str = "MatMul", reader_op: str = "MatMul", bias: bool = False):
    """FFA: ``z = t @ A`` hosted by ``N = t @ Wn`` and read by ``R = v @ Wr`` (optionally Gemm, with a bias)."""
    rng = np.random.default_rng(7)
    gb = GraphBuilder()
    t, v = gb.input("t", ["seq", D], F32), gb.input("v", ["seq", D], F32)

    def gemm(op, x, name, out=D):
        w = _const(gb, rng, f"{name}.weight", [out, D] if op == "Gemm" else [D, out])
        if op == "Gemm":
            c = [_const(gb, rng, f"{name}.bias", [out])] if bias else []
            return gb.op("Gemm", [x, w, *c], f"{name}/Gemm", transB=1)
        return gb.op("MatMul", [x, w], f"{name}/MatMul")

    host = gemm(host_op, t, "layers.0.ffa_host")
    z = gb.op("MatMul", [t, _const(gb, rng, "layers.0.ffa.A", [D, R])], "layers.0.ffa/A")
    delta = _scaled(gb, gb.op("MatMul", [z, _const(gb, rng, "layers.0.ffa.B", [R, D])], "layers.0.ffa/B"), "layers.0.ffa")
    out = gb.op("Add", [gemm(reader_op, v, "layers.0.reader"), delta], "layers.0.reader/AddLanes")
    gb.output(host, "host", F32, ["seq", D])
    gb.output(out, "out", F32, ["seq", D])
    return gb.model()


def zflora_model(pad_exit: bool = False):
    """A d+r stream: an entry read, an entry cut (no adapter), an exit write (concat or pad)."""
    rng = np.random.default_rng(8)
    gb = GraphBuilder()
    a = gb.input("stream", [1, "seq", D + R], F32)

    def part(start, end, name):
        bounds = [gb.initializer(f"{name}.{k}", np.array([x], np.int64)) for k, x in (("start", start), ("end", end), ("axis", -1))]
        return gb.op("Slice", [a, *bounds], f"{name}/Slice")

    low, high = part(0, D, "read_low"), part(D, 2**63 - 1, "read_high")
    read = gb.op("Add", [gb.op("MatMul", [low, _const(gb, rng, "q.W", [D, D])], "q/MatMul"), _scaled(gb, gb.op("MatMul", [high, _const(gb, rng, "q.B", [R, D])], "q/lanes"), "q")], "q/Add")
    cut = gb.op("MatMul", [part(0, D, "cut_low"), _const(gb, rng, "k.W", [D, D])], "k/MatMul")
    o = gb.op("Add", [read, cut], "mix/Add")
    base = gb.op("MatMul", [o, _const(gb, rng, "o.W", [D, D])], "o/MatMul")
    if pad_exit:
        pads = gb.initializer("o.pads", np.array([0, 0, 0, 0, 0, R], np.int64))
        exit_ = gb.op("Pad", [base, pads], "o/Pad")
    else:
        lanes = gb.op("MatMul", [o, _const(gb, rng, "o.A", [D, R])], "o/lanes")
        exit_ = gb.op("Concat", [base, lanes], "o/Concat", axis=-1)
    gb.output(exit_, "out", F32, [1, "seq", D + R])
    return gb.model()


CASES = {
    **{f"lora/{name}": (lambda kw=kw: lora_projection_graph(**kw).model) for name, kw in POSITIVE.items()},
    **{f"lora-must-not-fire/{name}": (lambda kw=kw: lora_projection_graph(**kw).model) for name, (kw, _) in NEGATIVE.items()},
    "lora/rejected_next_to_good": lambda: lora_projection_graph(projections=qkv(between="Relu")[:1] + qkv()[1:]).model,
    "lora/rank_limit": lambda: lora_projection_graph(projections=[Proj(out=8, rank=4)]).model,
    "ffa/matmul": lambda: lanes_graph(),
    "ffa/gemm_host_and_reader": lambda: lanes_graph("Gemm", "Gemm"),
    "ffa/gemm_with_bias": lambda: lanes_graph("Gemm", "Gemm", bias=True),
    "zflora/concat_exit": lambda: zflora_model(),
    "zflora/pad_exit": lambda: zflora_model(pad_exit=True),
    "zflora/stream_read": lambda: zflora_stream_graph(D, D),
    "zflora-must-not-fire/overlapping_slices": lambda: zflora_stream_graph(D - 1, D),
    **{f"rope/{layout}/{adapter}": (lambda layout=layout, adapter=adapter: build(layout, adapter)) for layout in ("llama_rotate_half", "phi3_open_slice", "neox_partial_rotary") for adapter in ("lora", "ffa")},
}


def fx_view(gm: torch.fx.GraphModule) -> FxGraph:
    """The FX view and emitter over a mirrored GraphModule; new weights become buffers."""
    count = [0]

    def add_constant(name: str, tensor: torch.Tensor) -> torch.fx.Node:
        count[0] += 1
        target = f"{name}_{count[0]}"
        gm.register_buffer(target, tensor)
        first = next(n for n in gm.graph.nodes if n.op != "placeholder")
        with gm.graph.inserting_before(first):
            node = gm.graph.get_attr(target)
        node.meta["val"] = tensor
        return node

    return FxGraph(gm, FxConstants(gm), add_constant)


def _branch_words(reason: str) -> str:
    reason = re.sub(r"^branch (.*?) added to", lambda m: f"branch {m.group(1).lower()} added to", op_words(reason))
    return re.sub(r"\(max deviation[^)]*\)", "(..)", reason)


def _reports(detection) -> tuple[list, list]:
    """Sites, then the rejections and what the accounting left unrecognised (reasons in op words),
    and the accounting's tally."""
    rejections = [{**r.to_json(), "reason": op_words(r.reason)} for r in detection.rejections]
    # op names differ in case (MatMul / matmul) and the measured deviation in its random sample
    unrecognized = [{"kind": u.kind, "reason": _branch_words(u.reason)} for u in detection.unrecognized]
    return [s.to_json() for s in detection.all_sites], [*rejections, *unrecognized, detection.accounting.to_json()]


def _plans(detection) -> dict:
    out = {}
    for strategy in STRATEGIES:
        try:
            out[strategy] = plan(detection, strategy).to_json()
        except PlanError as error:
            out[strategy] = f"PlanError: {error}"
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_both_front_ends_find_and_plan_the_same(case):
    model = CASES[case]()
    infer_shapes(model)  # as the pipeline does before every ONNX detection
    gm = to_fx(model)
    onnx_found = families.detect(OnnxGraph(model))
    fx_found = families.detect(fx_view(gm))
    onnx_sites, onnx_rejections = _reports(onnx_found)
    fx_sites, fx_rejections = _reports(fx_found)
    assert normalise(onnx_sites, model) == fx_sites
    assert normalise(onnx_rejections, model) == fx_rejections
    assert normalise(_plans(onnx_found), model) == _plans(fx_found)
    kind, _, name = case.partition("/")
    linear = kind == "lora-must-not-fire" and ACCOUNTED[name].startswith("linear")  # the generic family takes it
    expect_sites = (not kind.endswith("must-not-fire") and not case.endswith("/none")) or linear
    assert bool(fx_sites) == expect_sites, "the case does not exercise what its name says"


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("strategy", ["fuse", "merge"])
def test_fx_rewrite_of_every_case_is_exact(case, strategy):
    """The FX side of the parity is a working rewrite (the ONNX side is checked by the rule tests)."""
    model = CASES[case]()
    infer_shapes(model)  # as the pipeline does before every ONNX detection
    gm = to_fx(model)
    original = copy.deepcopy(gm)
    # an fp16 chain on an fp32 base: the original rounds the chain to fp16, the rewrite keeps fp32
    fp16_chain = any(v.dtype == ir.DataType.FLOAT16 for v in model.graph.initializers.values())
    view = fx_view(gm)
    families.rewrite(view, plan(families.detect(view), strategy))
    inputs = example_inputs(original)
    with torch.no_grad():
        want, got = original(*inputs), gm(*inputs)
    for w, g in zip(want, got):
        tol = 2e-2 if w.dtype == torch.float16 else 2e-3 if fp16_chain else 1e-4
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)
