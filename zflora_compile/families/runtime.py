"""LoRA whose weights the compiler must not fold: adapters fed at run time, and quantized bases.

Pattern: an add, in either operand order, of a base projection ``P(x)`` and ``s * ((x @ A) @ B)``
(the LoRA chain of :mod:`.lora`: optional constant scalar multiplies / divides and lossless casts)
where at least one of these holds:

- A or B is **fed at run time**: a graph input, with or without an initializer of the same name
  (that initializer is only a default a caller may override: Olive's ``ExtractAdapters`` writes
  every LoRA weight so, with an empty default whose rank axis is symbolic, ``lora_r``; ONNX
  Runtime's multi-LoRA binds ``.onnx_adapter`` files to them), or a ``DequantizeLinear`` of
  constants; such a site is **switchable** when a weight is a graph input;
- ``P`` is **quantized**: ``com.microsoft::MatMulNBits`` (onnxruntime-genai's ``-p int4``, ONNX
  Runtime's ``MatMulNBitsQuantizer``) or ``MatMul(x, DequantizeLinear(q, scale, zero_point))`` (QDQ);
  A and B may be MatMulNBits too.

Everything else about the site is checked as for LoRA (same input ``x`` up to lossless casts, single-use
intermediates, shapes that line up, small rank where the rank is a number; a symbolic rank axis is
the adapter's own and is accepted). A LoRA whose every part is a float constant is :mod:`.lora`'s.

Plan. For the sites of one group (one input ``x``, one dtype, A's and B's of one kind)::

    z   = x @ [A_1 | .. | A_n]                                  # one GEMM, [.., R]
    low = z @ blockdiag(s_1 B_1, .., s_n B_n)                   # one GEMM, [.., D]
    y_i = P_i(x) + low[.., offset_i : offset_i + out_i]         # a Split, one add each

- **fuse**, run-time weights: ``[A_1 | .. | A_n]`` is a ``Concat`` on the last axis of the weights
  as fed, and ``blockdiag`` is built at run time: each ``s_i * B_i`` (the scale applied to the small
  ``B_i``, not to activations) padded with zeros to ``[r_i, D]`` (``Pad``: ``offset_i`` columns in
  front, ``D - offset_i - out_i`` behind), the blocks joined by a ``Concat`` on axis 0. The graph
  inputs keep their names, dtypes, shapes and symbolic rank axes, so the same adapter files bind;
  an empty adapter (``r_i = 0``) gives an empty block, and ``low = 0``. Constant float bases are
  widened as LoRA's are (``x @ [W_1 | .. | W_n]``, one constant GEMM and a Split: a constant may be
  concatenated at compile time), so a group costs 3 GEMMs instead of ``3n``.
- **fuse**, quantized bases: MatMulNBits bases of one input with equal ``K``, ``bits``,
  ``block_size``, ``accuracy_level`` and operand layouts are packed into one MatMulNBits along ``N``
  (packed B, scales, zero points and bias concatenated row by row: every output column is computed
  from its own rows, so the packing is bit-exact; this is the packed QKV / gate-up projection
  onnxruntime-genai's builder turns off when LoRA is present); MatMulNBits A's packable with the
  base are packed into the same node (``x @ [W_1 | .. | W_n | A_1 | .. | A_n]``, cut by a Split),
  else into one of their own; float A's and B's are concatenated (constants at compile time, fed
  weights at run time) as above. MatMulNBits B's are kept, one per site, each reading its own
  ``r_i`` lanes of ``z`` (a block-diagonal B would have to be re-quantized with other blocks).
  QDQ (``MatMul(x, DequantizeLinear(q, scale, zero_point))``, blocked along K or per column) is
  packed the same way: ``q``, scales and zero points concatenated along ``N`` into one
  DequantizeLinear (ONNX Runtime fuses each pair into a MatMulNBits, column for column as before);
  QDQ B's are kept per site. Bases that cannot be packed are left as they are: only the adapter
  GEMMs fuse.
- **merge** refuses (``PlanError``, exit 2, nothing written) and says why: a weight fed at run
  time would be frozen (the model would ignore the adapter a caller binds), a quantized base
  would have to be re-quantized (``W + s A@B`` in int4 is not the model).
- **strip**: ``y = P(x)``, the base model. Adapter graph inputs stay as (unused) inputs with their
  defaults: ONNX Runtime refuses a feed for an input the model does not have, so callers that bind
  adapters keep working.
"""

