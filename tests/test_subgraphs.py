"""Adapter sites inside ONNX subgraphs (``If`` branches, ``Loop`` bodies, nested), read from
outer-scope weights that the branches share, as in optimum's ``decoder_model_merged.onnx``.

Every rewrite is run in ONNX Runtime against the unrewritten model for both values of the bool
``If`` condition (fp32, atol 1e-4); the strip reference is built independently of the detection
(B initializers zeroed by name, or the PEFT model exported with its B set to zero).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import jsonschema

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

from zflora_compile import subgraphs
from zflora_compile.cli import main
from zflora_compile.errors import InputError, UnrecognizedAdapterError
from zflora_compile.options import CompileOptions
from zflora_compile.pipeline import compile_model, detect

ATOL = 1e-4
D = 16
THEN, ELSE = "If:/model/If_0/then_branch", "If:/model/If_0/else_branch"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "exporters"


# ---------------------------------------------------------------- hand-built models


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _lora(prefix, x, W, A, B, out, nodes, *, relu=False, chain_x=None):
    """``out = x @ W + ((x @ A) @ B) * s`` (near-misses: ``relu``, a Relu between A and B;
    ``chain_x``, the chain reads another tensor than the projection)."""
    z = f"{prefix}_za"
    nodes += [h.make_node("MatMul", [x, W], [f"{prefix}_base"], name=f"{prefix}/base"), h.make_node("MatMul", [chain_x or x, A], [z], name=f"{prefix}/lora_A")]
    if relu:
        nodes.append(h.make_node("Relu", [z], [f"{prefix}_zr"], name=f"{prefix}/relu"))
        z = f"{prefix}_zr"
    nodes += [
        h.make_node("MatMul", [z, B], [f"{prefix}_zb"], name=f"{prefix}/lora_B"),
        h.make_node("Mul", [f"{prefix}_zb", "s"], [f"{prefix}_zs"], name=f"{prefix}/scale"),
        h.make_node("Add", [f"{prefix}_base", f"{prefix}_zs"], [out], name=f"{prefix}/add"),
    ]


def _weights(rng, names_outs, rank=2):
    weights = {"s": np.float32(0.5)}
    for p, out in names_outs:
        weights[f"W_{p}"] = (rng.standard_normal((D, out)) / 4).astype(np.float32)
        weights[f"A_{p}"] = (rng.standard_normal((D, rank)) / 4).astype(np.float32)
        weights[f"B_{p}"] = (rng.standard_normal((rank, out)) / 4).astype(np.float32)
    return weights


def if_model(*, near_miss=True, b_input=False, cross_read=False, zero_b=False, seed=0) -> tuple[onnx.ModelProto, dict]:
    """optimum's layout, by hand: a main-graph LoRA site computes ``h``; ``If(use_cache_branch)``
    holds two branches that read ``h`` and the SAME main-graph initializers W/A/B of q and k (each a
    LoRA site) and, with ``near_miss``, a chain with a Relu between A and B (no adapter). The else
    branch reads ``h * s``, so the branches differ. ``b_input``: q's B is a graph input (an adapter
    fed at run time); ``cross_read``: q's chain reads ``h`` (in the else branch not the projection's
    input ``h * s``: no site there). ``zero_b``: every B initializer zero (the strip reference, by name)."""
    weights = _weights(np.random.default_rng(seed), [("q", 16), ("k", 8), ("n", 8), ("m", 16)])
    if zero_b:
        weights = {k: (np.zeros_like(v) if k.startswith("B_") else v) for k, v in weights.items()}
    main_nodes: list = []
    _lora("/model/pre", "x", "W_m", "A_m", "B_m", "h", main_nodes)

    def branch(name, scaled):
        nodes, src = [], "h"
        if scaled:
            nodes.append(h.make_node("Mul", ["h", "s"], [f"{name}_h2"], name=f"/{name}/h2"))
            src = f"{name}_h2"
        _lora(f"/{name}/q", src, "W_q", "A_q", "B_in" if b_input else "B_q", f"{name}_q", nodes, chain_x="h" if cross_read else None)
        _lora(f"/{name}/k", src, "W_k", "A_k", "B_k", f"{name}_k", nodes)
        parts = [f"{name}_q", f"{name}_k"]
        if near_miss:
            _lora(f"/{name}/n", src, "W_n", "A_n", "B_n", f"{name}_n", nodes, relu=True)
            parts.append(f"{name}_n")
        nodes.append(h.make_node("Concat", parts, [f"{name}_out"], axis=-1, name=f"/{name}/cat"))
        return h.make_graph(nodes, name, [], [h.make_tensor_value_info(f"{name}_out", T.FLOAT, [2, 3, width])])

    width = 24 + (8 if near_miss else 0)
    main_nodes.append(h.make_node("If", ["use_cache_branch"], ["y"], name="/model/If_0", then_branch=branch("then", False), else_branch=branch("else", True)))
    inputs = [h.make_tensor_value_info("use_cache_branch", T.BOOL, []), h.make_tensor_value_info("x", T.FLOAT, [2, 3, D])]
    if b_input:
        inputs.append(h.make_tensor_value_info("B_in", T.FLOAT, [2, 16]))
    graph = h.make_graph(main_nodes, "g", inputs, [h.make_tensor_value_info("y", T.FLOAT, [2, 3, width])], [_init(k, v) for k, v in weights.items()])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model, weights


def loop_model(*, zero_b=False, seed=1) -> onnx.ModelProto:
    """A ``Loop`` (2 iterations) whose body applies a LoRA site to the carried ``h``, then an
    ``If(flag)`` nested in the body: its then branch a second LoRA site on the body's sum (an
    outer-scope value of the branch), its else branch the plain projection (no adapter)."""
    weights = _weights(np.random.default_rng(seed), [("l", 16), ("t", 16)])
    if zero_b:
        weights = {k: (np.zeros_like(v) if k.startswith("B_") else v) for k, v in weights.items()}
    then_nodes: list = []
    _lora("/then", "h1", "W_t", "A_t", "B_t", "t_out", then_nodes)
    then_g = h.make_graph(then_nodes, "then", [], [h.make_tensor_value_info("t_out", T.FLOAT, [2, 3, D])])
    else_g = h.make_graph([h.make_node("MatMul", ["h1", "W_t"], ["e_out"], name="/else/base")], "else", [], [h.make_tensor_value_info("e_out", T.FLOAT, [2, 3, D])])
    body_nodes: list = []
    _lora("/body/l", "h_in", "W_l", "A_l", "B_l", "h1", body_nodes)
    body_nodes += [
        h.make_node("If", ["flag"], ["h_next"], name="/body/If_0", then_branch=then_g, else_branch=else_g),
        h.make_node("Identity", ["cond_in"], ["cond_out"], name="/body/cond"),
    ]
    body = h.make_graph(
        body_nodes,
        "body",
        [h.make_tensor_value_info("i", T.INT64, []), h.make_tensor_value_info("cond_in", T.BOOL, []), h.make_tensor_value_info("h_in", T.FLOAT, [2, 3, D])],
        [h.make_tensor_value_info("cond_out", T.BOOL, []), h.make_tensor_value_info("h_next", T.FLOAT, [2, 3, D])],
    )
    inits = [_init(k, v) for k, v in weights.items()] + [numpy_helper.from_array(np.array(2, np.int64), "trips"), numpy_helper.from_array(np.array(True), "go")]
    node = h.make_node("Loop", ["trips", "go", "x"], ["y"], name="/model/Loop_0", body=body)
    graph = h.make_graph(
        [node], "g", [h.make_tensor_value_info("flag", T.BOOL, []), h.make_tensor_value_info("x", T.FLOAT, [2, 3, D])], [h.make_tensor_value_info("y", T.FLOAT, [2, 3, D])], inits
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


# ---------------------------------------------------------------- helpers


def run(model, feeds: dict) -> list[np.ndarray]:
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_same(a, b, feeds_by_flag: dict, atol=ATOL) -> None:
    """``a`` and ``b`` agree within ``atol`` on every output, for every value of the flag."""
    assert set(feeds_by_flag) == {True, False}
    for flag, feeds in feeds_by_flag.items():
        for x, y in zip(run(a, feeds), run(b, feeds), strict=True):
            assert x.shape == y.shape and (x.size == 0 or np.abs(x - y).max() <= atol), (flag, x.shape, y.shape)


def differs(a, b, feeds: dict) -> bool:
    return any(x.size and np.abs(x - y).max() > 1e-3 for x, y in zip(run(a, feeds), run(b, feeds)))


def if_feeds(flag_name="use_cache_branch", seed=3) -> dict:
    x = np.random.default_rng(seed).standard_normal((2, 3, D)).astype(np.float32)
    return {flag: {flag_name: np.array(flag), "x": x} for flag in (True, False)}


def gemms(model) -> int:
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    count = 0

    def visit(graph):
        nonlocal count
        for node in graph.node:
            count += node.op_type in ("MatMul", "Gemm")
            for attr in node.attribute:
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    visit(sub)

    visit(proto.graph)
    return count


def compiled(proto, strategy, **options):
    return compile_model(ir.from_proto(proto), CompileOptions(strategy=strategy, **options))


# ---------------------------------------------------------------- detection


def test_sites_found_in_both_branches_named_by_path():
    model, _ = if_model()
    found = detect(ir.from_proto(model))
    ids = sorted(s.site_id for s in found.all_sites)
    assert ids == sorted(["lora0", f"{ELSE}:lora0", f"{ELSE}:lora1", f"{THEN}:lora0", f"{THEN}:lora1"])
    assert {s.group for s in found.sites} == {"g0", f"{THEN}:g0", f"{ELSE}:g0"}
    # the Relu chain (no adapter) is rejected and unrecognised in both branches, named by its path
    assert sorted(r.node for r in found.rejections) == [f"{ELSE}:/else/n/add", f"{THEN}:/then/n/add"]
    assert all("Relu" in r.reason for r in found.rejections)
    assert sorted(u.node for u in found.unrecognized) == [f"{ELSE}:/else/n/add", f"{THEN}:/then/n/add"]
    # accounting covers every graph: main 1 branch, each If branch 3 (2 LoRA + the Relu chain)
    assert (found.accounting.branches_found, found.accounting.branches_recognised) == (7, 5)
    assert [scope.path for scope in subgraphs.scopes(ir.from_proto(model))] == ["", ELSE, THEN]


def test_must_not_fire_chain_reading_another_tensor_in_one_branch():
    """q's chain reads ``h``: in the then branch that is q's input (a site), in the else branch q
    reads ``h * s`` (no adapter of q: rejected with the reason, left as it was by every strategy)."""
    model, _ = if_model(near_miss=False, cross_read=True)
    found = detect(ir.from_proto(model))
    assert sorted(s.site_id for s in found.all_sites) == sorted(["lora0", f"{ELSE}:lora0", f"{THEN}:lora0", f"{THEN}:lora1"])
    assert [s.label for s in found.all_sites if s.site_id == f"{ELSE}:lora0"] == ["else.k"]
    assert [(r.node, "reads 'h'" in r.reason) for r in found.rejections] == [(f"{ELSE}:/else/q/add", True)]
    for strategy in ("fuse", "merge"):
        out, report = compiled(model, strategy)
        assert report.verification["passed"]
        else_nodes = {n.name for a in next(n for n in ir.to_proto(out).graph.node if n.op_type == "If").attribute if a.name == "else_branch" for n in a.g.node}
        assert {"/else/q/base", "/else/q/lora_A", "/else/q/lora_B", "/else/q/add"} <= else_nodes  # left as it was
        assert_same(model, out, if_feeds())


def test_run_time_b_read_in_both_branches():
    """q's B is a main-graph input read inside both branches (an adapter fed at run time): the
    run-time LoRA site in each branch, fuse exact for both flag values with B fed."""
    model, _ = if_model(near_miss=False, b_input=True)
    found = detect(ir.from_proto(model))
    assert sorted(s.site_id for s in found.all_sites) == sorted(["lora0", f"{ELSE}:lora0", f"{ELSE}:lora_rt0", f"{THEN}:lora0", f"{THEN}:lora_rt0"])
    out, report = compiled(model, "fuse")
    assert report.verification["passed"]
    feeds = if_feeds()
    b_in = np.random.default_rng(5).standard_normal((2, 16)).astype(np.float32)
    assert_same(model, out, {flag: {**f, "B_in": b_in} for flag, f in feeds.items()})


def test_model_without_subgraphs_unchanged_naming():
    """No subgraph: ids, groups and rejections are the main graph's own (no path prefix)."""
    from zflora_compile import families
    from zflora_compile.graph.onnx_ir import OnnxGraph

    model, _ = if_model()
    flat = ir.from_proto(model)
    flat.graph.remove(next(n for n in flat.graph if n.op_type == "If"), safe=False)
    flat.graph.outputs[0] = next(n for n in flat.graph if n.name == "/model/pre/add").outputs[0]
    ours, theirs = detect(flat), families.detect(OnnxGraph(flat))
    assert [s.to_json() for s in ours.all_sites] == [s.to_json() for s in theirs.all_sites] and [s.site_id for s in ours.all_sites] == ["lora0"]
    assert ours.accounting == theirs.accounting


