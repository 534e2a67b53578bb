"""Adapter accounting on real exports: every adapter-shaped branch is recognised or reported.

For each adapter kind (PEFT DoRA on llama and qwen2, BD-LoRA, LoKr, LoHa, VeRA, embedding LoRA,
two stacked LoRAs, (IA)^3; GAWS and GAWS-D with and without the diagonal) and each exporter
(dynamo, dynamo-noopt, torch.export, torch.export + run_decompositions) the adapted model, its
base (same seed) and their exports are built once per module, then:

* recognised kinds: merge computes the adapted logits, strip the base logits, both with exactly
  the base export's GEMM count; fuse verifies with no more GEMMs than its input; the accounting
  says every branch found was recognised;
* (IA)^3: per-column scales are listed as unrecognized; strip refuses (exit 2) unless
  ``keep_scales``, and then keeps the scales (adapted logits, not the base's);
* a family the compiler does not know (a nonlinear branch on q_proj): the CLI's strip exits 2,
  says why and writes nothing; fuse and merge exit 0 and list it;
* the safety property, for every case: strip either exits 2 or writes the base model (also with
  a scale on a projection's input, (IA)^3 on a feedforward module only).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ir = pytest.importorskip("onnx_ir")

from conftest import run_onnx  # noqa: E402

from zflora_compile import zoo  # noqa: E402
from zflora_compile.adapters.gaws import build_gaws_model  # noqa: E402
from zflora_compile.cli import main  # noqa: E402
from zflora_compile.errors import UnrecognizedAdapterError, ZcompileError  # noqa: E402
from zflora_compile.options import CompileOptions  # noqa: E402
from zflora_compile.pipeline import compile_model  # noqa: E402

TINY = {"num_hidden_layers": 1}
ATOL = 2e-4
# case -> (builder, kind, arch, diag)
CASES = {
    "dora-llama": ("peft", "dora", "llama", None),
    "dora-qwen2": ("peft", "dora", "qwen2", None),  # q/k/v carry a bias
    "bdlora": ("peft", "bdlora", "llama", None),
    "lokr": ("peft", "lokr", "llama", None),
    "loha": ("peft", "loha", "llama", None),
    "vera": ("peft", "vera", "llama", None),
    "embedding": ("peft", "embedding", "llama", None),
    "two_loras": ("peft", "two_loras", "llama", None),
    "ia3": ("peft", "ia3", "llama", None),
    "gaws": ("gaws", "gaws", "llama", False),
    "gaws-diag": ("gaws", "gaws", "llama", True),
    "gaws_d": ("gaws", "gaws_d", "llama", False),
    "gaws_d-diag": ("gaws", "gaws_d", "llama", True),
}
EXPORTERS = ("dynamo", "dynamo-noopt", "aten", "core-aten")  # the last two: torch.export (+ run_decompositions)
SCALE_KINDS = {"ia3"}  # nothing but constant per-column scales: strip must refuse them


def params(cases):
    return [pytest.param(case, exporter, id=f"{case}-{exporter}") for case in cases for exporter in EXPORTERS]


# ------------------------------------------------------------------ build / export / compile once


def _logits_of(output):
    if isinstance(output, (tuple, list)):
        output = output[0]
    return output.detach().numpy() if hasattr(output, "detach") else np.asarray(output)


class _Lab:
    """Models, exports, eager logits and compile results, each built once per module."""

    def __init__(self, root):
        self.root = root
        self.cache: dict = {}

    def _once(self, key, make):
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    # models and eager logits
    def model(self, case):
        builder, kind, arch, diag = CASES[case]

        def make():
            if builder == "gaws":
                return build_gaws_model(kind, arch, seed=0, diag=diag, **TINY)
            return zoo.build_peft_variant(kind, arch, seed=0, **TINY)

        return self._once(("model", case), make)

    def base(self, arch):
        return self._once(("base", arch), lambda: zoo.build_base_model(arch, seed=0, **TINY))

    def args(self, arch):
        return self._once(
            ("args", arch),
            lambda: zoo._example_inputs(self.base(arch).config, torch.float32, seq_len=7, batch=1, past_len=None),
        )

    def eager(self, subject):
        """Eager logits of a case (adapted, L_a) or of ``("base", arch)`` (L_b)."""

        def make():
            arch = subject[1] if isinstance(subject, tuple) else CASES[subject][2]
            model = self.base(arch) if isinstance(subject, tuple) else self.model(subject)
            ids, mask = self.args(arch)
            with torch.no_grad():
                return model(input_ids=ids, attention_mask=mask, use_cache=False).logits.numpy()

        return self._once(("eager", subject), make)

    # exports
    def export(self, subject, exporter):
        def make():
            model = self.base(subject[1]) if isinstance(subject, tuple) else self.model(subject)
            if exporter in ("aten", "core-aten"):
                return zoo.export_program(model, decompose=exporter == "core-aten")
            name = "-".join(subject) if isinstance(subject, tuple) else subject
            return zoo.export_onnx(model, self.root / f"{name}-{exporter}" / "model.onnx", exporter=exporter)

        return self._once(("export", subject, exporter), make)

    def run(self, model, arch, tag):
        """Logits of a compiled ONNX model (onnxruntime) or program (``.module()(*args)``)."""
        args = self.args(arch)
        if isinstance(model, (ir.Model, onnx.ModelProto)):
            path = self.root / "runs" / f"{tag}.onnx"
            path.parent.mkdir(exist_ok=True)
            ir.save(model if isinstance(model, ir.Model) else ir.from_proto(model), path)
            return run_onnx(path, {"input_ids": args[0].numpy(), "attention_mask": args[1].numpy()})[0]
        module = model.module() if hasattr(model, "module") else model
        with torch.no_grad():
            return _logits_of(module(*args))

    def compile(self, subject, exporter, strategy, keep_scales=False):
        """``(logits or None, report json, error or None)`` of one compile, cached."""

        def make():
            source = self.export(subject, exporter)
            model = onnx.load(str(source)) if exporter.startswith("dynamo") else source
            options = CompileOptions(strategy=strategy, keep_scales=keep_scales)
            try:
                out, report = compile_model(model, options)
            except ZcompileError as error:
                return None, error.report, error
            arch = subject[1] if isinstance(subject, tuple) else CASES[subject][2]
            tag = f"{'-'.join(subject) if isinstance(subject, tuple) else subject}-{exporter}-{strategy}-{keep_scales}"
            return self.run(out, arch, tag), report.to_json(), None

        return self._once(("compile", subject, exporter, strategy, keep_scales), make)

    def base_gemms(self, arch, exporter):
        """The GEMM count of the base model's own export (the input count of a compile of it)."""
        _, report, error = self.compile(("base", arch), exporter, "fuse")
        assert error is None, error
        assert report["accounting"]["branches_found"] == 0 and report["unrecognized"] == []
        return report["input"]["gemm_count"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> _Lab:
    return _Lab(tmp_path_factory.mktemp("adapter_accounting"))


def _close(got, want):
    return got is not None and got.shape == want.shape and float(np.abs(got - want).max()) <= ATOL


def _families(report):
    return sorted({site.get("family") for site in report["sites"]})


# ------------------------------------------------------------------ recognised kinds


RECOGNISED = [case for case in CASES if CASES[case][1] not in SCALE_KINDS]


@pytest.mark.parametrize(("case", "exporter"), params(RECOGNISED))
def test_recognised_kind_merges_strips_and_fuses(lab, case, exporter):
    arch = CASES[case][2]
    adapted, base = lab.eager(case), lab.eager(("base", arch))
    assert np.abs(adapted - base).max() > 1e-2  # the adapter matters: L_a and L_b can be told apart
    base_gemms = lab.base_gemms(arch, exporter)

    merged, merge_report, merge_error = lab.compile(case, exporter, "merge")
    stripped, strip_report, strip_error = lab.compile(case, exporter, "strip")
    fused, fuse_report, fuse_error = lab.compile(case, exporter, "fuse")
    assert merge_error is None, f"merge: {merge_error}"
    assert fuse_error is None, f"fuse: {fuse_error}"
    input_gemms = merge_report["input"]["gemm_count"]
    assert input_gemms > base_gemms  # the export really carries the adapter's GEMMs

    if case == "lokr" and exporter == "dynamo" and isinstance(strip_error, UnrecognizedAdapterError):
        # The optimiser folds LoKr's kron(W1, W2) into a full-rank second projection: which of the
        # two projections is the base cannot be told. The honest answer is to list them and refuse.
        assert strip_error.exit_code == 2 and stripped is None
        for report in (merge_report, fuse_report, strip_report):
            unrec = report["unrecognized"]
            assert unrec and all(u["kind"] == "branch" for u in unrec)
            assert any("two full projections" in u["reason"] for u in unrec)
            acct = report["accounting"]
            assert acct["branches_found"] - acct["branches_recognised"] == len(unrec)
        assert "two full projections" in str(strip_error)
        assert _close(merged, adapted) and _close(fused, adapted)  # what was left alone is still exact
        assert base_gemms <= merge_report["output"]["gemm_count"] < input_gemms
        assert fuse_report["output"]["gemm_count"] <= input_gemms
        return

    assert strip_error is None, f"strip: {strip_error}"
    for report in (merge_report, strip_report, fuse_report):
        acct = report["accounting"]
        assert acct["branches_found"] == acct["branches_recognised"] > 0, acct
        assert acct["scales_found"] == acct["scales_recognised"], acct
        assert report["unrecognized"] == []
        assert report["sites"] and None not in _families(report)
    np.testing.assert_allclose(merged, adapted, atol=ATOL, rtol=0, err_msg="merge != adapted logits")
    np.testing.assert_allclose(stripped, base, atol=ATOL, rtol=0, err_msg="strip != base logits")
    assert merge_report["output"]["gemm_count"] == base_gemms
    assert strip_report["output"]["gemm_count"] == base_gemms
    # fuse: verified by the compile itself; whether a family leaves a site unfused ("linear") or
    # fuses it, it never adds GEMMs and computes the adapted model
    np.testing.assert_allclose(fused, adapted, atol=ATOL, rtol=0, err_msg="fuse != adapted logits")
    assert fuse_report["output"]["gemm_count"] <= input_gemms
    if set(_families(fuse_report)) & {"lora", "dora", "lowrank", "bdlora", "gaws", "gaws_d"}:  # a family with a fused form
        assert fuse_report["output"]["gemm_count"] < input_gemms
    assert fuse_report["verification"]["passed"] is True


# ------------------------------------------------------------------ per-column scales ((IA)^3)


@pytest.mark.parametrize(("case", "exporter"), params(sorted(SCALE_KINDS)))
def test_scales_are_listed_and_strip_refuses_them(lab, case, exporter):
    arch = CASES[case][2]
    adapted, base = lab.eager(case), lab.eager(("base", arch))
    assert np.abs(adapted - base).max() > 1e-2
    base_gemms = lab.base_gemms(arch, exporter)

    for strategy in ("merge", "fuse"):
        logits, report, error = lab.compile(case, exporter, strategy)
        assert error is None, f"{strategy}: {error}"
        unrec = report["unrecognized"]
        acct = report["accounting"]
        assert len(unrec) >= 6 and all(u["kind"] == "scale" for u in unrec), unrec  # q k v o gate up
        assert acct["scales_found"] > 0 and acct["scales_found"] - acct["scales_recognised"] == len(unrec)
        assert acct["branches_found"] == acct["branches_recognised"]
        np.testing.assert_allclose(logits, adapted, atol=ATOL, rtol=0)  # the scales are left as they are
        assert report["output"]["gemm_count"] == base_gemms

    logits, report, error = lab.compile(case, exporter, "strip")
    assert isinstance(error, UnrecognizedAdapterError) and error.exit_code == 2 and logits is None
    assert "per-column scale" in str(error)
    assert report["unrecognized"] and all(u["kind"] == "scale" for u in report["unrecognized"])

    # --keep-scales declares them part of the base: strip succeeds and keeps them. IA3 has nothing
    # else to strip, so the output is the adapted model, not the base one.
    logits, report, error = lab.compile(case, exporter, "strip", keep_scales=True)
    assert error is None, error
    np.testing.assert_allclose(logits, adapted, atol=ATOL, rtol=0)
    assert np.abs(logits - base).max() > 1e-2
    assert report["output"]["gemm_count"] == base_gemms


# ------------------------------------------------------------------ the safety property


@pytest.mark.parametrize(("case", "exporter"), params(list(CASES)))
def test_strip_exits_2_or_writes_the_base_model(lab, case, exporter):
    base = lab.eager(("base", CASES[case][2]))
    logits, report, error = lab.compile(case, exporter, "strip")
    if error is not None:
        assert isinstance(error, UnrecognizedAdapterError) and error.exit_code == 2, repr(error)
        assert report["unrecognized"], "a refusal names what it could not recognise"
        assert report["unrecognized"][0]["reason"] in str(error) or report["unrecognized"][0]["node"] in str(error)
        return
    diff = float(np.abs(logits - base).max())
    assert diff <= ATOL, f"strip exit 0 but its logits differ from the base model's by {diff:.3g}"


# ------------------------------------------------------------------ a family the tool does not know


class _UnknownAdapter(torch.nn.Module):
    """``base(x) + relu(x @ A) @ B`` or ``base(x) + ((x @ A) * (x @ C)) @ B``: adapter-shaped, not linear."""

    def __init__(self, base, form, r=4, seed=5):
        super().__init__()
        self.base, self.form = base, form
        gen = torch.Generator().manual_seed(seed)
        d_in, d_out = base.in_features, base.out_features
        self.A = torch.nn.Parameter(torch.randn(d_in, r, generator=gen) * d_in**-0.5)
        self.C = torch.nn.Parameter(torch.randn(d_in, r, generator=gen) * d_in**-0.5)
        self.B = torch.nn.Parameter(torch.randn(r, d_out, generator=gen) * 0.3)

    def forward(self, x):
        h = x @ self.A
        h = torch.relu(h) if self.form == "relu" else h * (x @ self.C)
        return self.base(x) + h @ self.B


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("form", ["relu", "gated"])
def test_unknown_family_cli(lab, capsys, tmp_path, form):
    model = zoo.build_base_model("llama", seed=0, **TINY)
    attn = model.model.layers[0].self_attn
    attn.q_proj = _UnknownAdapter(attn.q_proj, form)
    model.eval()
    ids, mask = lab.args("llama")
    with torch.no_grad():
        adapted = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.numpy()
    assert np.abs(adapted - lab.eager(("base", "llama"))).max() > 1e-2
    path = zoo.export_onnx(model, tmp_path / "model.onnx", exporter="dynamo")

    out = tmp_path / "strip"
    code, stdout, stderr = _cli(capsys, path, "-o", out, "--strategy", "strip", "--json")
    assert code == 2, stderr
    assert not out.exists()
    report = json.loads(stdout)
    assert report["status"] == "error" and report["exit_code"] == 2
    (entry,) = report["unrecognized"]
    assert entry["kind"] == "branch" and "q_proj" in entry["label"]
    assert "not linear" in entry["reason"]
    assert "cannot derive the base model" in stderr and "not linear" in stderr
    assert report["accounting"]["branches_found"] == 1 and report["accounting"]["branches_recognised"] == 0

    for strategy in ("fuse", "merge"):
        out = tmp_path / strategy
        code, stdout, stderr = _cli(capsys, path, "-o", out, "--strategy", strategy, "--json")
        assert code == 0, stderr
        report = json.loads(stdout)
        (entry,) = report["unrecognized"]
        assert entry["kind"] == "branch" and "q_proj" in entry["label"]
        got = run_onnx(out / "model.onnx", {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        np.testing.assert_allclose(got, adapted, atol=ATOL, rtol=0)  # left as it is, still exact


# ------------------------------------------------------------------ a scale on a projection's input


def _ia3_feedforward_only(seed=0):
    """PEFT (IA)^3 on down_proj only, as a feedforward module: ``(x * l) @ W``, the scale on the input."""
    from peft import IA3Config, get_peft_model

    model = get_peft_model(
        zoo.build_base_model("llama", seed=seed, **TINY),
        IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]),
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ia3_l" in name:
                param.mul_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
    return model.eval()


@pytest.mark.parametrize("exporter", ["dynamo", "aten"])
def test_strip_is_safe_with_a_scale_on_a_projection_input(lab, exporter):
    """(IA)^3 on a feed-forward projection scales its input: counted as a per-channel scale, so
    strip refuses (it used to write the adapted model as the base)."""
    model = _ia3_feedforward_only()
    ids, mask = lab.args("llama")
    with torch.no_grad():
        adapted = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.numpy()
    base = lab.eager(("base", "llama"))
    assert np.abs(adapted - base).max() > 1e-3
    if exporter == "aten":
        source = zoo.export_program(model)
    else:
        source = onnx.load(str(zoo.export_onnx(model, lab.root / f"ia3ff-{exporter}" / "model.onnx", exporter=exporter)))
    with pytest.raises(UnrecognizedAdapterError) as error:
        compile_model(source, CompileOptions(strategy="strip"))
    assert error.value.exit_code == 2 and "input" in str(error.value)
    assert [u["kind"] for u in error.value.report["unrecognized"]] == ["scale"]