from __future__ import annotations

from zflora_compile.errors import PlanError

import dataclasses
from typing import ClassVar

import numpy as np

from zflora_compile import metadata
from zflora_compile.families.lora import StripSite
from zflora_compile.graph.protocol import (
    Gemm,
    NotACandidate,
    Reject,
    bias_problem,
    check_casts,
    check_path,
    either_order,
    match_projection,
    produced_by,
    single_use,
    zero_branch,
)
from zflora_compile.graph.records import LazyArray, Rejection, RuntimeSite, numpy_dtype

NAME = "lora"


@dataclasses.dataclass
class Part:
    """One weight of the chain: the GEMM applying it, what the weight is, its ``[in, out]`` dims
    (a symbolic axis by name, None when unnamed) and its element type."""

    gemm: Gemm
    kind: str  # "constant" | "graph input" | "dequantized" | "MatMulNBits"
    dims: tuple
    dtype: str | None
    getter: object = None  # [in, out] array getter, constants only


@dataclasses.dataclass
class RuntimeBinding:
    """The graph handles of one run-time site."""

    add: object
    gemm: Gemm  # the base projection's GEMM (a quantized one: MatMulNBits or the QDQ MatMul)
    base_output: object  # the add's base operand, after its bias: what strip keeps
    b_gemm: Gemm
    chain_nodes: list
    branch: object  # the add's adapter operand
    a: Part
    b: Part
    bias_add: object = None  # the projection's separate bias add, if any
    bias_value: object = None  # its constant bias (a separate add's or MatMulNBits' own)
    nbits_key: tuple | None = None  # the base's packing key (MatMulNBits, or QDQ's DequantizeLinear), else None
    a_key: tuple | None = None  # the A's packing key (MatMulNBits, or a packable DequantizeLinear), else None


# ---------------------------------------------------------------- pattern and check


def _weight_gemm(view, value):
    gemm = view.gemm(value)
    return gemm if gemm is not None else view.quantized_gemm(value)


def _part(view, gemm: Gemm, role: str) -> Part:
    if gemm.kind == "MatMulNBits":
        if gemm.bias is not None:
            raise Reject(f"low-rank {role} GEMM '{view.name(gemm.node)}' has a bias")
        return Part(gemm, "MatMulNBits", tuple(gemm.shape), view.value_dtype(gemm.x))
    if gemm.bias is not None:
        raise Reject(f"low-rank GEMM '{view.name(gemm.node)}' has a bias")
    if view.is_constant(gemm.weight):
        if gemm.shape is None:
            raise Reject(f"{role} '{view.value_name(gemm.weight)}' of '{view.name(gemm.node)}' is not 2-D (shape {list(view.constant_shape(gemm.weight))})")
        return Part(gemm, "constant", tuple(gemm.shape), view.dtype(gemm.weight), view.weight(gemm))
    found = view.runtime_weight(gemm)
    if found is None:
        raise Reject(
            f"low-rank {role} '{view.value_name(gemm.weight)}' of '{view.name(gemm.node)}' is neither a constant nor a weight fed at run time "
            f"({produced_by(view, gemm.weight)})"
        )
    kind, dims = found
    return Part(gemm, kind, tuple(dims), view.value_dtype(gemm.weight))


def _chain(view, value):
    reached, scale_after, nodes = view.walk_back(value)
    b = _weight_gemm(view, reached)
    if b is None:
        _refuse_run_time_scale(view, reached)
        raise NotACandidate
    nodes.append(b.node)
    reached, scale_between, more = view.walk_back(b.operand)
    nodes += more
    a = _weight_gemm(view, reached)
    if a is None:
        _refuse_run_time_scale(view, reached)
        raise NotACandidate
    nodes.append(a.node)
    return _part(view, a, "A"), _part(view, b, "B"), scale_after * scale_between, nodes


def _scaled_gemm(view, value):
    """``(gemm, factor)`` where ``value`` is a run-time weight's GEMM (or a quantized one) times a
    factor that is no constant (walked back through what :meth:`walk_back` passes); else None."""
    node = view.producer(value)
    if node is None or view.op(node) not in ("Mul", "Div") or len(view.inputs(node)) != 2:
        return None
    for i, operand in enumerate(view.inputs(node)):
        try:
            gemm = _weight_gemm(view, view.walk_back(operand)[0])
        except Reject:
            gemm = None
        if gemm is not None and (gemm.kind == "MatMulNBits" or (gemm.weight is not None and view.runtime_weight(gemm) is not None)):
            return gemm, view.inputs(node)[1 - i]
    return None


