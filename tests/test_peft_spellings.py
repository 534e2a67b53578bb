"""PEFT's spellings of LoRA besides the plain fp32 ``Linear``, on real exports (issue 12).

* ``autocast_fp16``: an fp16 Llama with PEFT's default ``autocast_adapter_dtype=True`` (fp32 A/B;
  ``narrow(wide(x @ W) + s * wide(x) @ A @ B)``);
* ``conv1d``: GPT-2's ``Conv1D`` (``fan_in_fan_out=True``; ``addmm`` between reshapes);
* ``lora_bias``: a bias on ``lora_B`` (``y = x @ W + b + s * (x @ A @ B + b_B)``).

For each spelling and both torch.onnx exporters (dynamo, TorchScript): every adapted module is a
site; fuse has fewer GEMMs and matches the original and PyTorch eager; merge and strip remove
exactly the chains' GEMMs, merge matches the original, strip matches the same model exported
with PEFT's adapters switched off (an independent reference, also distinct from the adapted
logits). Tolerances: fp32 1e-4, fp16 1e-2 (abs and rel), the pipeline's own. Near-misses that
must not fire: an integer cast in the chain's input or in the tail, an unflatten that does not
restore the input's leading axes, a constant added between A and B, a B bias that is not per
column. Hand-built: the lora_bias algebra of all three rewrites against numpy. torch.export:
the same spellings (and a bf16 base, which ONNX Runtime's CPU GEMMs do not run) in FX.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ir = pytest.importorskip("onnx_ir")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from conftest import run_onnx, token_feeds  # noqa: E402

from zflora_compile import zoo  # noqa: E402
from zflora_compile.api import detect_adapters, fuse_adapters  # noqa: E402
from zflora_compile.families.lora import adapter_bias  # noqa: E402
from zflora_compile.graph.onnx_ir import OnnxGraph  # noqa: E402
from zflora_compile.options import CompileOptions  # noqa: E402
from zflora_compile.pipeline import compile_model  # noqa: E402

SPELLINGS = ("autocast_fp16", "conv1d", "lora_bias")
EXPORTERS = ("dynamo", "torchscript")
TOL = {"autocast_fp16": 1e-2, "conv1d": 1e-4, "lora_bias": 1e-4}  # atol = rtol
SEQ = 9
CASES = [pytest.param(s, e, id=f"{s}-{e}") for s in SPELLINGS for e in EXPORTERS]


def _close(got, want, tol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    excess = np.abs(got - want) - (tol + tol * np.abs(want))
    assert excess.max() <= 0, f"max abs diff {np.abs(got - want).max():.3g} over atol = rtol = {tol:g}"


def _gemms(model) -> int:
    return OnnxGraph(model if isinstance(model, ir.Model) else ir.load(str(model))).gemm_count()


class _Lab:
    """Models, exports, eager logits and compiled models, each built once per module."""

    def __init__(self, root):
        self.root, self.cache = root, {}

    def _once(self, key, make):
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def model(self, spelling, disabled=False):
        return self._once(("model", spelling, disabled), lambda: zoo.build_peft_spelling(spelling, disabled=disabled))

    def export(self, spelling, exporter, disabled=False):
        tag = "base" if disabled else "adapted"
        return self._once(("onnx", spelling, exporter, disabled), lambda: zoo.export_onnx(self.model(spelling, disabled), self.root / f"{spelling}-{exporter}-{tag}" / "model.onnx", exporter=exporter))

    def logits(self, path):
        return self._once(("logits", str(path)), lambda: run_onnx(path, token_feeds(SEQ))[0])

    def eager(self, spelling):
        def make():
            feeds = token_feeds(SEQ)
            with torch.no_grad():
                out = self.model(spelling)(input_ids=torch.from_numpy(feeds["input_ids"]), attention_mask=torch.from_numpy(feeds["attention_mask"]))
            return out.logits.float().numpy()

        return self._once(("eager", spelling), make)

    def compiled(self, spelling, exporter, strategy):
        def make():
            model, report = compile_model(ir.load(str(self.export(spelling, exporter))), CompileOptions(strategy=strategy))
            path = self.root / f"{spelling}-{exporter}-{strategy}.onnx"
            ir.save(model, str(path))
            return path, report.to_json()

        return self._once(("compiled", spelling, exporter, strategy), make)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return _Lab(tmp_path_factory.mktemp("peft_spellings"))


# ------------------------------------------------------------------ real exports


@pytest.mark.parametrize("spelling, exporter", CASES)
def test_every_adapted_module_is_a_site(lab, spelling, exporter):
    model = lab.model(spelling)
    detection = detect_adapters(lab.export(spelling, exporter))
    assert len(detection.sites) == zoo.adapted_module_count(model) > 0
    assert {s.family for s in detection.sites} == {"lora"}
    assert detection.rejections == [] and detection.unrecognized == []
    assert {round(s.scale, 6) for s in detection.sites} == {1.5}  # alpha 6 / r 4
    if spelling == "autocast_fp16":  # fp16 weights, fp32 adapter: the site ends at the cast back to fp16
        assert {s.dtype for s in detection.sites} == {"float16"}
        assert all(s.binding.tail is not None and s.lora_a().dtype == np.float32 for s in detection.sites)
    if spelling == "conv1d":  # the site reads the 3-D input the chain reads, not the Gemm's 2-D view
        graph = OnnxGraph(ir.load(str(lab.export(spelling, exporter))))
        assert all(s.binding.gemm.kind == "Gemm" and s.has_bias for s in detection.sites)
        assert all(graph.rank(s.binding.gemm.x) == 3 for s in detection.sites)
    if spelling == "lora_bias":  # s * b_B of each site is the module's lora_B bias times its scaling
        expected = {
            name.rsplit(".", 1)[-1] + str(m.out_features): m.lora_B["default"].bias.detach().numpy() * m.scaling["default"]
            for name, m in model.named_modules()
            if hasattr(m, "lora_B") and len(m.lora_B)
        }
        for site in detection.sites:
            got = adapter_bias(site)
            key = site.label.rsplit(".", 1)[-1] + str(site.out_features)
            np.testing.assert_allclose(got, expected[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("spelling, exporter", CASES)
def test_fuse_has_fewer_gemms_and_computes_the_adapted_model(lab, spelling, exporter):
    source = lab.export(spelling, exporter)
    path, report = lab.compiled(spelling, exporter, "fuse")
    assert report["verification"]["passed"] is True
    sites = zoo.adapted_module_count(lab.model(spelling))
    groups = len(report["plan"]["fused_groups"])
    assert 0 < groups <= sites
    assert _gemms(path) == _gemms(source) - 3 * sites + 2 * groups < _gemms(source)  # 1 + 2 per site -> 2 per group
    fused = lab.logits(path)
    _close(fused, lab.logits(source), TOL[spelling])
    _close(fused, lab.eager(spelling), TOL[spelling])


@pytest.mark.parametrize("spelling, exporter", CASES)
def test_merge_removes_the_chains_and_computes_the_adapted_model(lab, spelling, exporter):
    source = lab.export(spelling, exporter)
    path, report = lab.compiled(spelling, exporter, "merge")
    assert report["verification"]["passed"] is True
    sites = zoo.adapted_module_count(lab.model(spelling))
    assert len(report["plan"]["merged_sites"]) == sites
    assert _gemms(path) == _gemms(source) - 2 * sites
    _close(lab.logits(path), lab.logits(source), TOL[spelling])
    _close(lab.logits(path), lab.eager(spelling), TOL[spelling])


@pytest.mark.parametrize("spelling, exporter", CASES)
def test_strip_computes_the_model_exported_with_the_adapter_off(lab, spelling, exporter):
    source = lab.export(spelling, exporter)
    reference = lab.export(spelling, "dynamo", disabled=True)  # PEFT's own switch, exported on its own
    path, report = lab.compiled(spelling, exporter, "strip")
    assert report["verification"]["passed"] is True
    sites = zoo.adapted_module_count(lab.model(spelling))
    assert _gemms(path) == _gemms(source) - 2 * sites == _gemms(reference)
    stripped, base, adapted = lab.logits(path), lab.logits(reference), lab.logits(source)
    _close(stripped, base, TOL[spelling])
    assert np.abs(adapted.astype(np.float64) - base).max() > 10 * TOL[spelling]  # the reference is discriminating


# ------------------------------------------------------------------ near-misses on real exports


def _site(graph_model, label_end: str):
    detection = detect_adapters(graph_model)
    return next(s for s in detection.sites if s.label.endswith(label_end)), detection


def _cast(graph, before, value, to: int, name: str):
    node = ir.node("Cast", [value], attributes={"to": to}, name=name)
    node.outputs[0].name = f"{name}_out"
    graph.insert_before(before, node)
    return node.outputs[0]


def _lora_reasons(model) -> dict[str, str]:
    """The LoRA family's own rejections (a later family may report the same add in its words)."""
    from zflora_compile.families import Found, lora
    from zflora_compile.pipeline import infer_shapes

    model = ir.load(str(model)) if not isinstance(model, ir.Model) else model
    infer_shapes(model)
    view = OnnxGraph(model)
    found = Found(view, 0.5)
    lora.detect(view, found)
    return {r.node: r.reason for r in found.rejections.values()}