# ---------------------------------------------------------------- fuse / merge / strip


@pytest.mark.parametrize("strategy, gemm_after", [("fuse", 12), ("merge", 11)])
def test_fuse_and_merge_exact_for_both_branches(strategy, gemm_after):
    model, _ = if_model()
    out, report = compiled(model, strategy)
    assert len(report.plan) == (3 if strategy == "fuse" else 5)  # fuse: q+k in each branch, main alone
    assert (gemms(model), gemms(out)) == (21, gemm_after) == (report.input.graph.gemm_count, report.output.graph.gemm_count)
    assert report.verification["passed"]
    feeds = if_feeds()
    assert_same(model, out, feeds)
    assert differs(model, if_model(near_miss=True, zero_b=True)[0], feeds[True])  # the adapters matter
    onnx.checker.check_model(ir.to_proto(out), full_check=True)


def test_merge_adds_the_update_once_to_a_shared_weight():
    """W_q is read by both branches: each branch's q GEMM reads W_q + s A_q @ B_q (not 2 s A B),
    one initializer (the two equal copies kept once), named in the compiled record."""
    model, w = if_model()
    out, _ = compiled(model, "merge")
    proto = ir.to_proto(out)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    branches = {a.name: a.g for n in proto.graph.node if n.op_type == "If" for a in n.attribute}
    expected = {p: w[f"W_{p}"] + w["s"] * (w[f"A_{p}"] @ w[f"B_{p}"]) for p in ("q", "k")}
    read = {}
    for name, graph in branches.items():
        for node in graph.node:
            if node.name.endswith(("/q/base", "/k/base")):
                read[(name, node.name[-6])] = node.input[1]
    assert len(read) == 4
    for (name, p), weight in read.items():
        np.testing.assert_allclose(inits[weight], expected[p], rtol=0, atol=1e-6)
    assert read[("then_branch", "q")] == read[("else_branch", "q")] and read[("then_branch", "k")] == read[("else_branch", "k")]
    assert not {"W_q", "A_q", "B_q", "W_k", "A_k", "B_k"} & set(inits)  # the originals went with their last reader
    record = json.loads(out.metadata_props["zflora.compiled"])["compilations"][-1]
    assert len(record["merged"]) == 5 and all(m["weight"] in inits for m in record["merged"])