def _refuse_run_time_scale(view, value) -> None:
    """A chain of run-time weights scaled by a factor fed at run time: no fused form here; say so
    (the add is adapter-shaped: strip refuses while it stays)."""
    scaled = _scaled_gemm(view, value)
    if scaled is not None:
        gemm, factor = scaled
        raise Reject(f"the scale '{view.value_name(factor)}' of the adapter GEMM '{view.name(gemm.node)}' is no constant (fed or computed at run time): not fused, merged or stripped here")


def _base(view, value):
    """The base projection: quantized (MatMulNBits / QDQ) or a float one with a constant weight."""
    projection = view.quantized_projection(view.peel(value, casts=False))
    if projection is not None:
        return projection, projection.gemm.kind
    return match_projection(view, value), "float"


def _dim(value) -> str:
    return str(value) if value is not None else "?"


def _rank(view, add, base_shape, a: Part, b: Part, max_rank_ratio: float):
    """The rank (an int, or the symbolic axis' name), after checking that W, A and B line up."""
    in_w, out_w = base_shape
    (in_a, r_a), (r_b, out_b) = a.dims, b.dims
    for got, want, what in ((in_a, in_w, "A's input axis"), (out_b, out_w, "B's output axis")):
        if not isinstance(got, int):
            raise Reject(f"{what} at '{view.name(add)}' is {_dim(got)}, not a fixed size ({want})")
        if got != want:
            raise Reject(f"shapes do not line up at '{view.name(add)}': W [{in_w}, {out_w}], A [{in_a}, {_dim(r_a)}], B [{_dim(r_b)}, {out_b}]")
    if isinstance(r_a, int) and isinstance(r_b, int) and r_a != r_b:
        raise Reject(f"shapes do not line up at '{view.name(add)}': A [{in_a}, {r_a}], B [{r_b}, {out_b}]")
    if isinstance(r_a, str) and isinstance(r_b, str) and r_a != r_b:
        raise Reject(f"A's rank axis '{r_a}' and B's '{r_b}' at '{view.name(add)}' are not the same axis")
    rank = r_a if isinstance(r_a, int) else r_b if isinstance(r_b, int) else (r_a or r_b)
    if rank is None:
        raise Reject(f"the rank axis of the adapter at '{view.name(add)}' has no size and no name")
    if isinstance(rank, int) and rank > max_rank_ratio * min(in_w, out_w):
        raise Reject(f"rank {rank} is not small relative to W [{in_w}, {out_w}] (limit {max_rank_ratio:g} x {min(in_w, out_w)})")
    return rank


