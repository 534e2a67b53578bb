"""IR-neutral records of what detection found.

A front-end (ONNX or torch.fx) turns graph structure into :class:`AdapterSite` records and
:class:`Rejection` records. The planner only sees these records and the weights they expose
as numpy arrays (``[in, out]`` right-multiplication layout); the front-end keeps whatever handle
it needs to rewrite the graph in ``binding``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import numpy as np

ArrayGetter = Callable[[], np.ndarray]


@dataclasses.dataclass
class AdapterSite:
    """One adapted projection: ``y = x @ W (+ bias) + scale * ((x @ A) @ B)``."""

    site_id: str
    family: str
    label: str
    input_name: str
    output_name: str
    in_features: int
    out_features: int
    rank: int
    scale: float
    dtype: str  # numpy name of the base weight's element type
    has_bias: bool
    nodes: list[str]
    weight: ArrayGetter = dataclasses.field(repr=False)
    lora_a: ArrayGetter = dataclasses.field(repr=False)
    lora_b: ArrayGetter = dataclasses.field(repr=False)
    bias: ArrayGetter | None = dataclasses.field(default=None, repr=False)
    group: str = ""
    binding: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def layer(self) -> int | None:
        return layer_from_label(self.label)

    @property
    def projection(self) -> str:
        return projection_from_label(self.label)

    def to_json(self) -> dict:
        return {
            "id": self.site_id,
            "family": self.family,
            "label": self.label,
            "layer": self.layer,
            "projection": self.projection,
            "group": self.group,
            "input": self.input_name,
            "output": self.output_name,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "scale": self.scale,
            "dtype": self.dtype,
            "bias": self.has_bias,
            "nodes": list(self.nodes),
        }


@dataclasses.dataclass
class Rejection:
    """A structure that looked like an adapter but was left as it was, and why."""

    node: str
    reason: str
    label: str = ""

    def to_json(self) -> dict:
        return {"node": self.node, "label": self.label, "reason": self.reason}


_LAYER_RE = re.compile(r"layers?[._/](\d+)")
_PROJ_RE = re.compile(r"([A-Za-z_]*(?:proj|query_key_value|dense[A-Za-z_0-9]*|fc\d*|lm_head))")


def layer_from_label(label: str) -> int | None:
    """Layer index parsed from a label (names are only ever used for labels)."""
    match = _LAYER_RE.search(label)
    return int(match.group(1)) if match else None


def projection_from_label(label: str) -> str:
    matches = _PROJ_RE.findall(label)
    return matches[-1] if matches else ""


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype from its name, including ml_dtypes' bfloat16."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)