def _leave_alone(lab, model: ir.Model, spelling: str, add_name: str, reason_part: str, tmp_path):
    """``model`` (a real export, one site broken) still runs; that site is rejected with the
    reason, the others are found; fuse leaves the broken site's add in place and computes what
    the broken model computes."""
    path = tmp_path / "model.onnx"
    ir.save(model, str(path))
    detection = detect_adapters(path)
    assert len(detection.sites) == zoo.adapted_module_count(lab.model(spelling)) - 1
    assert add_name in {r.node for r in detection.rejections}  # reported (by the last family that looked)
    assert reason_part in _lora_reasons(path).get(add_name, ""), _lora_reasons(path)
    assert add_name not in {n for s in detection.sites for n in s.nodes}
    fused, report = compile_model(ir.load(str(path)), CompileOptions(strategy="fuse"))
    assert report.to_json()["verification"]["passed"] is True
    assert add_name in {n.name for n in fused.graph}
    ir.save(fused, str(tmp_path / "fused.onnx"))
    _close(run_onnx(str(tmp_path / "fused.onnx"), token_feeds(SEQ))[0], run_onnx(str(path), token_feeds(SEQ))[0], TOL[spelling])


def test_integer_cast_of_the_chain_input_must_not_fire(lab, tmp_path):
    """fp16 x -> int32 -> fp32 -> A: the chain does not read x; the site is rejected with the cast."""
    model = ir.load(str(lab.export("autocast_fp16", "dynamo")))
    site, _ = _site(model, "q_proj")
    a_node = site.binding.chain_nodes[-1]
    x16 = site.binding.gemm.x
    as_int = _cast(model.graph, a_node, x16, TensorProto.INT32, "near_miss_int")
    a_node.replace_input_with(0, _cast(model.graph, a_node, as_int, TensorProto.FLOAT, "near_miss_float"))
    _leave_alone(lab, model, "autocast_fp16", site.binding.add.name, "int32", tmp_path)