def _match_site(view, add, base_value, low_value, max_rank_ratio: float, index: int) -> RuntimeSite:
    a, b, scale, nodes = _chain(view, low_value)
    projection, base_kind = _base(view, base_value)
    if base_kind == "float" and a.kind == "constant" and b.kind == "constant":
        raise NotACandidate  # a constant LoRA: the lora family's
    gemm = projection.gemm
    source = view.peel(a.gemm.x)
    if view.peel(gemm.x) is not source:
        raise Reject(
            f"low-rank chain reads '{view.value_name(source)}' but the projection '{view.name(gemm.node)}' "
            f"it is added to reads '{view.value_name(view.peel(gemm.x))}'"
        )
    activation = view.value_dtype(gemm.x)
    check_casts(view, gemm.x, source, activation, "the input of the base projection")
    check_casts(view, a.gemm.x, source, a.dtype, "the input of A")
    check_casts(view, b.gemm.operand, a.gemm.out, b.dtype, "the lanes between A and B")
    check_path(view, base_value, gemm.node, add, "base projection output")
    for i, node in enumerate(nodes):  # nodes[i] feeds nodes[i - 1], nodes[0] the add
        single_use(view, view.output(node), nodes[i - 1] if i else add, "low-rank intermediate")
    if base_kind == "float":
        in_w, out_w = projection.shape
        dtype = view.dtype(gemm.weight)
    else:
        in_w, out_w = gemm.shape
        dtype = activation or "float32"
    rank = _rank(view, add, (in_w, out_w), a, b, max_rank_ratio)
    if a.kind in ("MatMulNBits", "dequantized") and (view.nbits_key(a.gemm) if a.kind == "MatMulNBits" else view.qdq_key(a.gemm)) is None:
        raise Reject(f"quantized A '{view.name(a.gemm.node)}' cannot be packed (g_idx, or a layout the packing does not handle): left as it is")
    if b.kind in ("MatMulNBits", "dequantized") and not isinstance(rank, int):
        raise Reject(f"B of '{view.name(b.gemm.node)}' is quantized ({b.kind}) but the rank is symbolic")
    for part, role in ((a, "A"), (b, "B")):
        if part.kind != "MatMulNBits" and part.dtype is not None and activation is not None and part.dtype != activation:
            raise Reject(f"low-rank {role} of '{view.name(part.gemm.node)}' is {part.dtype}, the activations {activation}: the chain is computed in another precision")
    bias_getter = None
    if projection.bias is not None:
        problem = bias_problem(view, projection.bias, out_w, gemm.x)
        if problem:
            raise Reject(f"bias of '{view.name(gemm.node)}' {problem}")
        getter = view.constant_array(projection.bias)
        bias_getter = lambda g=getter, n=out_w: g().reshape(n)  # noqa: E731
    float_base = base_kind == "float"
    out = view.output(add)
    bias_add = [projection.bias_add] if projection.bias_add is not None else []
    return RuntimeSite(
        site_id=f"lora_rt{index}",
        family=NAME,
        label=view.label(gemm.node, gemm.weight),
        input_name=view.value_name(gemm.x),
        output_name=view.value_name(out),
        in_features=in_w,
        out_features=out_w,
        rank=rank,
        scale=scale,
        dtype=dtype,
        has_bias=projection.bias is not None,
        nodes=[view.name(n) for n in [gemm.node, *bias_add, *reversed(nodes), add]],
        weight=view.weight(gemm) if float_base else None,
        lora_a=a.getter if float_base else None,
        lora_b=b.getter if float_base else None,
        bias=bias_getter if float_base else None,
        base=base_kind,
        a_kind=a.kind,
        b_kind=b.kind,
        quantization=None if float_base else view.quantization(gemm),
        binding=RuntimeBinding(
            add, gemm, base_value, b.gemm, list(nodes), low_value, a, b,
            bias_add=projection.bias_add,
            bias_value=projection.bias,
            nbits_key=view.nbits_key(gemm) if base_kind == "MatMulNBits" else view.qdq_key(gemm) if base_kind == "QDQ" else None,
            a_key=view.nbits_key(a.gemm) if a.kind == "MatMulNBits" else view.qdq_key(a.gemm) if a.kind == "dequantized" else None,
        ),
    )


def _group_key(site: RuntimeSite):
    b = site.binding
    a_mode = ("nbits", b.a_key) if b.a.kind == "MatMulNBits" else ("qdq", b.a_key) if b.a_key is not None else ("float", b.a.dtype)
    b_mode = b.b.kind if b.b.kind in ("MatMulNBits", "dequantized") else ("float", b.b.dtype)
    return (id(b.gemm.x), site.dtype, a_mode, b_mode)


def detect(view, found) -> None:
    """Every run-time LoRA site of ``view`` (ONNX only: quantized ops and graph-input weights are
    ONNX forms) into ``found``; rejections for the adds shaped like one that fail a check."""
    if getattr(view, "ir", None) != "onnx":
        return
    sites: list[RuntimeSite] = []
    for add, operands in view.adds():
        if found.claimed(add):
            continue

        def match(base, low, add=add):
            return _match_site(view, add, base, low, found.max_rank_ratio, len(sites))

        site, reason = either_order(match, operands)
        if site is not None:
            sites.append(site)
            b = site.binding
            found.claim(add, b.gemm.node, *b.chain_nodes, *([b.bias_add] if b.bias_add is not None else []))
        elif reason and _runtime_shaped(view, operands):
            found.reject(Rejection(node=view.name(add), reason=reason, label=view.label(add)))
            found.shaped.add(id(add))  # adapter-shaped: unrecognised unless another family takes it
    groups: dict[tuple, str] = {}
    for site in sites:
        site.group = groups.setdefault(_group_key(site), f"rt{len(groups)}")
    found.sites += sites


