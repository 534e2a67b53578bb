"""The rewrite the lane families share: one base projection widened to carry adapter lanes.

FFA / FBA / FFBA (:mod:`.lanes`) and zFLoRA (:mod:`.zflora`) move a rank-``r`` activation (its
*lanes*) from one projection to another. Detection yields one
:class:`~zflora_compile.graph.records.WidenedSite` per base projection (or embedding table) that
reads or writes lanes; the plan widens its weight, for ``fuse`` and ``merge`` alike (an adapter
that crosses a block's nonlinearity or a residual has no merged form)::

      [x ; z_1 .. z_m] @ [[W,      A_1 .. A_k],      =  [x @ W + sum_j s_j z_j @ B_j ;
                          [s_1 B_1, 0        ],          x @ A_1 ; .. ; x @ A_k]
                          [  ..              ]]

``W`` gains ``sum r_j`` rows (the lanes it reads, B roles) and ``sum r_i`` columns (the lanes it
writes, A roles). A read without ``B`` gives zero rows (zFLoRA: the lanes are cut off), a write
without ``A`` zero columns (zFLoRA: zero lanes appended). Accumulated in fp32, cast to ``W``'s
dtype; a bias of the GEMM itself is padded with zeros on the written lanes. ``strip`` drops the
reads of FFA/FBA lanes (the base model); a site that reads zFLoRA lanes has no stripped form.

Emitted: input ``x``, the zFLoRA stream whole, or ``concat(x, z_1, ..)`` (one concat per distinct
input, shared by the projections that read the same lanes); output the concat/pad it replaces
(zFLoRA), or a split into the base lanes and each written lane (FFA/FBA), or the base output.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from zflora_compile import metadata
from zflora_compile.errors import PlanError
from zflora_compile.graph.protocol import Gemm, GraphView, Projection, Reject, bias_problem, check_path, single_use
from zflora_compile.graph.records import LaneRead, LaneWrite, LazyArray, WidenedSite, numpy_dtype

STREAM_LANE = "zflora.stream"


@dataclasses.dataclass
class WidenBinding:
    """The graph handles a widened rewrite needs."""

    node: object  # the base GEMM or embedding node
    gemm: Gemm | None  # None for an embedding
    x: object  # its data input (embedding: the token ids)
    output: object  # its result (the GEMM's own bias included)
    stream: object = None  # zFLoRA entry: the d+r tensor read whole instead of its slice
    replaced: object = None  # zFLoRA exit / embedding: the concat or pad output produced directly
    lanes_in: list = dataclasses.field(default_factory=list)  # cross reads: z, in site.reads order
    lanes_out: list = dataclasses.field(default_factory=list)  # cross writes: z = t @ A, in site.writes order
    read_adds: list = dataclasses.field(default_factory=list)  # the adapter adds (bypassed)
    read_bases: list = dataclasses.field(default_factory=list)  # each add's base operand
    b_gemms: list = dataclasses.field(default_factory=list)  # the GEMMs applying B (zeroed for the strip reference)


def merged_family(old: str, new: str) -> str:
    """The family of a projection carrying lanes of two families (FFA and FBA make FFBA)."""
    if old == new:
        return old
    return "ffba" if {old, new} <= {"ffa", "fba", "ffa/fba", "ffba"} else f"{old}+{new}"


class WidenedSites:
    """Collects the reads and writes of every family per base node into WidenedSite records."""

    def __init__(self, view: GraphView):
        self.view = view
        self.by_node: dict[int, WidenedSite] = {}

    def projection(self, gemm: Gemm, family: str) -> WidenedSite:
        return self._site(gemm.node, gemm, gemm.weight, gemm.shape, gemm.x, gemm.out, family, "projection")

    def embedding(self, node, table, ids, family: str) -> WidenedSite:
        return self._site(node, None, table, tuple(self.view.constant_shape(table)), ids, self.view.output(node), family, "embedding")

    def _site(self, node, gemm, weight, shape, x, output, family, kind) -> WidenedSite:
        view = self.view
        if id(node) not in self.by_node:
            self.by_node[id(node)] = WidenedSite(
                site_id="",
                family=family,
                label=view.label(node, weight) or view.name(node),
                input_name=view.value_name(x),
                output_name=view.value_name(output),
                in_features=shape[0],
                out_features=shape[1],
                dtype=view.dtype(weight),
                nodes=[view.name(node)],
                weight=view.weight(gemm) if gemm is not None else view.constant_array(weight),
                kind=kind,
                binding=WidenBinding(node, gemm, x, output),
            )
        site = self.by_node[id(node)]
        site.family = merged_family(site.family, family)
        return site

    def conflict(self, node, family: str) -> str | None:
        """Why ``node`` cannot also carry ``family``'s lanes: a projection either reads and writes
        the zFLoRA stream or FFA/FBA lanes, not both (one input and one output layout each)."""
        site = self.by_node.get(id(node))
        if site is None or ("zflora" in site.family) == ("zflora" in family):
            return None
        return f"projection '{self.view.name(node)}' already carries {site.family} lanes; it cannot also carry {family} lanes"

    def add_read(self, site: WidenedSite, add, base_value, b: Gemm, scale: float, lane: str, rank: int, *, z=None, stream=None) -> None:
        """``add = base_value + scale * (lanes @ B)`` is a read of the site's projection."""
        view = self.view
        site.reads.append(LaneRead(lane, rank, scale, view.weight(b)))
        binding: WidenBinding = site.binding
        binding.read_adds.append(add)
        binding.read_bases.append(base_value)
        binding.b_gemms.append(b)
        site.nodes += [view.name(b.node), view.name(add)]
        if stream is not None:
            binding.stream = stream
        else:
            binding.lanes_in.append(z)

    def finish(self) -> list[WidenedSite]:
        order = self.view.order()
        sites = sorted(self.by_node.values(), key=lambda s: order[id(s.binding.node)])
        for number, site in enumerate(sites):
            site.site_id = f"{site.family.replace('/', '_').replace('+', '_')}{number}"
        return sites