def test_fuse_keeps_one_recorded_weight_per_branch_and_strips_back():
    """A fused group's widened weight is one per branch (strip of a compiled model finds it by name,
    one reader); strip of the fused model gives the base model for both branches."""
    model, _ = if_model(near_miss=False)
    out, _ = compiled(model, "fuse")
    record = json.loads(out.metadata_props["zflora.compiled"])["compilations"][-1]
    weights = [g["weight"] for g in record["groups"]]
    assert len(weights) == 3 == len(set(weights)) and all(w in out.graph.initializers for w in weights)
    assert sorted(sum((g["sites"] for g in record["groups"]), [])) == sorted(s["id"] for s in record["sites"])
    base, report = compile_model(out, CompileOptions(strategy="strip"))
    assert report.removed["groups"] and report.verification["passed"]
    assert_same(base, if_model(near_miss=False, zero_b=True)[0], if_feeds())


def test_strip_equals_b_zeroed_in_both_branches():
    model, _ = if_model(near_miss=False)
    out, report = compiled(model, "strip")
    assert report.verification["passed"] and "B set to zero" in report.verification["reference"]
    assert (gemms(model), gemms(out)) == (15, 5)
    reference = if_model(near_miss=False, zero_b=True)[0]  # every B initializer zero, by name
    assert_same(out, reference, if_feeds())
    assert differs(out, model, if_feeds()[False])