def _runtime_shaped(view, operands) -> bool:
    """An add this family would have taken but for a failed check: one operand a quantized
    projection, or a chain reading a weight that is a graph input (the lora family's reason stays
    for the rest)."""
    for value in operands:
        if view.quantized_projection(view.peel(value, casts=False)) is not None:
            return True
        reached = view.walk_back(value)[0]
        for _ in range(2):
            try:
                gemm = _weight_gemm(view, reached)
            except Reject:
                gemm = None
            if gemm is None and _scaled_gemm(view, reached) is not None:
                return True
            if gemm is None:
                break
            if gemm.kind == "MatMulNBits" or (gemm.weight is not None and view.runtime_weight(gemm) is not None):
                return True
            reached = view.walk_back(gemm.operand)[0]
    return False


# ---------------------------------------------------------------- plan


def _rank_text(ranks) -> int | str:
    return sum(ranks) if all(isinstance(r, int) for r in ranks) else " + ".join(str(r) for r in ranks)


def _scaled(getter, scale: float, dtype):
    """``s * B`` accumulated in fp32, cast to ``dtype``."""
    return (getter().astype(np.float32) * np.float32(scale)).astype(dtype)


@dataclasses.dataclass
class FuseRuntime:
    """The sites of one group: ``z = x @ [A_i]``, ``low = z @ blockdiag(s_i B_i)``, ``y_i = P_i(x) + low_i``
    (see the module docstring for which parts are constants, run-time values or packed MatMulNBits)."""

    section: ClassVar[str] = "fused_groups"
    name: str
    sites: list[RuntimeSite]
    base_mode: str  # "widened" (constant float W) | "packed" (MatMulNBits) | "packed dequantized" (QDQ) | "kept"
    a_mode: str  # "with base" | "constant" | "packed" | "packed dequantized" | "run-time concat"
    b_mode: str  # "constant" | "run-time" | "per site" (quantized B's)

    @property
    def out_splits(self) -> list[int]:
        return [s.out_features for s in self.sites]

    def to_json(self) -> dict:
        width = sum(self.out_splits)
        rank = _rank_text([s.rank for s in self.sites])
        return {
            "name": self.name,
            "sites": [s.site_id for s in self.sites],
            "out_splits": self.out_splits,
            "rank_total": rank,
            "weight_shape": [self.sites[0].in_features, width if self.base_mode != "kept" else 0],
            "lowrank_shape": [rank, width],
            "runtime": {"base": self.base_mode, "A": self.a_mode, "B": self.b_mode, "switchable": any(s.switchable for s in self.sites)},
        }

    def emit(self, graph, state: dict) -> None:
        sites, bindings = self.sites, [s.binding for s in self.sites]
        order = state.setdefault("order", graph.order())
        first = min(bindings, key=lambda b: order[id(b.add)])
        x, ax = first.gemm.x, first.a.gemm.x
        outs = self.out_splits
        width = sum(outs)
        dtype = numpy_dtype(sites[0].dtype)
        ranks = [s.rank for s in sites]
        with graph.at(first.add, self.name):
            base_lanes = z = None
            if self.base_mode == "widened":
                getters = [s.weight for s in sites] + ([b.a.getter for b in bindings] if self.a_mode == "with base" else [])
                wide_width = width + (sum(ranks) if self.a_mode == "with base" else 0)
                weight = LazyArray((sites[0].in_features, wide_width), dtype, lambda g=getters: np.concatenate([f().astype(dtype) for f in g], axis=1))
                wide = graph.project(x, weight, like=first.gemm, name="fused_weight")
            elif self.base_mode in ("packed", "packed dequantized"):
                gemms = [b.gemm for b in bindings] + ([b.a.gemm for b in bindings] if self.a_mode == "with base" else [])
                wide = graph.nbits_project(x, gemms) if self.base_mode == "packed" else graph.qdq_project(x, gemms)
            if self.base_mode != "kept":
                if self.a_mode == "with base":
                    base_lanes, z = graph.split_last(wide, [width, sum(ranks)])
                else:
                    base_lanes = wide
                if any(s.binding.bias_value is not None for s in sites) and not all(_bias_inside(b) for b in bindings):
                    base_lanes = graph.add(base_lanes, graph.constant("fused_bias", self._bias(dtype)))
            if z is None:
                z = self._lanes(graph, ax, bindings, ranks, dtype)
            if self.b_mode == "per site":
                lanes = graph.split_last(z, ranks)
                parts = []
                for site, lane in zip(sites, lanes):
                    b_gemm = site.binding.b.gemm
                    part = graph.nbits_apply(lane, b_gemm) if b_gemm.kind == "MatMulNBits" else graph.matmul(lane, b_gemm.weight)
                    parts.append(part if site.scale == 1.0 else graph.scale(part, float(site.scale)))
                base_parts = graph.split_last(base_lanes, outs) if base_lanes is not None else [b.base_output for b in bindings]
                results = [graph.add(base, part) for base, part in zip(base_parts, parts)]
            else:
                low = self._low(graph, z, sites, dtype)
                if base_lanes is not None:
                    results = graph.split_last(graph.add(base_lanes, low), outs)
                else:
                    results = [graph.add(b.base_output, part) for b, part in zip(bindings, graph.split_last(low, outs))]
            for binding, result in zip(bindings, results):
                graph.redirect(graph.output(binding.add), result)
        metadata.note(state, self, self.record())

    def _bias(self, dtype) -> LazyArray:
        """``[b_1 | .. | b_n]`` (zeros where a projection has none) for the widened / packed base;
        a packed MatMulNBits carries its own biases already (then only separate bias adds are here)."""
        sites = self.sites

        def bias() -> np.ndarray:
            parts = []
            for site in sites:
                b = site.binding
                inside = _bias_inside(b)
                if b.bias_value is None or inside:
                    parts.append(np.zeros(site.out_features, dtype))
                else:
                    parts.append(np.asarray(_constant(b.bias_value)()).reshape(site.out_features).astype(dtype))
            return np.concatenate(parts)

        return LazyArray((sum(self.out_splits),), dtype, bias)

    def _lanes(self, graph, ax, bindings, ranks, dtype):
        """``z = x @ [A_1 | .. | A_n]``: one GEMM."""
        parts = [b.a for b in bindings]
        if self.a_mode == "packed":
            return graph.nbits_project(ax, [p.gemm for p in parts])
        if self.a_mode == "packed dequantized":
            return graph.qdq_project(ax, [p.gemm for p in parts])
        if self.a_mode == "constant":
            weight = LazyArray((self.sites[0].in_features, sum(ranks)), dtype, lambda g=[p.getter for p in parts]: np.concatenate([f().astype(dtype) for f in g], axis=1))
            return graph.project(ax, weight, name="lora_a")
        weights = [self._value(graph, p, f"lora_a_{i}", dtype) for i, p in enumerate(parts)]
        return graph.matmul(ax, weights[0] if len(weights) == 1 else graph.concat_axis(weights, -1))

    def _low(self, graph, z, sites, dtype):
        """``z @ blockdiag(s_1 B_1, .., s_n B_n)``: one GEMM, the block diagonal a constant or built at run time."""
        outs, width = self.out_splits, sum(self.out_splits)
        if self.b_mode == "constant":
            ranks = [s.rank for s in sites]

            def block() -> np.ndarray:
                out = np.zeros((sum(ranks), width), dtype=np.float32)
                row = col = 0
                for site in sites:
                    out[row : row + site.rank, col : col + site.out_features] = site.binding.b.getter().astype(np.float32) * np.float32(site.scale)
                    row, col = row + site.rank, col + site.out_features
                return out.astype(dtype)

            return graph.project(z, LazyArray((sum(ranks), width), dtype, block), name="lowrank_weight")
        blocks, offset = [], 0
        for i, (site, out) in enumerate(zip(sites, outs)):
            part = site.binding.b
            if part.kind == "constant":  # scaled at compile time, in fp32
                shape = tuple(part.dims)
                value = graph.constant(f"lora_b_{i}", LazyArray(shape, dtype, lambda g=part.getter, s=site.scale: _scaled(g, s, dtype)))
            else:
                value = self._value(graph, part, f"lora_b_{i}", dtype)
                if site.scale != 1.0:
                    value = graph.scale(value, float(site.scale))
            blocks.append(graph.pad_columns(value, offset, width - offset - out) if len(sites) > 1 else value)
            offset += out
        diagonal = blocks[0] if len(blocks) == 1 else graph.concat_axis(blocks, 0)
        return graph.matmul(z, diagonal)

    @staticmethod
    def _value(graph, part: Part, name: str, dtype):
        """A weight as a value in ``[in, out]`` layout: the fed one as it is, a constant as a new initializer."""
        if part.kind == "constant":
            return graph.constant(name, LazyArray(tuple(part.dims), dtype, lambda g=part.getter: g().astype(dtype)))
        return part.gemm.weight

    def record(self) -> dict:
        """What strip of the compiled model needs: each site's final add and which operand is its base."""
        return {
            "kind": "runtime_group",
            "name": self.name,
            "sites": [s.site_id for s in self.sites],
            "labels": [s.label for s in self.sites],
            "families": sorted({s.family for s in self.sites}),
            "base": self.base_mode,
            "switchable": any(s.switchable for s in self.sites),
        }


