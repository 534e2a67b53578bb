"""A seeded random-graph generator and an independent judge for the differential fuzzer.

:func:`generate(seed)` builds a small ONNX model out of base projections (``MatMul`` / ``Gemm``,
``transB``, bias as ``Add`` in either order or ``Gemm``'s C, bias shapes ``[out]`` / ``[1, .., out]``),
LoRA chains (scale as ``Mul`` / ``Div`` before or after B, casts to the same dtype, to fp16 and
back, through int32, identities), FFA/FBA lane chains (``z = t @ A`` read as ``s * (z @ B)`` by
any projection, a host's own lanes included, so cycles appear), zFLoRA stream reads
(``a[.., :d] @ W + s * a[.., d:] @ B``, complementary or not), two adapters on one add or nested,
extra consumers of intermediates and outputs, graph outputs at random points, shared inputs
(QKV-style groups) and shared weight initializers. Placements are drawn valid and invalid alike.

The generator knows which chains are adapters (every GEMM applying an adapter's B, by node name):
the strip reference zeroes them itself, never through the package's detection.

:func:`judge(case, strategy)` compiles the model with ``zflora_compile.pipeline.compile_model``
(``verify=False`` first: the raw rewrite; then ``verify=True`` when it matters) and compares every
written model with ONNX Runtime on seeded inputs: ``exact``, ``unchanged``, ``refused``,
``caught`` (the package's VerificationError), ``crash`` (any other exception) or ``wrong``.
"""

from __future__ import annotations

import dataclasses
import traceback

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 18
IR_VERSION = 9
CLASSES = ("exact", "unchanged", "refused", "caught", "crash", "wrong")
STRATEGIES = ("fuse", "merge", "strip")
TOLERANCE = {"float32": 1e-4, "float16": 1e-2}
_ONNX_TYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "fp16": TensorProto.FLOAT16, "int32": TensorProto.INT32, "float64": TensorProto.DOUBLE}


@dataclasses.dataclass
class Val:
    name: str
    width: int
    dtype: str
    lead: tuple  # leading axes


@dataclasses.dataclass
class Adapter:
    kind: str  # lora | lane | zflora
    b_node: str  # the node applying B (zeroed by the strip reference)
    b_init: str  # B's initializer
    nodes: set  # every node of the adapter (A, B, scale, casts): never a base projection
    #: adapter-shaped by the compiler's definition (a low-rank chain, or any chain of the projection's
    #: own input); a full-rank chain reading another tensor is not, and strip keeps it
    shaped: bool = True


@dataclasses.dataclass
class Case:
    seed: int
    model: onnx.ModelProto
    adapters: list[Adapter]
    feeds: dict
    features: list[str]
    dtype: str

    @property
    def tolerance(self) -> float:
        """By dtype; fp16's when the graph rounds an fp32 value through fp16 anywhere (a rewrite that
        only reassociates fp32 sums can flip one fp16 rounding there, exactly as it could in fp16)."""
        return TOLERANCE["float16" if "cast fp16" in self.features else self.dtype]