def widening_problem(view: GraphView, gemm: Gemm) -> str | None:
    """Why ``gemm`` cannot be widened (its own bias cannot be padded to the widened width), or None."""
    if gemm.bias is None:
        return None
    problem = bias_problem(view, gemm.bias, gemm.shape[1], gemm.x)
    return f"the bias of projection '{view.name(gemm.node)}' {problem}; not widened" if problem else None


def check_read(view: GraphView, add, base_value, projection: Projection, chain_nodes: list, claimed) -> None:
    """What every lane read needs: a projection no other family claimed and that can be widened,
    and intermediates that feed only the next step."""
    if claimed(projection.node):
        raise Reject(f"projection '{view.name(projection.node)}' also carries a LoRA adapter")
    problem = widening_problem(view, projection.gemm)
    if problem:
        raise Reject(problem)
    for i, node in enumerate(chain_nodes):
        single_use(view, view.output(node), chain_nodes[i - 1] if i else add, "low-rank intermediate")
    check_path(view, base_value, projection.node, add, "base projection output")


# ---------------------------------------------------------------- plan and emit


def widened_weight(site: WidenedSite) -> np.ndarray:
    """``[[W, A_1 .. A_k], [s_1 B_1, 0], ..]`` in fp32, cast to ``W``'s dtype."""
    block = np.zeros(site.widened_shape, dtype=np.float32)
    block[: site.in_features, : site.out_features] = site.weight().astype(np.float32)
    col = site.out_features
    for write in site.writes:
        if write.lora_a is not None:
            block[: site.in_features, col : col + write.rank] = write.lora_a().astype(np.float32)
        col += write.rank
    row = site.in_features
    for read in site.reads:
        if read.lora_b is not None:
            block[row : row + read.rank, : site.out_features] = read.lora_b().astype(np.float32) * np.float32(read.scale)
        row += read.rank
    return block.astype(numpy_dtype(site.dtype))