def _constant(value):
    from zflora_compile.graph.onnx_constants import constant_getter

    return constant_getter(value)


def _bias_inside(binding: RuntimeBinding) -> bool:
    """The projection's bias is MatMulNBits' own operand (packed with it), not a separate add."""
    return binding.bias_value is not None and binding.bias_add is None and binding.gemm.kind == "MatMulNBits"


def merge_refusal(site: RuntimeSite) -> str:
    reasons = []
    if site.switchable:
        reasons.append("its adapter weights are graph inputs (fed at run time): merging would freeze one adapter and ignore the one a caller binds")
    elif "dequantized" in (site.a_kind, site.b_kind):
        reasons.append("its adapter weights are dequantized at run time")
    if site.base != "float":
        reasons.append(f"its base projection is quantized ({site.base}): W + s*A@B would have to be re-quantized")
    return "not merged: " + "; ".join(reasons)


def _modes(sites: list[RuntimeSite]) -> tuple[str, str, str]:
    bindings = [s.binding for s in sites]
    bases = {s.base for s in sites}
    if bases == {"float"}:
        base_mode = "widened"
    elif len(bases) == 1 and len({b.nbits_key for b in bindings}) == 1 and None not in {b.nbits_key for b in bindings}:
        packs = len(sites) > 1 or bindings[0].a_key == bindings[0].nbits_key
        base_mode = ("packed" if bases == {"MatMulNBits"} else "packed dequantized") if packs else "kept"
    else:
        base_mode = "kept"
    a_kinds = {b.a.kind for b in bindings}
    if a_kinds == {"MatMulNBits"}:
        a_mode = "with base" if base_mode == "packed" and {b.a_key for b in bindings} == {bindings[0].nbits_key} else "packed"
    elif a_kinds == {"constant"}:
        a_mode = "with base" if base_mode == "widened" else "constant"
    elif a_kinds == {"dequantized"} and len({b.a_key for b in bindings}) == 1 and bindings[0].a_key is not None:
        a_mode = "with base" if base_mode == "packed dequantized" and bindings[0].a_key == bindings[0].nbits_key else "packed dequantized"
    else:
        a_mode = "run-time concat"
    b_kinds = {b.b.kind for b in bindings}
    b_mode = "per site" if b_kinds in ({"MatMulNBits"}, {"dequantized"}) else "constant" if b_kinds == {"constant"} else "run-time"
    return base_mode, a_mode, b_mode