def test_tail_through_an_integer_must_not_fire(lab, tmp_path):
    """The fp32 sum goes through int32 before the cast back to fp16: no tail, no site."""
    model = ir.load(str(lab.export("autocast_fp16", "dynamo")))
    site, _ = _site(model, "v_proj")
    tail_node = site.binding.tail.producer()
    tail_node.replace_input_with(0, _cast(model.graph, tail_node, site.binding.add.outputs[0], TensorProto.INT32, "near_miss_tail"))
    _leave_alone(lab, model, "autocast_fp16", site.binding.add.name, "not only by a cast back to float16", tmp_path)


def test_unflatten_that_does_not_restore_the_leading_axes_must_not_fire(lab):
    """Conv1D's addmm result reshaped to [S, 1, out] (not x's [1, S]): no site there."""
    model = ir.load(str(lab.export("conv1d", "dynamo")))
    site, _ = _site(model, "c_attn")
    unflatten = site.binding.base_output.producer()
    bad = ir.Value(name="near_miss_shape", const_value=ir.tensor(np.array([-1, 1, site.out_features], dtype=np.int64), name="near_miss_shape"))
    model.graph.register_initializer(bad)
    unflatten.replace_input_with(1, bad)
    unflatten.outputs[0].shape = None
    detection = detect_adapters(model)
    assert len(detection.sites) == zoo.adapted_module_count(lab.model("conv1d")) - 1
    assert not any(s.label.endswith("c_attn") for s in detection.sites)
    assert unflatten.name in {r.node: r.reason for r in detection.rejections}.get(site.binding.add.name, "")
    assert "restores the leading axes" in _lora_reasons(model).get(site.binding.add.name, "")