def test_strip_reference_zeroes_a_shared_b_in_both_branches():
    """subgraphs.disable_adapters (the compile's strip reference) equals zeroing B by name."""
    model, _ = if_model(near_miss=False)
    zeroed = ir.from_proto(model)
    subgraphs.disable_adapters(zeroed, detect(zeroed))
    assert_same(zeroed, if_model(near_miss=False, zero_b=True)[0], if_feeds())


def test_strip_refuses_unrecognised_branch_inside_if():
    model, _ = if_model()
    with pytest.raises(UnrecognizedAdapterError, match=r"node 'If:/model/If_0/(then|else)_branch:/(then|else)/n/add'"):
        compiled(model, "strip")


def test_non_finite_shared_b_is_refused_naming_the_branch_site():
    model, _ = if_model(near_miss=False)
    b = next(t for t in model.graph.initializer if t.name == "B_k")
    array = numpy_helper.to_array(b).copy()
    array[0, 0] = np.nan
    b.CopyFrom(numpy_helper.from_array(array, "B_k"))
    with pytest.raises(InputError, match=r"site If:/model/If_0/(else|then)_branch:lora1 \(.*\): B .*holds NaN"):
        compiled(model, "merge")


@pytest.mark.parametrize("strategy", ["fuse", "merge", "strip"])
def test_loop_body_and_nested_if(strategy):
    """Sites in a Loop body and in an If nested in it (reading the body's LoRA sum from the outer
    scope: rewritten innermost first), exact for both values of the flag."""
    model = loop_model()
    found = detect(ir.from_proto(model))
    body, nested = "Loop:/model/Loop_0/body", "Loop:/model/Loop_0/body/If:/body/If_0/then_branch"
    assert sorted(s.site_id for s in found.all_sites) == sorted([f"{body}:lora0", f"{nested}:lora0"])
    out, report = compiled(model, strategy)
    assert report.verification["passed"] and (gemms(model), gemms(out)) == (7, 5 if strategy == "fuse" else 3)  # fuse: wide + low-rank per site
    reference = loop_model(zero_b=True) if strategy == "strip" else model
    assert_same(out, reference, if_feeds("flag"))