@dataclasses.dataclass
class Widen:
    """One GEMM (or embedding) with the widened weight replaces the base node."""

    section: ClassVar[str] = "widened"
    site: WidenedSite
    weight: LazyArray  # [in + sum(read ranks), out + sum(write ranks)]
    out_splits: list[int]  # [out, r_1, .., r_k]: the base lanes, then each written lane
    read_ranks: list[int] | None = None  # --max-rank: each read lane's padded width (None: the site's ranks)
    max_rank: int | None = None

    def to_json(self) -> dict:
        return {"site": self.site.site_id, "label": self.site.label, "weight_shape": list(self.weight.shape), "out_splits": self.out_splits}

    def emit(self, graph, state: dict) -> None:
        site, binding = self.site, self.site.binding
        concats, lanes = state.setdefault("concats", {}), state.setdefault("lanes", {})
        bias = table = made = None
        with graph.at(binding.node, site.label or site.site_id):
            if site.kind == "embedding":
                out = graph.gather(table := graph.constant("widened_table", self.weight), binding.x)
            else:
                if binding.stream is not None:
                    x = binding.stream
                elif binding.lanes_in:
                    key = (id(binding.x), *(id(z) for z in binding.lanes_in))
                    if key not in concats:  # a lane whose host was rewritten already is read from its split
                        concats[key] = graph.concat_last([binding.x, *(lanes.get(id(z), z) for z in binding.lanes_in)])
                    x = concats[key]
                else:
                    x = binding.x
                bias = None
                if binding.gemm.bias is not None:
                    own, pad = graph.constant_array(binding.gemm.bias), self.weight.shape[1] - site.out_features
                    bias = LazyArray((self.weight.shape[1],), self.weight.dtype, lambda g=own, p=pad, d=self.weight.dtype: np.concatenate([g().reshape(-1), np.zeros(p)]).astype(d))
                out = graph.project(x, self.weight, like=binding.gemm, bias=bias, name="widened_weight")
            made = out
            if binding.replaced is not None:
                graph.redirect(binding.replaced, out)
            elif binding.lanes_out:
                parts = graph.split_last(out, self.out_splits)
                graph.redirect(binding.output, parts[0])
                for z, part in zip(binding.lanes_out, parts[1:]):
                    graph.redirect(z, part)
                    lanes[id(z)] = part
                out = parts[0]
            else:
                graph.redirect(binding.output, out)
        bypass_reads(graph, binding, out)
        if site.kind == "embedding":
            names = (metadata.value_name(table), None)
        elif bias is not None:  # out = MatMul(x, weight) + bias
            names = (metadata.created_name(metadata.producer_input(made, 0)), metadata.created_name(made))
        else:
            names = (metadata.created_name(made), None)
        metadata.note(state, self, self.record(*names))

    def record(self, weight: str | None, bias: str | None) -> dict:
        """What the widening created, by name: rows ``in:`` read lanes, columns ``out:`` are written lanes."""
        site = self.site
        return {
            "kind": "widened",
            "site": site.site_id,
            "label": site.label,
            "family": site.family,
            "embedding": site.kind == "embedding",
            "in_features": site.in_features,
            "out_features": site.out_features,
            "widened_shape": list(self.weight.shape),
            "out_splits": self.out_splits,
            "read_ranks": self.read_ranks if self.read_ranks is not None else [r.rank for r in site.reads],
            "weight": weight,
            "bias": bias,
            **({"max_rank": self.max_rank, "adapter_ranks": {"reads": [r.rank for r in site.reads], "writes": [w.rank for w in site.writes]}} if self.max_rank is not None else {}),
        }


def bypass_reads(graph, binding: WidenBinding, replacement=None) -> None:
    """Every adapter add passes its base operand through (the lanes are inside the GEMM, or gone):
    ``replacement`` where that operand was the base node's own output, else the bias add, which
    now reads the replacement."""
    for add, base in zip(binding.read_adds, binding.read_bases):
        graph.redirect(graph.output(add), replacement if base is binding.output and replacement is not None else base)


@dataclasses.dataclass
class StripReads:
    """FFA/FBA strip: every adapter add of the site passes its base operand through."""

    section: ClassVar[str] = "stripped_reads"
    site: WidenedSite

    def to_json(self) -> str:
        return self.site.site_id

    def emit(self, graph, state: dict) -> None:
        bypass_reads(graph, self.site.binding)
        metadata.note(state, self, {"kind": "stripped_reads", "site": self.site.site_id, "label": self.site.label, "family": self.site.family})


def plan(sites: list[WidenedSite], strategy: str) -> list:
    rewrites = []
    for site in sites:
        if strategy != "strip":
            weight = LazyArray(site.widened_shape, numpy_dtype(site.dtype), lambda s=site: widened_weight(s))
            rewrites.append(Widen(site, weight, [site.out_features] + [w.rank for w in site.writes]))
        elif "zflora" in site.family:
            raise PlanError(
                f"strategy 'strip' cannot remove the zFLoRA adapter at '{site.label or site.site_id}': the widened "
                "residual stream and its rescaled RMSNorms are part of the adapted model (use 'fuse')"
            )
        elif any(r.lora_b is not None for r in site.reads):
            rewrites.append(StripReads(site))
    return rewrites


def disable(graph, site: WidenedSite) -> None:
    """Every B the site reads replaced by zeros, the graph otherwise unchanged (the strip reference)."""
    for i, gemm in enumerate(site.binding.b_gemms):
        with graph.at(gemm.node, f"{site.site_id}_{i}.zero_b"):
            graph.replace_weight(gemm, np.zeros(gemm.shape, dtype=numpy_dtype(graph.dtype(gemm.weight))), name="zero_b")


__all__ = ["STREAM_LANE", "LaneRead", "LaneWrite", "StripReads", "Widen", "WidenedSites", "check_read", "disable", "merged_family", "plan"]