# ------------------------------------------------------------------ hand-built: the lora_bias algebra

IN, OUT, R = 8, 12, 2


def _graph(chain: str, c_shape=(OUT,), seed=0):
    """``y = x @ W + b + s * chain``; chain ``after_b``: ``x @ A @ B + c``; ``between``: ``(x @ A + c) @ B``."""
    rng = np.random.default_rng(seed)
    arrays = {
        "W": rng.standard_normal((IN, OUT)), "b": rng.standard_normal(OUT), "A": rng.standard_normal((IN, R)),
        "B": rng.standard_normal((R, OUT)), "c": rng.standard_normal(c_shape if chain == "after_b" else (R,)), "s": np.array(0.75),
    }
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"], name="proj"),
        helper.make_node("Add", ["xw", "b"], ["p"], name="proj_bias"),
        helper.make_node("MatMul", ["x", "A"], ["xa"], name="lora_a"),
    ]
    if chain == "after_b":
        nodes += [helper.make_node("MatMul", ["xa", "B"], ["xab"], name="lora_b"), helper.make_node("Add", ["xab", "c"], ["t"], name="lora_b_bias")]
    else:
        nodes += [helper.make_node("Add", ["xa", "c"], ["xac"], name="lora_a_bias"), helper.make_node("MatMul", ["xac", "B"], ["t"], name="lora_b")]
    nodes += [helper.make_node("Mul", ["t", "s"], ["st"], name="scale"), helper.make_node("Add", ["p", "st"], ["y"], name="lora_add")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, IN])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, OUT])],
        [onnx.numpy_helper.from_array(v, k) for k, v in arrays.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), arrays


def test_lora_bias_rewrites_follow_the_algebra():
    """fuse: ``x @ [W|A]``, ``b + s b_B`` in one bias; merge: ``x @ (W + s A B) + (b + s b_B)``;
    strip: ``x @ W + b`` -- each against numpy in float64."""
    model, a = _graph("after_b")
    x = np.random.default_rng(1).standard_normal((1, 4, IN)).astype(np.float32)
    s = float(a["s"])
    want = {
        "fuse": x @ a["W"] + a["b"] + s * (x @ a["A"] @ a["B"] + a["c"]),
        "merge": x @ (a["W"] + s * a["A"] @ a["B"]) + a["b"] + s * a["c"],
        "strip": x @ a["W"] + a["b"],
    }
    detection = detect_adapters(model)
    assert len(detection.sites) == 1 and detection.rejections == []
    np.testing.assert_allclose(adapter_bias(detection.sites[0]), s * a["c"], rtol=1e-6)
    for strategy, expected in want.items():
        out, report = compile_model(ir.from_proto(model), CompileOptions(strategy=strategy))
        got = run_onnx_model(out, x)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
        gemms = OnnxGraph(out).gemm_count()
        assert gemms == {"fuse": 2, "merge": 1, "strip": 1}[strategy], (strategy, gemms)
        if strategy != "fuse":  # the adapter's bias is folded (merge) or gone (strip): one bias Add left
            assert [n.op_type for n in out.graph].count("Add") == 1


@pytest.mark.parametrize("chain, c_shape, reason", [
    pytest.param("between", (OUT,), None, id="constant_between_A_and_B"),
    pytest.param("after_b", (4, OUT), "has shape [4, 12], not [12]", id="b_bias_per_token"),
])
def test_lora_bias_near_misses_must_not_fire(chain, c_shape, reason):
    model, _ = _graph(chain, c_shape)
    detection = detect_adapters(model)
    assert detection.sites == []
    reasons = [r.reason for r in detection.rejections] + [u.reason for u in detection.unrecognized]
    assert reasons, "a near-miss must be reported"
    if reason is not None:
        assert any(reason in r for r in reasons), reasons
    out, report = compile_model(ir.from_proto(model), CompileOptions(strategy="fuse"))
    assert len(report.plan) == 0
    x = np.random.default_rng(1).standard_normal((1, 4, IN)).astype(np.float32)
    np.testing.assert_array_equal(run_onnx_model(out, x), run_onnx_model(ir.from_proto(model), x))


