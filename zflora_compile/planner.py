"""The planner: decides the fused layout and computes the fused weights, for any front-end.

It sees only :class:`~zflora_compile.graph.records.AdapterSite` records and numpy weights in
``[in, out]`` layout. Weights are returned as :class:`LazyArray` so a front-end can stream them
to disk (ONNX external data) instead of holding every fused matrix in memory at once.

Algebra (per site ``y = x @ W + b + s * (x @ A) @ B``):

- ``merge``: ``W' = W + s * A @ B``, accumulated in fp32 and cast back to ``W``'s dtype.
- ``fuse``:  for the sites of one group (same input ``x``), with ``D = sum(out_i)``,
  ``R = sum(r_i)``::

      Y        = x @ [W_1 | ... | W_n | A_1 | ... | A_n]          # one GEMM, [.., D + R]
      y_base   = Y[.., :D] + [b_1 | ... | b_n]
      y        = y_base + Y[.., D:] @ blockdiag(s_1 B_1, ..., s_n B_n)   # one GEMM, [.., D]
      y_i      = y[.., offset_i : offset_i + out_i]

  The adapter lanes ``Y[.., D:]`` are cut off right after the first GEMM, so no consumer of
  any ``y_i`` (Reshape into heads, RoPE, Split, attention) ever sees them.
- ``strip``: ``y = x @ W + b``: the exact base model.

Widened projections (FFA, FBA, FFBA, zFLoRA; one :class:`~zflora_compile.graph.records.WidenedSite`
per base projection or embedding table), for ``fuse`` and ``merge`` alike (an adapter that
crosses a block's nonlinearity or a residual has no merged form)::

      [x ; z_1 .. z_m] @ [[W,      A_1 .. A_k],      =  [x @ W + sum_j s_j z_j @ B_j ;
                          [s_1 B_1, 0        ],          x @ A_1 ; .. ; x @ A_k]
                          [  ..              ]]

  ``W`` gains ``sum r_j`` rows (the lanes it reads, B roles) and ``sum r_i`` columns (the lanes
  it writes, A roles). A read without ``B`` gives zero rows (zFLoRA: the lanes are cut off), a
  write without ``A`` zero columns (zFLoRA: zero lanes appended). Accumulated in fp32, cast to
  ``W``'s dtype. ``strip`` drops the reads of FFA/FBA lanes (the base model); zFLoRA has no
  stripped form (the residual stream's width is part of the adapted model).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from zflora_compile.errors import InputError
from zflora_compile.graph.records import AdapterSite, WidenedSite, numpy_dtype

STRATEGIES = ("fuse", "merge", "strip")


@dataclasses.dataclass
class LazyArray:
    """A weight the planner computed, described by shape and dtype, evaluated on demand."""

    shape: tuple[int, ...]
    dtype: np.dtype
    compute: Callable[[], np.ndarray] = dataclasses.field(repr=False)

    def numpy(self) -> np.ndarray:
        array = self.compute()
        assert array.shape == self.shape and array.dtype == self.dtype, (array.shape, array.dtype)
        return array


@dataclasses.dataclass
class FusedGroup:
    """Sites reading one tensor, fused into ``x @ weight`` then ``lanes @ lowrank``."""

    name: str
    sites: list[AdapterSite]
    weight: LazyArray  # [in, D + R]
    lowrank: LazyArray  # [R, D]
    bias: LazyArray | None  # [D]
    out_splits: list[int]
    rank_total: int

    @property
    def base_width(self) -> int:
        return sum(self.out_splits)


@dataclasses.dataclass
class MergedSite:
    site: AdapterSite
    weight: LazyArray  # [in, out]


@dataclasses.dataclass
class WidenedProjection:
    site: WidenedSite
    weight: LazyArray  # [in + sum(read ranks), out + sum(write ranks)]
    out_splits: list[int]  # [out, r_1, .., r_k]: the base lanes, then each written lane


class PlanError(InputError):
    """The sites cannot be planned with the strategy asked for (exit 2, like any unusable input)."""


@dataclasses.dataclass
class Plan:
    strategy: str
    groups: list[FusedGroup] = dataclasses.field(default_factory=list)
    merged: list[MergedSite] = dataclasses.field(default_factory=list)
    stripped: list[AdapterSite] = dataclasses.field(default_factory=list)
    widened: list[WidenedProjection] = dataclasses.field(default_factory=list)
    stripped_reads: list[WidenedSite] = dataclasses.field(default_factory=list)

    @property
    def rewrites(self) -> int:
        return len(self.groups) + len(self.merged) + len(self.stripped) + len(self.widened) + len(self.stripped_reads)

    def to_json(self) -> dict:
        return {
            "strategy": self.strategy,
            "fused_groups": [
                {
                    "name": g.name,
                    "sites": [s.site_id for s in g.sites],
                    "out_splits": g.out_splits,
                    "rank_total": g.rank_total,
                    "weight_shape": list(g.weight.shape),
                    "lowrank_shape": list(g.lowrank.shape),
                }
                for g in self.groups
            ],
            "merged_sites": [m.site.site_id for m in self.merged],
            "stripped_sites": [s.site_id for s in self.stripped],
            "widened": [
                {"site": w.site.site_id, "label": w.site.label, "weight_shape": list(w.weight.shape), "out_splits": w.out_splits}
                for w in self.widened
            ],
            "stripped_reads": [s.site_id for s in self.stripped_reads],
        }


def _weight_dtype(site: AdapterSite) -> np.dtype:
    return numpy_dtype(site.dtype)


def _scaled_b_fp32(site: AdapterSite) -> np.ndarray:
    return site.lora_b().astype(np.float32) * np.float32(site.scale)


def merged_weight(site: AdapterSite, dtype: np.dtype) -> np.ndarray:
    """``W + s * A @ B`` accumulated in fp32, cast to ``dtype``."""
    delta = site.lora_a().astype(np.float32) @ _scaled_b_fp32(site)
    return (site.weight().astype(np.float32) + delta).astype(dtype)


def _group_name(sites: list[AdapterSite], fallback: str) -> str:
    labels = [s.label for s in sites if s.label]
    if len(labels) != len(sites):
        return fallback
    prefix = labels[0].rsplit(".", 1)[0] if "." in labels[0] else ""
    if all(label.rsplit(".", 1)[0] == prefix for label in labels) and prefix:
        return prefix + "." + "+".join(label.rsplit(".", 1)[-1] for label in labels)
    return "+".join(labels)


def plan_fused_group(sites: list[AdapterSite], name: str) -> FusedGroup:
    in_features = sites[0].in_features
    dtype = _weight_dtype(sites[0])
    outs = [s.out_features for s in sites]
    ranks = [s.rank for s in sites]
    width, rank_total = sum(outs), sum(ranks)

    def weight() -> np.ndarray:
        return np.concatenate([s.weight().astype(dtype) for s in sites] + [s.lora_a().astype(dtype) for s in sites], axis=1)

    def lowrank() -> np.ndarray:
        block = np.zeros((rank_total, width), dtype=np.float32)
        row, col = 0, 0
        for site in sites:
            block[row : row + site.rank, col : col + site.out_features] = _scaled_b_fp32(site)
            row, col = row + site.rank, col + site.out_features
        return block.astype(dtype)

    bias = None
    if any(s.has_bias for s in sites):

        def bias_fn() -> np.ndarray:
            parts = [s.bias() if s.bias else np.zeros(s.out_features) for s in sites]
            return np.concatenate([p.astype(dtype) for p in parts])

        bias = LazyArray((width,), dtype, bias_fn)
    return FusedGroup(
        name=name,
        sites=sites,
        weight=LazyArray((in_features, width + rank_total), dtype, weight),
        lowrank=LazyArray((rank_total, width), dtype, lowrank),
        bias=bias,
        out_splits=outs,
        rank_total=rank_total,
    )


def widened_weight(site: WidenedSite) -> np.ndarray:
    """``[[W, A_1 .. A_k], [s_1 B_1, 0], ..]`` in fp32, cast to ``W``'s dtype (see the module docstring)."""
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