class Builder:
    def __init__(self, rng: np.random.Generator, dtype: str):
        self.rng, self.dtype = rng, dtype
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self.adapters: list[Adapter] = []
        self.features: list[str] = []
        self.n = 0
        self.values: list[Val] = []  # activations usable as GEMM inputs
        self.feeds: dict = {}

    # ---------------------------------------------------------------- plumbing
    def fresh(self, stem: str) -> str:
        self.n += 1
        return f"{stem}_{self.n}"

    def feature(self, text: str) -> None:
        self.features.append(text)

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def pick(self, options):
        return options[int(self.rng.integers(len(options)))]

    def init(self, array: np.ndarray, stem: str) -> str:
        name = self.fresh(stem)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def weight(self, rows: int, cols: int, stem: str, dtype: str | None = None) -> str:
        array = (self.rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(dtype or self.dtype)
        return self.init(array, stem)

    def node(self, op: str, inputs: list[str], stem: str, outputs: int = 1, **attrs):
        name = self.fresh(stem)
        outs = [f"{name}_out{i}" if outputs > 1 else f"{name}_out" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return (outs if outputs > 1 else outs[0]), name

    def graph_input(self, width: int, lead: tuple, dtype: str | None = None) -> Val:
        dtype = dtype or self.dtype
        name = self.fresh("in")
        self.inputs.append(helper.make_tensor_value_info(name, _ONNX_TYPE[dtype], [*lead, width]))
        self.feeds[name] = self.rng.standard_normal((*lead, width)).astype(dtype)
        return Val(name, width, dtype, lead)

    def output(self, name: str) -> None:
        if name not in {o.name for o in self.outputs} and name not in self.feeds:
            self.outputs.append(helper.make_tensor_value_info(name, 0, None))

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "fuzz", self.inputs, self.outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fuzz")
        model.ir_version = IR_VERSION
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        types = {v.name: v.type for v in [*inferred.graph.value_info, *inferred.graph.output]}
        for out in model.graph.output:
            out.type.CopyFrom(types[out.name])
        if self.chance(0.5):  # exporters often record intermediate types and shapes
            model.graph.value_info.extend(inferred.graph.value_info)
            self.feature("value_info recorded")
        return model

    # ---------------------------------------------------------------- pieces
    def scalar(self, value: float, *, allow_bad: bool = True) -> str:
        shape = self.pick([(), (), (1,), (1, 1)] + ([(1, 1, 1, 1)] if allow_bad else []))
        if len(shape) == 4:
            self.feature("scale of rank 4")
        self.last_scalar_rank = len(shape)
        return self.init(np.full(shape, value, dtype=self.dtype), "s")

    @staticmethod
    def raised(lead: tuple, rank: int) -> tuple:
        """Leading axes after broadcasting against a constant of ``rank`` axes."""
        return (1,) * (rank - 1 - len(lead)) + lead if rank > len(lead) + 1 else lead

    def cast(self, value: Val, how: str) -> Val:
        """A pass-through spelling of ``value``: same dtype, fp16 and back, int32 and back, Identity."""
        if how == "identity":
            out, _ = self.node("Identity", [value.name], "id")
        elif how == "same":
            out, _ = self.node("Cast", [value.name], "cast", to=_ONNX_TYPE[value.dtype])
        elif how in ("fp16", "int32", "float64"):
            mid, _ = self.node("Cast", [value.name], "cast", to=_ONNX_TYPE[how])
            out, _ = self.node("Cast", [mid], "cast", to=_ONNX_TYPE[value.dtype])
        else:
            return value
        self.feature(f"cast {how}")
        return Val(out, value.width, value.dtype, value.lead)

    def projection(self, x: Val, out: int, *, shared: str | None = None) -> tuple[Val, str, str]:
        """``x @ W (+ b)``: (output after the bias, the GEMM node name, W's initializer)."""
        gemm_ok = len(x.lead) == 1
        use_gemm = gemm_ok and self.chance(0.35)
        bias = self.pick([None, None, "add", "add_rev"] + (["gemm"] if use_gemm else []))
        if use_gemm:
            trans = self.chance(0.5) and shared is None  # a shared weight is stored [in, out]
            w = shared or self.weight(*(((out, x.width) if trans else (x.width, out))), "W")
            inputs = [x.name, w]
            if bias == "gemm":
                inputs.append(self.init((self.rng.standard_normal(self.pick([(out,), (1, out)])) * 0.5).astype(self.dtype), "bias"))
                self.feature("gemm C bias")
            y, name = self.node("Gemm", inputs, "gemm", transB=int(trans))
            self.feature(f"Gemm transB={int(trans)}")
        else:
            w = shared or self.weight(x.width, out, "W")
            y, name = self.node("MatMul", [x.name, w], "mm")
        if bias in ("add", "add_rev"):
            shape = self.pick([(out,), (out,), (1, out), (1, 1, out), (1, 1, 1, out)])
            if len(shape) > len(x.lead) + 1:
                self.feature("bias rank above activation")
            b = self.init((self.rng.standard_normal(shape) * 0.5).astype(self.dtype), "bias")
            y, _ = self.node("Add", [y, b] if bias == "add" else [b, y], "biasadd")
            self.feature(f"bias {bias}")
            lead = x.lead if len(shape) <= len(x.lead) + 1 else (1,) * (len(shape) - 1 - len(x.lead)) + x.lead
            return Val(y, out, x.dtype, lead), name, w
        return Val(y, out, x.dtype, x.lead), name, w

    def lowrank(self, z_src: Val, out: int, rank: int, *, kind: str, a_name: str | None = None, z: Val | None = None) -> tuple[Val, Adapter, Val]:
        """``s * ((src @ A) @ B)`` (or ``s * (z @ B)`` when ``z`` is given): (output, adapter, z)."""
        nodes = set()
        scale = float(self.pick([1.0, 2.0, 0.5, -1.5]))
        where = self.pick(["after", "after", "before", "none", "div"])
        if z is None:
            src = z_src
            cast = self.pick(["none"] * 6 + ["same", "identity", "fp16", "int32", "float64"])
            if cast != "none":
                src = self.cast(z_src, cast)
                nodes.add(self.nodes[-1].name)
            a = self.weight(z_src.width, rank, "A")
            zname, an = self.node("MatMul", [src.name, a], a_name or "loraA")
            nodes.add(an)
            z = Val(zname, rank, z_src.dtype, z_src.lead)
        cur, lead = z.name, z.lead
        if where == "before" and scale != 1.0:
            cur, n = self.node("Mul", [cur, self.scalar(scale)], "scale")
            lead = self.raised(lead, self.last_scalar_rank)
            nodes.add(n)
        if self.chance(0.1):
            cur, n = self.node("Cast", [cur], "cast", to=_ONNX_TYPE[z.dtype])
            nodes.add(n)
            self.feature("cast inside chain")
        b_init = self.weight(rank, out, "B")
        b_trans = len(lead) == 1 and self.chance(0.2)
        if b_trans:
            b_init_t = self.init(numpy_helper.to_array(self.inits.pop()).T.copy(), "Bt")
            cur, bn = self.node("Gemm", [cur, b_init_t], "loraB", transB=1)
            b_init = b_init_t
            self.feature("B as Gemm transB")
        else:
            cur, bn = self.node("MatMul", [cur, b_init], "loraB")
        nodes.add(bn)
        if where == "after" and scale != 1.0:
            cur, n = self.node("Mul", [cur, self.scalar(scale)] if self.chance(0.7) else [self.scalar(scale), cur], "scale")
            lead = self.raised(lead, self.last_scalar_rank)
            nodes.add(n)
        elif where == "div" and scale != 1.0:
            cur, n = self.node("Div", [cur, self.scalar(1.0 / scale)], "scale")
            lead = self.raised(lead, self.last_scalar_rank)
            nodes.add(n)
        self.feature(f"scale {where}")
        adapter = Adapter(kind, bn, b_init, nodes)
        self.adapters.append(adapter)
        return Val(cur, out, z.dtype, lead), adapter, z

    def add(self, a: Val, b: Val) -> Val:
        ordered = [a.name, b.name] if self.chance(0.5) else [b.name, a.name]
        y, _ = self.node("Add", ordered, "add")
        lead = a.lead if len(a.lead) >= len(b.lead) else b.lead
        return Val(y, a.width, a.dtype, lead)

    def maybe_extra_use(self, value: Val, what: str, p: float = 0.12) -> None:
        if self.chance(p):
            if self.chance(0.5):
                self.output(value.name)
                self.feature(f"graph output at {what}")
            else:
                y, _ = self.node("ReduceSum", [value.name], "extra", keepdims=0)
                self.output(y)
                self.feature(f"extra consumer of {what}")


# -------------------------------------------------------------------- scenarios


def _lora_block(bld: Builder, x: Val, dims: list[int]) -> list[Val]:
    """A group of projections reading ``x`` (QKV-style), each maybe with LoRA."""
    outs = []
    shared_w = None
    for i in range(int(bld.rng.integers(1, 4))):
        out = bld.pick(dims)
        shared = shared_w if shared_w and bld.chance(0.25) and shared_w[1] == out and shared_w[2] == x.width else None
        if shared:
            bld.feature("shared weight")
        p, gemm, w = bld.projection(x, out, shared=shared[0] if shared else None)
        if len(bld.nodes[-1].input) > 1 and bld.nodes[-1].op_type == "MatMul":
            shared_w = (w, out, x.width)
        bld.maybe_extra_use(p, "base output")
        y = p
        if bld.chance(0.7):
            rank = bld.pick([1, 2, 2, 3, 4, 6]) if min(x.width, out) >= 8 else 1
            if rank > 0.5 * min(x.width, out):
                bld.feature("rank too large")
            reads = x
            if bld.chance(0.1) and len(bld.values) > 1:
                other = bld.pick([v for v in bld.values if v.width == x.width and v.dtype == x.dtype and v.name != x.name] or [x])
                if other is not x:
                    reads = other
                    bld.feature("chain reads another tensor")
            if bld.chance(0.06):
                rel, _ = bld.node("Relu", [reads.name], "relu")
                reads = Val(rel, reads.width, reads.dtype, reads.lead)
                bld.feature("nonlinear before chain")
            c, adapter, z = bld.lowrank(reads, out, rank, kind="lora")
            adapter.shaped = reads is x or rank <= 0.5 * min(x.width, out)
            bld.maybe_extra_use(z, "z", 0.08)
            bld.maybe_extra_use(c, "chain output", 0.06)
            if bld.chance(0.12):  # two adapters on one add: x@W + (C1 + C2), or nested (x@W + C1) + C2
                c2, _, _ = bld.lowrank(x, out, max(1, rank // 2), kind="lora")
                if bld.chance(0.5):
                    y = bld.add(p, bld.add(c, c2))
                    bld.feature("x@W + (C1 + C2)")
                else:
                    y = bld.add(bld.add(p, c), c2)
                    bld.feature("(x@W + C1) + C2")
            else:
                y = bld.add(p, c)
            bld.maybe_extra_use(y, "adapted output")
        outs.append(y)
    return outs


def _mix(bld: Builder, values: list[Val], width: int) -> Val:
    """A nonlinearity and a projection back to ``width`` (a block boundary)."""
    v = bld.pick(values)
    act, _ = bld.node(bld.pick(["Relu", "Tanh", "Sigmoid"]), [v.name], "act")
    p, _, _ = bld.projection(Val(act, v.width, v.dtype, v.lead), width)
    return p


def _lanes(bld: Builder, acts: list[Val], dims: list[int]) -> None:
    """FFA/FBA lanes: z = t @ A written from one activation, read by projections of others."""
    t = bld.pick(acts)
    rank = bld.pick([1, 2, 3])
    a = bld.weight(t.width, rank, "lanesA")
    src = t
    if bld.chance(0.1):
        src = bld.cast(t, bld.pick(["same", "fp16", "int32"]))
    zname, an = bld.node("MatMul", [src.name, a], "lanesA")
    z = Val(zname, rank, t.dtype, t.lead)
    bld.maybe_extra_use(z, "lanes", 0.08)
    if bld.chance(0.8):  # the host
        hp, _, _ = bld.projection(t, bld.pick(dims))
        bld.values.append(hp)
        bld.output(hp.name)
    readers = [v for v in acts + bld.values if v.lead == t.lead and v.dtype == t.dtype] or [t]
    for _ in range(int(bld.rng.integers(1, 4))):
        x = bld.pick(readers)
        out = bld.pick(dims)
        p, _, _ = bld.projection(x, out)
        bld.maybe_extra_use(p, "reader base output")
        c, adapter, _ = bld.lowrank(x, out, rank, kind="lane", z=z)
        adapter.nodes.add(an)
        y = bld.add(p, c)
        bld.maybe_extra_use(y, "reader output", 0.3)
        bld.values.append(y)
        bld.output(y.name)
    bld.feature("ffa/fba lanes")


def _crossed_hosts(bld: Builder, acts: list[Val], dims: list[int]) -> None:
    """Two lanes whose hosts read each other's lanes: ``h1 = t1 @ W1 + z2 @ B2``, ``h2 = t2 @ W2 + z1 @ B1``
    with ``z_i = t_i @ A_i`` (widened as drawn, each host would need the other's output)."""
    t1 = bld.pick(acts)
    others = [v for v in acts if v.name != t1.name and v.lead == t1.lead and v.dtype == t1.dtype]
    if not others:
        return
    t2 = bld.pick(others)
    rank = bld.pick([1, 2])
    zs = []
    for t in (t1, t2):
        z, an = bld.node("MatMul", [t.name, bld.weight(t.width, rank, "crossA")], "crossA")
        zs.append((Val(z, rank, t.dtype, t.lead), an))
    for t, (z, an) in ((t1, zs[1]), (t2, zs[0])):
        out = bld.pick(dims)
        p, _, _ = bld.projection(t, out)
        c, adapter, _ = bld.lowrank(t, out, rank, kind="lane", z=z)
        adapter.nodes.add(an)
        y = bld.add(p, c)
        bld.output(y.name)
        bld.values.append(y)
    bld.feature("crossed lane hosts")


def _zflora(bld: Builder, dims: list[int], lead: tuple) -> None:
    """A zFLoRA stream read: a[.., :d] @ W + s * a[.., d:] @ B (complementary or not)."""
    d, r = bld.pick(dims), bld.pick([1, 2, 3])
    stream = bld.graph_input(d + r, lead)
    starts = [0, d, d + r]
    lo_end = d if bld.chance(0.85) else d - 1
    if lo_end != d:
        bld.feature("zflora slices not complementary")

    def cut(a, b):
        s, _ = bld.node("Slice", [stream.name, bld.init(np.array([a], np.int64), "st"), bld.init(np.array([b], np.int64), "en"), bld.init(np.array([-1], np.int64), "ax")], "slice")
        return s

    for _ in range(int(bld.rng.integers(1, 3))):
        low = Val(cut(0, lo_end), lo_end, stream.dtype, lead)
        if bld.chance(0.1):
            low = bld.cast(low, "same")
            bld.feature("zflora base lanes through a cast")
        out = bld.pick(dims)
        p, _, _ = bld.projection(low, out)
        lanes = Val(cut(d, starts[2]), r, stream.dtype, lead)
        c, adapter, _ = bld.lowrank(lanes, out, r, kind="zflora", z=lanes)
        y = bld.add(p, c)
        bld.output(y.name)
        bld.maybe_extra_use(p, "zflora base output")
    bld.feature("zflora read")


#: rank-0 float graph inputs (used as a scale of an activation); verify.py once could not synthesize them
RANK0_INPUTS = True


def generate(seed: int, *, rank0_inputs: bool | None = None) -> Case:
    rng = np.random.default_rng(seed)
    dtype = "float16" if rng.random() < 0.12 else "float32"
    bld = Builder(rng, dtype)
    if dtype == "float16":
        bld.feature("fp16 graph")
    dims = [8, 12, 16]
    lead = bld.pick([(2, 3), (3,), (2, 3), (1, 2, 3)])
    n_inputs = int(rng.integers(1, 3))
    acts = [bld.graph_input(bld.pick(dims), lead) for _ in range(n_inputs)]
    if bld.chance(0.1) and (RANK0_INPUTS if rank0_inputs is None else rank0_inputs):  # a rank-0 float graph input as a scale
        s = bld.graph_input(1, (), None)
        bld.inputs[-1] = helper.make_tensor_value_info(s.name, _ONNX_TYPE[dtype], [])
        bld.feeds[s.name] = np.asarray(rng.standard_normal(), dtype=dtype)
        scaled, _ = bld.node("Mul", [acts[0].name, s.name], "inscale")
        acts[0] = Val(scaled, acts[0].width, dtype, lead)
        bld.feature("rank-0 float input")
    bld.values = list(acts)
    blocks = int(rng.integers(1, 3))
    for _ in range(blocks):
        x = bld.pick(bld.values)
        outs = _lora_block(bld, x, dims)
        for y in outs:
            bld.values.append(y)
        if bld.chance(0.5):
            bld.values.append(_mix(bld, outs, bld.pick(dims)))
    if rng.random() < 0.45:
        _lanes(bld, bld.values, dims)
    if rng.random() < 0.25:
        _lanes(bld, bld.values, dims)
    if rng.random() < 0.1:
        _crossed_hosts(bld, bld.values, dims)
    if rng.random() < 0.15:
        _zflora(bld, dims, lead)
    consumed = {i for n in bld.nodes for i in n.input}
    for node in bld.nodes:  # every dangling value is an output; some intermediates too
        for out in node.output:
            if out not in consumed or rng.random() < 0.04:
                bld.output(out)
    model = bld.model()
    return Case(seed, model, bld.adapters, bld.feeds, sorted(set(bld.features)), dtype)


# -------------------------------------------------------------------- judge


def run(model: onnx.ModelProto, feeds: dict) -> dict:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    return dict(zip(names, session.run(None, {k: v for k, v in feeds.items() if k in wanted})))


def zeroed(model: onnx.ModelProto, inits: set[str]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for i, tensor in enumerate(copy.graph.initializer):
        if tensor.name in inits:
            array = numpy_helper.to_array(tensor)
            copy.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.zeros_like(array), tensor.name))
    return copy


def same(got: dict, want: dict, tol: float) -> str | None:
    """None when every output of ``want`` is in ``got`` and equal within ``tol``; else why not."""
    for name, ref in want.items():
        if name not in got:
            return f"output '{name}' missing"
        out = got[name]
        if out.shape != ref.shape or out.dtype != ref.dtype:
            return f"output '{name}' is {out.dtype}{list(out.shape)}, want {ref.dtype}{list(ref.shape)}"
        a, b = out.astype(np.float64), ref.astype(np.float64)
        if not np.allclose(a, b, atol=tol, rtol=tol, equal_nan=True):
            return f"output '{name}' differs by {np.nanmax(np.abs(a - b)):.3g}"
    if set(got) != set(want):
        return f"outputs {sorted(set(got) ^ set(want))} differ in name"
    return None


@dataclasses.dataclass
class Verdict:
    seed: int
    strategy: str
    cls: str
    detail: str = ""
    features: list = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _compile(case: Case, strategy: str, verify: bool, verify_mode: str = "auto"):
    import onnx_ir as ir

    from zflora_compile.options import CompileOptions
    from zflora_compile.pipeline import compile_model

    model = ir.from_proto(case.model)
    result, report = compile_model(model, CompileOptions(strategy=strategy, verify=verify, verify_mode=verify_mode if verify else "off"))
    return ir.to_proto(result), report


def _stripped_binding_nodes(report) -> tuple[set[str], set[str]]:
    """(B nodes the strip plan dropped, base projection nodes it kept), by node name."""
    dropped, bases = set(), set()
    for step in report.plan.rewrites:
        sites = [step.site] if hasattr(step, "site") else list(getattr(step, "sites", []))
        for site in sites:
            binding = site.binding
            if hasattr(binding, "b_gemm"):
                if binding.b_gemm is not None:  # densified and DoRA sites zero their whole branch
                    dropped.add(binding.b_gemm.node.name)
                bases.add(binding.gemm.node.name)
            elif not hasattr(binding, "b_gemms"):  # a generic linear branch: its projection stays
                if binding.gemm is not None:
                    bases.add(binding.gemm.node.name)
            else:
                dropped.update(g.node.name for g in binding.b_gemms)
                bases.add(binding.node.name)
    return dropped, bases


def judge(case: Case, strategy: str, *, always_verify: bool = True, verify_mode: str = "auto") -> Verdict:
    from zflora_compile.errors import VerificationError, ZcompileError

    verdict = lambda cls, detail="": Verdict(case.seed, strategy, cls, detail, case.features)  # noqa: E731
    original = run(case.model, case.feeds)
    try:
        raw, report = _compile(case, strategy, verify=False)
    except VerificationError as error:  # the checker failed on the raw rewrite
        return verdict("caught", str(error)[:300])
    except ZcompileError as error:
        return verdict("refused", f"{type(error).__name__}: {str(error)[:300]}")
    except Exception as error:  # noqa: BLE001
        return verdict("crash", f"verify=False: {type(error).__name__}: {error}\n{traceback.format_exc()[-1500:]}")
    rewritten = len(report.plan) > 0
    rejections = list(report.detection.rejections) if report.detection is not None else []
    try:
        got = run(raw, case.feeds)
    except Exception as error:  # noqa: BLE001
        problem = f"the written model does not run: {type(error).__name__}: {str(error)[:300]}"
    else:
        problem = None
        if strategy == "strip":
            # a strip that writes anything must give the base model: every adapter the generator
            # built switched off, whatever the detection found (it refuses, exit 2, otherwise)
            dropped, bases = _stripped_binding_nodes(report)
            real = {a.b_node: a for a in case.adapters}
            adapter_nodes = set().union(*(a.nodes for a in case.adapters)) if case.adapters else set()
            if bases & adapter_nodes:
                problem = f"strip kept adapter GEMM(s) {sorted(bases & adapter_nodes)} as base projections"
            elif dropped - set(real):
                problem = f"strip dropped GEMM(s) {sorted(dropped - set(real))} that apply no adapter"
            else:
                reference = run(zeroed(case.model, {a.b_init for a in case.adapters if a.shaped}), case.feeds)
                problem = same(got, reference, case.tolerance)
        else:
            problem = same(got, original, case.tolerance)
    if problem is None and not always_verify:
        return verdict("exact" if rewritten else ("refused" if rejections else "unchanged"))
    try:
        _compile(case, strategy, verify=True, verify_mode=verify_mode)
    except VerificationError as error:
        return verdict("caught", f"{'raw rewrite wrong: ' + problem if problem else 'false alarm: '} | {str(error)[:300]}")
    except ZcompileError as error:
        return verdict("crash", f"verify=True raised {type(error).__name__} after a clean raw rewrite: {str(error)[:300]}")
    except Exception as error:  # noqa: BLE001
        return verdict("crash", f"verify=True: {type(error).__name__}: {error}\n{traceback.format_exc()[-1500:]}")
    if problem is not None:
        return verdict("wrong", problem)
    return verdict("exact" if rewritten else ("refused" if rejections else "unchanged"))


def fuzz(seeds, strategies=STRATEGIES, *, always_verify: bool = True, verify_mode: str = "auto"):
    """Yield a :class:`Verdict` per (seed, strategy); ``verify_mode``: the compile's ``--verify``."""
    for seed in seeds:
        case = generate(seed)
        for strategy in strategies:
            yield judge(case, strategy, always_verify=always_verify, verify_mode=verify_mode)