# ---------------------------------------------------------------- CLI


def test_cli_reports_subgraph_sites(tmp_path, capsys):
    model, _ = if_model()
    path = tmp_path / "decoder_model_merged.onnx"
    onnx.save(model, path)
    code = main([str(path), "-o", str(tmp_path / "out"), "--strategy", "fuse", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["status"] == "ok" and report["verification"]["passed"]
    jsonschema.validate(report, json.loads(resources.files("zflora_compile").joinpath("report_schema.json").read_text()))
    assert sorted(s["id"] for s in report["sites"] if s["id"].startswith("If:")) == sorted([f"{THEN}:lora0", f"{THEN}:lora1", f"{ELSE}:lora0", f"{ELSE}:lora1"])
    assert len(report["rejected"]) == 2 and report["accounting"]["branches_found"] == 7
    assert report["output"]["gemm_count"] == 12
    code = main([str(path), "-o", str(tmp_path / "stripped"), "--strategy", "strip", "--json"])
    failed = json.loads(capsys.readouterr().out)
    assert code == 2 and "If:/model/If_0/" in failed["message"] and not (tmp_path / "stripped").exists()


# ---------------------------------------------------------------- a tiny PEFT decoder, merged like optimum


def _export_decoder(root: Path, zero_b: bool) -> onnx.ModelProto:
    """A tiny llama + PEFT LoRA exported twice (with and without past, torch.onnx), joined under
    an If on use_cache_branch like optimum's merge: initializers deduplicated by content into the
    main graph and read from both branches; ``zero_b``: the adapter's B zeroed in torch first."""
    import torch

    from zflora_compile import zoo

    model = zoo.build_lora_model("llama", num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    if zero_b:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_B." in name:
                    param.zero_()
    with_past = onnx.load(str(zoo.export_onnx(model, root / "with_past.onnx", exporter="torchscript", with_cache=True)))
    no_past = onnx.load(str(zoo.export_onnx(model, root / "no_past.onnx", exporter="torchscript", with_cache=False)))
    return merge_decoders(with_past, no_past)


def merge_decoders(with_past: onnx.ModelProto, no_past: onnx.ModelProto) -> onnx.ModelProto:
    """``If(use_cache_branch)``: then the with-past decoder, else the one without; both output logits.
    The no-past branch reads the attention mask's last ``seq`` columns (the merged model's mask
    covers past and current tokens)."""
    shared: dict = {}
    initializers: list = []

    def branch(model, prefix, tail_mask=False):
        g = model.graph
        rename = {i.name: i.name for i in g.input}
        nodes = []
        if tail_mask:
            rename["attention_mask"] = f"{prefix}/attention_mask_tail"
            nodes = [
                h.make_node("Shape", ["input_ids"], [f"{prefix}/seq"], start=1, end=2, name=f"{prefix}/seq"),
                h.make_node("Neg", [f"{prefix}/seq"], [f"{prefix}/neg_seq"], name=f"{prefix}/neg_seq"),
                h.make_node("Constant", [], [f"{prefix}/end"], value=h.make_tensor("end", T.INT64, [1], [2**62]), name=f"{prefix}/end"),
                h.make_node("Constant", [], [f"{prefix}/axis"], value=h.make_tensor("axis", T.INT64, [1], [1]), name=f"{prefix}/axis"),
                h.make_node("Slice", ["attention_mask", f"{prefix}/neg_seq", f"{prefix}/end", f"{prefix}/axis"], [rename["attention_mask"]], name=f"{prefix}/mask_tail"),
            ]
        for tensor in g.initializer:
            key = (tensor.data_type, tuple(tensor.dims), numpy_helper.to_array(tensor).tobytes())
            if key not in shared:
                shared[key] = f"shared_{len(shared)}"
                copy = onnx.TensorProto()
                copy.CopyFrom(tensor)
                copy.name = shared[key]
                initializers.append(copy)
            rename[tensor.name] = shared[key]

        def renamed(name):
            if name and name not in rename:
                rename[name] = f"{prefix}/{name}"
            return rename.get(name, name)

        for node in g.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            del copy.input[:], copy.output[:]
            copy.input.extend(renamed(i) for i in node.input)
            copy.output.extend(renamed(o) for o in node.output)
            copy.name = f"{prefix}/{node.name}"
            nodes.append(copy)
        logits = next(o for o in g.output if o.name == "logits")
        out = onnx.ValueInfoProto()
        out.CopyFrom(logits)
        out.name = renamed("logits")
        return h.make_graph(nodes, prefix, [], [out])

    then_g, else_g = branch(with_past, "with_past"), branch(no_past, "no_past", tail_mask=True)
    inputs = [h.make_tensor_value_info("use_cache_branch", T.BOOL, [1]), *with_past.graph.input]
    logits = [o for o in with_past.graph.output if o.name == "logits"]
    node = h.make_node("If", ["use_cache_branch"], ["logits"], name="optimum::if", then_branch=then_g, else_branch=else_g)
    merged = h.make_model(h.make_graph([node], "merged", inputs, logits, initializers), opset_imports=with_past.opset_import, ir_version=with_past.ir_version)
    onnx.checker.check_model(merged, full_check=True)
    return merged


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("merged")
    adapted = _export_decoder(root / "adapted", zero_b=False)
    base = _export_decoder(root / "base", zero_b=True)
    return adapted, base


def decoder_feeds(model: onnx.ModelProto, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 64, (1, 5)).astype(np.int64)
    out = {}
    for flag, past in ((True, 3), (False, 0)):
        feeds = {"use_cache_branch": np.array([flag]), "input_ids": ids, "attention_mask": np.ones((1, past + 5), np.int64)}
        for value in model.graph.input[3:]:
            feeds[value.name] = rng.standard_normal((1, 2, max(past, 1), 8)).astype(np.float32)
        out[flag] = feeds
    return out


@pytest.mark.parametrize("strategy, gemm_after", [("fuse", 22), ("merge", 20), ("strip", 20)])
def test_merged_peft_decoder(decoders, strategy, gemm_after):
    adapted, base = decoders
    found = detect(ir.from_proto(adapted))
    paths = [s.site_id.rsplit(":", 1)[0] for s in found.all_sites]
    assert paths.count("If:optimum::if/then_branch") == 7 == paths.count("If:optimum::if/else_branch") and len(paths) == 14
    assert (found.accounting.branches_found, found.accounting.branches_recognised, len(found.unrecognized)) == (14, 14, 0)
    assert not subgraphs.detect(ir.from_proto(base)).unrecognized  # a zero B still is an adapter site
    out, report = compiled(adapted, strategy)
    assert report.verification["passed"] and (gemms(adapted), gemms(out)) == (48, gemm_after)
    feeds = decoder_feeds(adapted)
    assert_same(out, base if strategy == "strip" else adapted, feeds)
    assert differs(adapted, base, feeds[True]) and differs(adapted, base, feeds[False])


OPTIMUM_T5 = FIXTURES / "optimum_t5_lora" / "decoder_model_merged.onnx"


def t5_feeds(model: onnx.ModelProto, seed=0) -> dict:
    """Feeds for optimum's T5 decoder (d_model 64, 4 heads of 16), one set per use_cache_branch value."""
    rng = np.random.default_rng(seed)
    enc, seq, past = 6, 3, 2
    sizes = {"batch_size": 1, "encoder_sequence_length": enc, "decoder_sequence_length": seq, "past_decoder_sequence_length": past}
    feeds = {}
    for value in model.graph.input:
        dims = [sizes.get(d.dim_param, d.dim_value) for d in value.type.tensor_type.shape.dim]
        kind = value.type.tensor_type.elem_type
        if kind == T.BOOL:
            continue
        feeds[value.name] = rng.integers(0, 256, dims).astype(np.int64) if value.name == "input_ids" else np.ones(dims, np.int64) if kind == T.INT64 else rng.standard_normal(dims).astype(np.float32)
    return {flag: {**feeds, "use_cache_branch": np.array([flag])} for flag in (True, False)}


def zero_rank8_b(model: onnx.ModelProto) -> onnx.ModelProto:
    """The base model, from the fixture's README alone (LoRA r=8 on q/k/v/o, d_model 64): every
    [8, 64] initializer a MatMul reads as its weight (the B's; nothing else has that shape) zeroed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    weights = set()

    def visit(graph):
        for node in graph.node:
            if node.op_type == "MatMul":
                weights.add(node.input[1])
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)

    visit(out.graph)
    zeroed = 0
    for tensor in out.graph.initializer:
        if tensor.name in weights and list(tensor.dims) == [8, 64]:
            tensor.CopyFrom(numpy_helper.from_array(np.zeros((8, 64), np.float32), tensor.name))
            zeroed += 1
    assert zeroed == 16  # 2 blocks x (self q, k, v, o + cross q, k, v, o), each B one initializer both branches read
    return out


@pytest.mark.parametrize("strategy, gemm_after", [("fuse", 60), ("merge", 54), ("strip", 54)])
def test_real_optimum_t5_merged_decoder(strategy, gemm_after):
    """optimum's own decoder_model_merged.onnx of a tiny T5 + PEFT LoRA (tests/fixtures/exporters,
    made by scripts/make_exporter_fixtures.sh): the no-past branch has 16 sites (self and cross
    attention q/k/v/o of 2 blocks), the with-past branch 12 (cross-attention k/v come from the
    cache); T5's ReLU feed-forward (wi -> Relu -> wo beside the residual) is rejected, not an
    adapter; every rewrite exact in ORT for both values of use_cache_branch."""
    if not OPTIMUM_T5.exists():
        pytest.skip("tests/fixtures/exporters/optimum_t5_lora not generated")
    model = onnx.load(str(OPTIMUM_T5))
    found = detect(ir.from_proto(model))
    where = [s.site_id.rsplit(":", 1)[0] for s in found.all_sites]
    assert (where.count("If:optimum::if/else_branch"), where.count("If:optimum::if/then_branch"), len(where)) == (16, 12, 28)
    assert (found.accounting.branches_found, found.accounting.branches_recognised, len(found.unrecognized)) == (28, 28, 0)
    assert len(found.rejections) == 4 and all("Relu" in r.reason and "DenseReluDense" in r.reason for r in found.rejections)
    out, report = compiled(model, strategy)
    cases = [c["case"] for c in report.verification["cases"]]
    assert report.verification["passed"] and any("use_cache_branch=False" in c for c in cases) and any("use_cache_branch=True" in c for c in cases)
    assert (gemms(model), gemms(out)) == (110, gemm_after)
    feeds = t5_feeds(model)
    base = zero_rank8_b(model)
    assert differs(model, base, feeds[True]) and differs(model, base, feeds[False])
    assert_same(out, base if strategy == "strip" else model, feeds)


# ---------------------------------------------------------------- a site across the branch boundary


def outer_base_model(lora: bool = True, relu: bool = True, int_condition: bool = False) -> onnx.ModelProto:
    """The base ``x @ W`` in the main graph, the LoRA chain and its add in ``then_branch``, the
    ``else_branch`` reading the base alone (``relu=False``: the add is the branch's output). A merge
    into ``W`` would hand the adapter to the else branch too (found by review: with an int64
    condition no bool switch exposes it)."""
    rng = np.random.default_rng(0)
    w, a, b = (rng.standard_normal(s).astype(np.float32) for s in ((D, D), (D, 2), (2, D)))
    tail = [h.make_node("Relu", ["t1"], ["then_out"])] if relu else [h.make_node("Identity", ["t1"], ["then_out"])]
    then_nodes = ([h.make_node("MatMul", ["x", "A"], ["za"]), h.make_node("MatMul", ["za", "B"], ["zb"]), h.make_node("Add", ["base", "zb"], ["t1"])] if lora else [h.make_node("Identity", ["base"], ["t1"])]) + tail
    then_graph = h.make_graph(then_nodes, "then", [], [h.make_tensor_value_info("then_out", T.FLOAT, None)])
    else_graph = h.make_graph([h.make_node("Relu" if relu else "Identity", ["base"], ["else_out"])], "else", [], [h.make_tensor_value_info("else_out", T.FLOAT, None)])
    condition = [h.make_node("Equal", ["mode", "zero"], ["cond"])] if int_condition else []
    nodes = condition + [h.make_node("MatMul", ["x", "W"], ["base"], name="base_mm"), h.make_node("If", ["cond"], ["y"], name="if0", then_branch=then_graph, else_branch=else_graph)]
    inits = [numpy_helper.from_array(w, "W")] + ([numpy_helper.from_array(a, "A"), numpy_helper.from_array(b, "B")] if lora else [])
    inits += [numpy_helper.from_array(np.array(0, np.int64), "zero")] if int_condition else []
    switch = h.make_tensor_value_info("mode", T.INT64, []) if int_condition else h.make_tensor_value_info("cond", T.BOOL, [])
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["b", D]), switch], [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)], ir_version=9)


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("int_condition", [False, True])
def test_a_site_whose_base_is_outside_the_branch_is_left_and_reported(relu, int_condition):
    model = outer_base_model(relu=relu, int_condition=int_condition)
    x = np.random.default_rng(1).standard_normal((3, D)).astype(np.float32)
    switch = (lambda v: {"mode": np.array(0 if v else 1, np.int64)}) if int_condition else (lambda v: {"cond": np.array(v)})
    feeds = {flag: {"x": x, **switch(flag)} for flag in (True, False)}
    for strategy in ("fuse", "merge"):
        out, report = compiled(model, strategy, verify=False)
        assert report.to_json()["sites"] == []
        assert_same(model, out, feeds)  # nothing rewritten: in particular W, which the else branch reads, is unchanged
    found = detect(ir.from_proto(model))
    assert [u.node for u in found.unrecognized] == [f"If:if0/then_branch:{found.unrecognized[0].node.rsplit(':', 1)[-1]}"]
    with pytest.raises(UnrecognizedAdapterError):
        compiled(model, "strip", verify=False)