def run_onnx_model(model: ir.Model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


# ------------------------------------------------------------------ torch.export (FX)


@pytest.mark.parametrize("spelling", ["autocast_fp16", "autocast_bf16", "conv1d", "lora_bias"])
def test_torch_export_reads_the_same_spellings(lab, spelling):
    """Every adapted module is a site in the torch.export program too; fuse and strip verify in
    eager (bf16 at its tolerance), and the stripped program computes PEFT's adapter-off model."""
    model = lab.model(spelling)
    program = zoo.export_program(model)
    detection = detect_adapters(program)
    assert len(detection.sites) == zoo.adapted_module_count(model) and detection.rejections == []
    fuse_adapters(program, "fuse")  # raises VerificationError on a mismatch
    stripped = fuse_adapters(program, "strip")
    feeds = token_feeds(SEQ)
    args = (torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"]))
    with torch.no_grad():
        got = stripped.module()(*args)
        got = (got[0] if isinstance(got, (tuple, list)) else got).float().numpy()
        base = lab.model(spelling, disabled=True)(input_ids=args[0], attention_mask=args[1]).logits.float().numpy()
    _close(got, base, {"autocast_bf16": 5e-2}.get(spelling, TOL.get(spelling)))


def _autocast_model(variant: str):
    """PEFT's autocast by hand: ``Cast16(Cast32(x @ W16) + s * ((Cast32(x) @ A32) @ B32))``, with a
    bfloat16 round trip where ``variant`` says (float16 and bfloat16 hold each other's values only
    in part: such a round trip is no pass-through; found by review)."""
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    d, r, f, h = 32, 4, TensorProto.FLOAT, TensorProto.FLOAT16
    inits = [
        numpy_helper.from_array((rng.standard_normal((d, d)) * 0.2).astype(np.float16), "W"),
        numpy_helper.from_array((rng.standard_normal((d, r)) * 0.3).astype(np.float32), "A"),
        numpy_helper.from_array((rng.standard_normal((r, d)) * 0.3).astype(np.float32), "B"),
        numpy_helper.from_array(np.array(1.7, np.float32), "s"),
    ]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["p16"]), helper.make_node("Cast", ["x"], ["x32"], to=f)]
    if variant == "base_through_bf16":
        nodes += [helper.make_node("Cast", ["p16"], ["pb"], to=TensorProto.BFLOAT16), helper.make_node("Cast", ["pb"], ["p32"], to=f)]
    else:
        nodes.append(helper.make_node("Cast", ["p16"], ["p32"], to=f))
    a_input = "x32"
    if variant == "a_input_through_bf16":
        nodes += [helper.make_node("Cast", ["x32"], ["xb"], to=TensorProto.BFLOAT16), helper.make_node("Cast", ["xb"], ["xa"], to=f)]
        a_input = "xa"
    nodes += [
        helper.make_node("MatMul", [a_input, "A"], ["za"]),
        helper.make_node("MatMul", ["za", "B"], ["zb"]),
        helper.make_node("Mul", ["zb", "s"], ["zs"]),
        helper.make_node("Add", ["p32", "zs"], ["y32"]),
        helper.make_node("Cast", ["y32"], ["y"], to=h),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", h, ["b", d])], [helper.make_tensor_value_info("y", h, ["b", d])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


@pytest.mark.parametrize("variant, sites", [("plain", 1), ("a_input_through_bf16", 0), ("base_through_bf16", 0)])
def test_a_bfloat16_round_trip_in_an_fp16_autocast_is_no_pass_through(variant, sites):
    found = detect_adapters(_autocast_model(variant))
    assert len(found.sites) == sites
    assert len(found.unrecognized) == 1 - sites  # left as it was, and reported
