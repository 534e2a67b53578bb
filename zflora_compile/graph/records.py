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

#: an adapter's rank must be at most this fraction of min(in, out) of the projection it adapts
DEFAULT_MAX_RANK_RATIO = 0.5


class _Labelled:
    """Layer and projection parsed from a site's label (names are only ever labels)."""

    label: str

    @property
    def layer(self) -> int | None:
        return layer_from_label(self.label)

    @property
    def projection(self) -> str:
        return projection_from_label(self.label)


@dataclasses.dataclass
class _Site(_Labelled):
    """What every kind of site has: where it is, its base weight ``W [in, out]`` and its nodes."""

    site_id: str
    family: str
    label: str
    input_name: str
    output_name: str
    in_features: int
    out_features: int
    dtype: str  # numpy name of the base weight's element type
    nodes: list[str]
    weight: ArrayGetter = dataclasses.field(repr=False)

    def _json(self, **specific) -> dict:
        return {
            "id": self.site_id,
            "family": self.family,
            "label": self.label,
            "layer": self.layer,
            "projection": self.projection,
            "input": self.input_name,
            "output": self.output_name,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "dtype": self.dtype,
            **specific,
            "nodes": list(self.nodes),
        }


@dataclasses.dataclass
class AdapterSite(_Site):
    """One adapted projection: ``y = x @ W (+ bias) + scale * ((x @ A) @ B)``."""

    rank: int = 0
    scale: float = 1.0
    has_bias: bool = False
    lora_a: ArrayGetter = dataclasses.field(default=None, repr=False)
    lora_b: ArrayGetter = dataclasses.field(default=None, repr=False)
    bias: ArrayGetter | None = dataclasses.field(default=None, repr=False)
    #: DoRA: ``y = c * (x @ W + scale * x @ A @ B) + bias`` with this per-column ``c`` ``[out]``
    column_scale: ArrayGetter | None = dataclasses.field(default=None, repr=False)
    group: str = ""
    binding: Any = dataclasses.field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        extra = {"column_scale": True} if self.column_scale is not None else {}
        return self._json(group=self.group, rank=self.rank, scale=self.scale, bias=self.has_bias, **extra)


@dataclasses.dataclass
class RuntimeSite(AdapterSite):
    """A LoRA site whose weights the compiler must not fold into constants: ``y = P(x) + s * ((x @ A) @ B)``
    where A or B is fed at run time (a graph input, with or without a default initializer: Olive's
    ExtractAdapters, ONNX Runtime's multi-LoRA; or a ``DequantizeLinear`` output) or the base ``P`` is a
    quantized projection (``MatMulNBits``, or ``MatMul`` of ``DequantizeLinear``), or both.

    ``rank``: an int, or the name of the run-time rank axis (``"lora_r"``); ``base``: "float",
    "MatMulNBits" or "QDQ"; ``a_kind`` / ``b_kind``: "constant", "graph input", "dequantized" or
    "MatMulNBits"; ``switchable``: an adapter weight is a graph input (a caller binds adapters at run
    time, and every rewrite keeps it so); ``quantization``: the base's bits / block size, if quantized.
    ``weight``, ``lora_a``, ``lora_b`` are set only where they are float constants (else None).
    """

    base: str = "float"
    a_kind: str = "constant"
    b_kind: str = "constant"
    quantization: dict | None = None

    @property
    def switchable(self) -> bool:
        return "graph input" in (self.a_kind, self.b_kind)

    def kind(self) -> str:
        """One line: what makes the site a run-time one."""
        parts = []
        if self.switchable:
            parts.append("adapter weights are graph inputs")
        elif "dequantized" in (self.a_kind, self.b_kind):
            parts.append("adapter weights are dequantized at run time")
        if self.base != "float":
            q = self.quantization or {}
            bits = f"{q['bits']}-bit " if q.get("bits") else ""
            parts.append(f"the base projection is a {bits}{self.base}")
        return "; ".join(parts)

    def to_json(self) -> dict:
        extra = {"quantization": dict(self.quantization)} if self.quantization else {}
        return self._json(
            group=self.group,
            rank=self.rank,
            scale=self.scale,
            bias=self.has_bias,
            switchable=self.switchable,
            base=self.base,
            weights={"A": self.a_kind, "B": self.b_kind},
            kind=self.kind(),
            **extra,
        )