def plan_widened(site: WidenedSite) -> WidenedProjection:
    weight = LazyArray(site.widened_shape, numpy_dtype(site.dtype), lambda s=site: widened_weight(s))
    return WidenedProjection(site, weight, [site.out_features] + [w.rank for w in site.writes])


def plan(detection, strategy: str) -> Plan:
    """Decide the rewrite of every site of ``detection`` for ``strategy`` (one of :data:`STRATEGIES`)."""
    sites, widened = detection.sites, detection.widened
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    result = Plan(strategy)
    for site in widened or []:
        if strategy != "strip":
            result.widened.append(plan_widened(site))
        elif site.family == "zflora":
            raise PlanError(
                f"strategy 'strip' cannot remove the zFLoRA adapter at '{site.label or site.site_id}': the widened "
                "residual stream and its rescaled RMSNorms are part of the adapted model (use 'fuse')"
            )
        elif any(r.lora_b is not None for r in site.reads):
            result.stripped_reads.append(site)
    if strategy == "strip":
        result.stripped = list(sites)
    elif strategy == "merge":
        for site in sites:
            dtype = _weight_dtype(site)
            shape = (site.in_features, site.out_features)
            result.merged.append(MergedSite(site, LazyArray(shape, dtype, lambda s=site, d=dtype: merged_weight(s, d))))
    else:
        groups: dict[str, list[AdapterSite]] = {}
        for site in sites:
            groups.setdefault(site.group or site.site_id, []).append(site)
        for key, members in groups.items():
            result.groups.append(plan_fused_group(members, _group_name(members, key)))
    return result
