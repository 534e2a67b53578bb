"""Measuring a linear map inside a graph: the dense matrix of the region between two values.

``measure_map(view, source, target, nodes, n_in, n_out)`` evaluates the region alone (ONNX Runtime
for ONNX, eager PyTorch for torch.fx: ``view.evaluate``) on an identity probe, row ``j`` of ``I_n_in``
as token ``j`` (ids: every id ``0 .. n_in-1``), giving ``M`` ``[n_in, n_out]``. It then tests the
claim ``f(R) = R @ M`` on a seeded random input with more tokens and batch rows than the probe: a
nonlinearity, a constant term, or a reshape that mixes tokens or batch rows fails it.
"""

from __future__ import annotations

import math

import numpy as np

from zflora_compile.graph.onnx_eval import RegionError
from zflora_compile.graph.protocol import FLOAT_HOLDS, GraphView
from zflora_compile.graph.records import numpy_dtype

#: relative tolerance of the linearity check, by the dtype the region computes in
LINEAR_RTOL = {"float64": 1e-6, "float32": 1e-3, "float16": 2e-2, "bfloat16": 6e-2}
_CASTS = {"Cast", "CastLike", "_to_copy", "to", "convert_element_type", "type_as"}


class NotLinear(Exception):
    """The region is not a token-wise linear function of its source (the reason)."""


def _probe_layout(dims: list | None, rows: int, ids: bool) -> list[int]:
    """The leading shape of one probe run: symbolic axes 1, the last one sized to hold ``rows``
    tokens (all static: the recorded shape, run as often as needed)."""
    if dims is None or len(dims) < 1:
        raise NotLinear("the branch's input has no recorded shape")
    leading = list(dims) if ids else list(dims[:-1])
    symbolic = [i for i, d in enumerate(leading) if d is None]
    fixed = math.prod(d for d in leading if d is not None)
    if symbolic:
        leading = [1 if d is None else d for d in leading]
        leading[symbolic[-1]] = max(1, math.ceil(rows / max(fixed, 1)))
    return leading


def _random_layout(dims: list, ids: bool) -> list[int]:
    """The random check's leading shape: more than one row on every symbolic axis (2), and 6 tokens
    on the last (a reshape grouping 2 or 3 tokens still runs, and is caught mixing them)."""
    leading = list(dims) if ids else list(dims[:-1])
    symbolic = [i for i, d in enumerate(leading) if d is None]
    out = [2 if d is None else d for d in leading]
    if symbolic:
        out[symbolic[-1]] = 6
    return out


def _run_rows(view: GraphView, source, target, inputs: np.ndarray, leading: list[int], width: int | None) -> np.ndarray:
    """The region on ``inputs`` (``[n, width]`` rows, or ``[n]`` ids), run by run, as ``[n, out]``."""
    per_run = max(1, math.prod(leading))
    outputs = []
    for start in range(0, inputs.shape[0], per_run):
        chunk = inputs[start : start + per_run]
        if chunk.shape[0] < per_run:
            pad = np.zeros((per_run - chunk.shape[0], *chunk.shape[1:]), dtype=chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        feed = chunk.reshape(*leading, width) if width is not None else chunk.reshape(leading)
        try:
            result = np.asarray(view.evaluate([(source, feed)], target))
        except RegionError as error:
            raise NotLinear(f"the branch cannot be evaluated alone: {error}") from None
        tokens = list(feed.shape[:-1]) if width is not None else list(feed.shape)
        if list(result.shape[:-1]) != tokens:
            raise NotLinear(f"the branch turns an input of shape {list(feed.shape)} into {list(result.shape)}: it does not keep one row per token")
        outputs.append(result.reshape(per_run, -1).astype(np.float64))
    return np.concatenate(outputs)[: inputs.shape[0]]


def lossy_cast(view: GraphView, source, target, nodes: list):
    """The first cast among ``nodes`` that loses information: to an integer type, or to a float
    that holds the values of neither its input nor an end of the region (merged into ``W``, the region would read its input
    unrounded). None when every cast keeps the values."""
    ends = [d for d in (view.value_dtype(source), view.value_dtype(target)) if d in FLOAT_HOLDS]
    for node in nodes:
        inputs = view.inputs(node)
        if view.op(node) not in _CASTS or not inputs:
            continue
        held, came = view.value_dtype(view.output(node)), view.value_dtype(inputs[0])
        if came in FLOAT_HOLDS and held is not None and (held not in FLOAT_HOLDS or not any(d in FLOAT_HOLDS[held] for d in [came, *ends])):
            return node
    return None


def measure_map(view: GraphView, source, target, nodes: list, n_in: int, n_out: int, *, ids: bool = False, seed: int = 0) -> np.ndarray:
    """``M`` ``[n_in, n_out]`` (fp32) with ``target = source @ M`` token by token (``ids``: ``target =
    M[source]``), measured and checked; raises :class:`NotLinear` with the reason."""
    cast = lossy_cast(view, source, target, nodes)
    if cast is not None:
        raise NotLinear(f"'{view.name(cast)}' holds the branch's values as {view.value_dtype(view.output(cast))}: a cast to an integer type or a lower precision is not linear")
    dims = view.dims(source)
    dtype = view.value_dtype(source) or ("int64" if ids else "float32")
    if dtype == "bfloat16" and view.ir == "onnx":
        raise NotLinear("a bfloat16 branch cannot be evaluated by ONNX Runtime on this CPU")
    width = None if ids else n_in
    probe = np.arange(n_in, dtype=numpy_dtype(dtype)) if ids else np.eye(n_in, dtype=np.float32).astype(numpy_dtype(dtype))
    matrix = _run_rows(view, source, target, probe, _probe_layout(dims, n_in, ids), width)
    if matrix.shape != (n_in, n_out):
        raise NotLinear(f"the branch gives {matrix.shape[1]} columns per token, the projection {n_out}")
    random_leading = _random_layout(dims, ids)
    count = max(1, math.prod(random_leading))
    rng = np.random.default_rng(seed)
    if ids:
        sample = rng.integers(0, n_in, size=count).astype(numpy_dtype(dtype))
        expected = matrix[sample.astype(np.int64)]
    else:
        sample = rng.standard_normal((count, n_in)).astype(numpy_dtype(dtype))
        expected = sample.astype(np.float64) @ matrix
    got = _run_rows(view, source, target, sample, random_leading, width)
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    error = float(np.max(np.abs(got - expected))) if expected.size else 0.0
    if not math.isfinite(error) or error > LINEAR_RTOL.get(dtype, 1e-3) * max(scale, 1e-6) + 1e-6:
        if ids:
            raise NotLinear(f"the branch is not a per-token table lookup (max deviation {error:.3g} from its table on random ids)")
        raise NotLinear(
            f"the branch is not linear token by token (max deviation {error:.3g} from its linear part on a random input, "
            f"scale {scale:.3g}): a nonlinearity, a constant term, or a reshape that mixes tokens"
        )
    return matrix.astype(np.float32)