@dataclasses.dataclass
class LinearSite(_Site):
    """Adapter branches added to one projection (or embedding table) that no named family claims,
    each linear in the projection's input: ``y = x @ W (+ bias) + sum_i f_i(x)``, ``f_i(x) = x @ dW_i``.

    ``delta``: ``sum_i dW_i`` ``[in, out]`` in fp32, measured on an identity probe (for an
    embedding: every row of the table, ``ids = 0 .. vocab-1``); ``kind``: "projection" or "embedding".
    """

    kind: str = "projection"
    branches: int = 1
    delta: ArrayGetter = dataclasses.field(default=None, repr=False)
    binding: Any = dataclasses.field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        return self._json(kind=self.kind, branches=self.branches)


@dataclasses.dataclass
class GroupedSite(_Site):
    """A weight-shared Kronecker adapter on one projection, measured: GAWS ``dW = kron(I_g, V)``
    (``y = x @ W (+ bias) + reshape(reshape(x, [.., g, in/g]) @ V, [.., out])``), ``V`` ``[in/g, out/g]``
    with its scale folded in."""

    groups: int = 1
    block: ArrayGetter = dataclasses.field(default=None, repr=False)
    bias: ArrayGetter | None = dataclasses.field(default=None, repr=False)
    has_bias: bool = False
    group: str = ""
    binding: Any = dataclasses.field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        return self._json(group=self.group, groups=self.groups, block=[self.in_features // self.groups, self.out_features // self.groups], bias=self.has_bias)


@dataclasses.dataclass
class Unrecognized:
    """An adapter-shaped structure no family accounts for: an add joining a projection's output with
    a branch computed from its input through constant-parameter ops (``kind`` "branch"), or a
    constant per-column scale right after a projection (``kind`` "scale")."""

    kind: str
    node: str
    reason: str
    label: str = ""
    nodes: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return {"kind": self.kind, "node": self.node, "label": self.label, "reason": self.reason, "nodes": list(self.nodes)}


@dataclasses.dataclass
class Accounting:
    """How many adapter-shaped branches and per-column scales the graph has, and how many a family
    recognised (the rest are :class:`Unrecognized`)."""

    branches_found: int = 0
    branches_recognised: int = 0
    scales_found: int = 0
    scales_recognised: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Rejection:
    """A structure that looked like an adapter but was left as it was, and why."""

    node: str
    reason: str
    label: str = ""

    def to_json(self) -> dict:
        return {"node": self.node, "label": self.label, "reason": self.reason}


@dataclasses.dataclass
class LazyArray:
    """A weight a plan computes, described by shape and dtype, evaluated on demand (so a writer can
    stream it to disk instead of holding every fused matrix in memory at once)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    compute: Callable[[], np.ndarray] = dataclasses.field(repr=False)

    def numpy(self) -> np.ndarray:
        array = self.compute()
        assert array.shape == self.shape and array.dtype == self.dtype, (array.shape, array.dtype)
        return array


_SCOPE_STRIP = re.compile(r"(^|\.)(base_model\.model|base_layer|lora_[AB]\.[^.]+|default)(?=\.|$)")


def clean_label(text: str) -> str:
    """A module path as a label: PEFT's wrapper scopes and a trailing ``.weight`` removed."""
    text = re.sub(r"\.weight$", "", text)
    text = _SCOPE_STRIP.sub("", text)
    while re.match(r"^(m|model)\.model\.", text):
        text = text.split(".", 1)[1]
    return text.strip(".")


_LAYER_RE = re.compile(r"layers?[._/](\d+)")
_PROJ_RE = re.compile(r"([A-Za-z_]*(?:proj|query_key_value|dense[A-Za-z_0-9]*|fc\d*|lm_head))")


def layer_from_label(label: str) -> int | None:
    """Layer index parsed from a label (names are only ever used for labels)."""
    match = _LAYER_RE.search(label)
    return int(match.group(1)) if match else None


def projection_from_label(label: str) -> str:
    matches = _PROJ_RE.findall(label)
    return matches[-1] if matches else ""


def number_groups(sites: list, prefix: str, *extra: str) -> None:
    """Give sites whose base GEMMs read the same tensor in the same dtype (and the same ``extra``
    attributes) one group name each, ``<prefix><n>``: QKV, gate/up; one fused GEMM per group."""
    groups: dict[tuple, list] = {}
    for site in sites:
        groups.setdefault((id(site.binding.gemm.x), site.dtype, *(getattr(site, a) for a in extra)), []).append(site)
    for number, members in enumerate(groups.values()):
        for site in members:
            site.group = f"{prefix}{number}"


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype from its name, including ml_dtypes' bfloat16."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


@dataclasses.dataclass
class LaneRead:
    """Adapter lanes a projection reads: ``out += scale * (lanes @ B)``; ``B`` None means zero rows.

    (``B`` None: a zFLoRA entry projection in a block without an adapter only cuts the lanes off.)
    """

    lane: str
    rank: int
    scale: float
    lora_b: ArrayGetter | None = dataclasses.field(default=None, repr=False)

    def to_json(self) -> dict:
        return {"lane": self.lane, "rank": self.rank, "scale": self.scale, "zero": self.lora_b is None}


@dataclasses.dataclass
class LaneWrite:
    """Adapter lanes a projection writes: ``lanes = x @ A`` beside its output; ``A`` None means zeros."""

    lane: str
    rank: int
    lora_a: ArrayGetter | None = dataclasses.field(default=None, repr=False)

    def to_json(self) -> dict:
        return {"lane": self.lane, "rank": self.rank, "zero": self.lora_a is None}


@dataclasses.dataclass
class WidenedSite(_Site):
    """One base projection (or embedding table) that FFA / FBA / FFBA / zFLoRA widen.

    Fused, it reads ``[x ; lanes_in]`` and writes ``[y ; lanes_out]`` through one weight
    ``[[W, A_1 .. A_k], [s_1 B_1, 0], ..]``: the adapter costs no GEMM of its own.
    """

    reads: list[LaneRead] = dataclasses.field(default_factory=list)
    writes: list[LaneWrite] = dataclasses.field(default_factory=list)
    kind: str = "projection"  # or "embedding" (a Gather of a [vocab, d] table)
    binding: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def rank(self) -> int:
        return sum(r.rank for r in self.reads) + sum(w.rank for w in self.writes)

    @property
    def widened_shape(self) -> tuple[int, int]:
        """``[in + lanes read, out + lanes written]``: the fused weight's shape."""
        return self.in_features + sum(r.rank for r in self.reads), self.out_features + sum(w.rank for w in self.writes)

    def to_json(self) -> dict:
        return self._json(kind=self.kind, reads=[r.to_json() for r in self.reads], writes=[w.to_json() for w in self.writes])


@dataclasses.dataclass
class Detection:
    sites: list[AdapterSite]
    rejections: list[Rejection]
    #: FFA / FBA / FFBA / zFLoRA: one record per widened projection (see families.widening)
    widened: list = dataclasses.field(default_factory=list)
    #: adapter branches measured as dense updates (see families.linear)
    linear: list = dataclasses.field(default_factory=list)
    #: weight-shared Kronecker adapters (see families.gaws)
    grouped: list = dataclasses.field(default_factory=list)
    #: adapter-shaped structures no family accounts for (strip refuses while there are any)
    unrecognized: list = dataclasses.field(default_factory=list)
    accounting: Accounting = dataclasses.field(default_factory=Accounting)

    @property
    def all_sites(self) -> list:
        return [*self.sites, *self.widened, *self.grouped, *self.linear]

    def __iter__(self):
        """Every site: LoRA ``AdapterSite`` records, then ``WidenedSite``, then ``LinearSite`` records."""
        return iter(self.all_sites)

    def __len__(self) -> int:
        return len(self.all_sites)
