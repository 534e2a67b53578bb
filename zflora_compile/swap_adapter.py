"""What a swap needs from a new adapter (:mod:`zflora_compile.swap`, :mod:`zflora_compile.swap_sources`).

An :class:`Adapter` answers per compiled site: a fused group's new constants (:class:`GroupUpdate`),
a GAWS group's blocks, a widened projection's weight (:class:`WidenedUpdate`); or refuses
(:func:`refuse`: :class:`~zflora_compile.errors.InputError`, exit 2).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from zflora_compile.errors import InputError


def refuse(reason: str):
    raise InputError(f"swap: {reason}")


def product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for the small rank-``r`` products, without BLAS: numpy's threaded BLAS spins for
    hundreds of milliseconds on a loaded two-core machine for these ``[in, r] @ [r, out]`` sizes."""
    return np.einsum("ir,ro->io", a, b)


@dataclasses.dataclass
class GroupUpdate:
    """A fused group's new adapter constants (fp32): ``lanes`` ``[in, R']`` (the A columns),
    ``lowrank`` ``[R', D]``, ``column_scale`` ``[D]`` (DoRA) or None, ``bias`` ``[D]`` or None
    (None: keep the compiled one), ``ranks`` per site, ``base`` ``[in, D]`` for the base check or None."""

    lanes: np.ndarray
    lowrank: np.ndarray
    ranks: list[int]
    column_scale: np.ndarray | None = None
    bias: np.ndarray | None = None
    base: np.ndarray | None = None
    base_names: list[str] | None = None


@dataclasses.dataclass
class WidenedUpdate:
    """A widened projection's new weight (fp32) and its lane layout (``out_splits``, ``read_ranks``)."""

    weight: np.ndarray
    out_splits: list[int]
    read_ranks: list[int]
    family: str
    base_name: str | None = None


class Adapter:
    """What a swap needs from the new adapter; :meth:`group`, :meth:`grouped`, :meth:`widened`
    answer per compiled site (by labels) or refuse. ``reference``: an unfused model to verify against."""

    source: str
    kind: str
    reference: Path | None = None

    def group(self, group: dict, base: np.ndarray) -> GroupUpdate:
        raise NotImplementedError

    def grouped(self, group: dict) -> np.ndarray:
        refuse(f"the compiled model has the GAWS group '{group['name']}'; a {self.kind} adapter has no GAWS blocks (use an ONNX model with the new GAWS adapter)")

    def widened(self, site: dict) -> WidenedUpdate:
        refuse(f"the compiled model has the widened {site.get('family')} projection '{site.get('label') or site['site']}'; a {self.kind} adapter has no lanes for it")

    def unused(self) -> list[str]:
        """Adapted modules of the new adapter no compiled site took (refused after the mapping)."""
        return []
