"""``--max-rank R``: zero adapter lanes so that any adapter up to rank ``R`` swaps in with the same shapes.

A fused group of ``n`` sites gets ``n * R`` rank lanes (the group's lanes are private to it, so a
swap may place any ranks ``r'_i`` with ``sum r'_i <= n * R``)::

      [W | A_1 .. A_n | 0]  (zero columns),   [[blockdiag(s_i B_i)], [0]]  (zero rows)

The zero columns give zero lanes and the zero rows read them into nothing: the padded group computes
exactly the unpadded one. A widened FFA / FBA / FFBA projection gets each lane block padded to
``R``: a written lane's ``A`` with zero columns, a read lane's ``s B`` with zero rows (every writer
and reader of a lane is padded alike, so the lane's width agrees along its path; its extra entries
are zero and read by zero rows). zFLoRA is not padded: its lanes are the residual stream itself,
and the RMSNorms over ``d + r`` lanes (rescaled for ``r`` at creation) would see ``d + R``. GAWS
blocks have no rank. A site whose rank exceeds ``R`` is refused (exit 2).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from zflora_compile.errors import InputError
from zflora_compile.graph.records import LazyArray


def _check(R: int, rank: int, label: str) -> None:
    if rank > R:
        raise InputError(f"--max-rank {R} is below the rank {rank} of the adapter at '{label}'")


def pad_group(step, R: int):
    """A :class:`~zflora_compile.families.lora.FuseGroup` with ``len(sites) * R`` rank lanes."""
    for site in step.sites:
        _check(R, site.rank, site.label or site.site_id)
    capacity = R * len(step.sites)
    extra = capacity - step.rank_total
    weight, lowrank = step.weight, step.lowrank
    n_in, D = weight.shape[0], step.base_width
    if extra:
        weight = LazyArray((n_in, D + capacity), weight.dtype, lambda w=weight, e=extra: np.concatenate([w.numpy(), np.zeros((w.shape[0], e), dtype=w.dtype)], axis=1))
        lowrank = LazyArray((capacity, D), lowrank.dtype, lambda b=lowrank, e=extra: np.concatenate([b.numpy(), np.zeros((e, b.shape[1]), dtype=b.dtype)], axis=0))
    return dataclasses.replace(step, weight=weight, lowrank=lowrank, rank_total=capacity, max_rank=R)


def pad_widened(step, R: int):
    """A :class:`~zflora_compile.families.widening.Widen` with every lane block ``R`` wide (zFLoRA: unchanged)."""
    site = step.site
    if "zflora" in site.family:
        return step
    label = site.label or site.site_id
    writes = [w.rank for w in site.writes]
    reads = [r.rank for r in site.reads]
    for rank in writes + reads:
        _check(R, rank, label)
    n_in, n_out = site.in_features, site.out_features
    shape = (n_in + R * len(reads), n_out + R * len(writes))
    if site.kind == "embedding":
        shape = (step.weight.shape[0], shape[1])

    def padded(w=step.weight, shape=shape, writes=writes, reads=reads, embedding=site.kind == "embedding") -> np.ndarray:
        old = w.numpy()
        rows = old.shape[0] if embedding else n_in
        out = np.zeros(shape, dtype=old.dtype)
        out[:rows, :n_out] = old[:rows, :n_out]
        col, new_col = n_out, n_out
        for r in writes:
            out[:rows, new_col : new_col + r] = old[:rows, col : col + r]
            col, new_col = col + r, new_col + R
        if not embedding:
            row, new_row = n_in, n_in
            for r in reads:
                out[new_row : new_row + r, :n_out] = old[row : row + r, :n_out]
                row, new_row = row + r, new_row + R
        return out

    return dataclasses.replace(step, weight=LazyArray(shape, step.weight.dtype, padded), out_splits=[n_out] + [R] * len(writes), read_ranks=[R] * len(reads), max_rank=R)


def pad_plan(rewrites: list, R: int) -> list:
    """The plan's rewrites with zero lanes up to rank ``R`` (fused groups and lane projections)."""
    from zflora_compile.families.lora import FuseGroup
    from zflora_compile.families.widening import Widen

    zflora = any(isinstance(s, Widen) and "zflora" in s.site.family for s in rewrites)
    lanes = any(isinstance(s, Widen) and "zflora" not in s.site.family for s in rewrites)
    if zflora and lanes:  # a lane shared by a zFLoRA and an FFA projection cannot be padded on one side only
        raise InputError("--max-rank: the model carries zFLoRA and FFA/FBA lanes together; zFLoRA lanes cannot be padded")
    out = []
    for step in rewrites:
        if type(step) is FuseGroup:
            step = pad_group(step, R)
        elif isinstance(step, Widen):
            step = pad_widened(step, R)
        out.append(step)
    return out