def _group_name(sites: list[RuntimeSite], fallback: str) -> str:
    labels = [s.label for s in sites]
    if not all(labels):
        return fallback
    prefix = labels[0].rsplit(".", 1)[0] if "." in labels[0] else ""
    if prefix and all(label.rsplit(".", 1)[0] == prefix for label in labels):
        return prefix + "." + "+".join(label.rsplit(".", 1)[-1] for label in labels)
    return "+".join(labels)


def plan(sites: list[RuntimeSite], strategy: str) -> list:
    if strategy == "strip":
        return [StripSite(site) for site in sites]  # LoRA's: the add's output becomes the base projection's (fed inputs stay, unused)
    if strategy == "merge" and sites:
        first = sites[0]
        label = f" ({first.label})" if first.label else ""
        raise PlanError(
            f"merge cannot fold {len(sites)} adapter site(s) into their weights; first, site {first.site_id}{label}: "
            f"{merge_refusal(first)}; fuse keeps such adapters as they are meant to run (switchable, on the quantized base), strip removes them"
        )
    groups: dict[str, list[RuntimeSite]] = {}
    for site in sites:
        groups.setdefault(site.group or site.site_id, []).append(site)
    return [FuseRuntime(_group_name(members, key), members, *_modes(members)) for key, members in groups.items()]


def disable(graph, site: RuntimeSite) -> None:
    """The strip reference: the add computes ``P(x) + 0 * branch`` (the graph otherwise unchanged)."""
    binding = site.binding
    zero_branch(graph, binding.add, binding.base_output, binding.branch, f"{site.site_id}.zero_branch")
