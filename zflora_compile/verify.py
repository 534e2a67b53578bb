"""Numerical verification: the rewritten model must compute what the original computes.

Both models run in ONNX Runtime (CPU) on the same seeded inputs, built from the graph's input
signature: token ids inside the vocabulary (read from the embedding ``Gather``), attention masks
of ones, position ids, short key/value caches for ``past_key_values.*`` inputs, and several
sequence lengths when the sequence axis is dynamic. Every output is compared with
``|rewritten - original| <= atol + rtol * |original|`` elementwise; tolerances depend on the
output's dtype (:data:`TOLERANCES`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from zflora_compile.errors import InputError, first_line

# (atol, rtol) by output element type. fp32: the rewrite only reassociates sums.
TOLERANCES = {
    "float32": (1e-4, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
    "float64": (1e-8, 1e-8),
}
DEFAULT_SEQ_LENS = (1, 7, 16)
CACHE_CASES = ((1, 4), (5, 4))  # (new tokens, past length) for graphs with a KV cache
# Tried too, and reported as skipped when the *original* graph cannot run them (some exports
# reject an empty cache): a prompt with an empty cache.
OPTIONAL_CACHE_CASES = ((8, 0),)
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}


@dataclasses.dataclass
class InputCase:
    name: str
    feeds: dict[str, np.ndarray]
    optional: bool = False


def input_role(name: str) -> str:
    lowered = name.lower()
    if "past" in lowered and ("key" in lowered or "value" in lowered or lowered.endswith("kv")):
        return "past"
    for role in ("input_ids", "attention_mask", "position_ids", "cache_position"):
        if role in lowered:
            return role
    return "other"


def vocab_size(model: ir.Model, input_name: str) -> int | None:
    """Rows of the embedding table that a token-id input indexes (a constant ``Gather``)."""
    value = next((v for v in model.graph.inputs if v.name == input_name), None)
    frontier = [value] if value is not None else []
    while frontier:
        current = frontier.pop()
        for user, index in current.uses():
            if user.op_type == "Gather" and index == 1 and user.inputs[0] is not None:
                table = user.inputs[0]
                if table.shape is not None and isinstance(table.shape[0], int):
                    return int(table.shape[0])
                if table.const_value is not None:
                    return int(table.const_value.shape[0])
            if user.op_type in ("Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten"):
                frontier.extend(user.outputs)
    return None


def token_vocab(model: ir.Model) -> int | None:
    """The vocabulary size read from the embedding of the model's ``input_ids``-like input."""
    name = next((v.name for v in model.graph.inputs if "input_ids" in (v.name or "")), "")
    return vocab_size(model, name)


def _dims(shape) -> list:
    return [d if isinstance(d, int) else (d if isinstance(d, str) else None) for d in shape]


def make_cases(session: ort.InferenceSession, vocab: int | None, *, seed: int = 0, fixed: dict[str, int] | None = None) -> list[InputCase]:
    """Seeded inputs for every case this graph's signature admits.

    Every value of every bool input runs (an ``If`` on optimum's ``use_cache_branch`` holds two
    decoders: each is checked), and graph inputs with a default initializer (adapter weights a
    runtime binds, as Olive and ONNX Runtime's multi-LoRA write them) run once with their
    defaults and once with seeded random values: a rewrite that froze them would pass the first
    and fail the second."""
    inputs = with_fixed_dims(session.get_inputs(), fixed or {})
    has_cache = has_kv_cache(inputs)
    free_axes = any(not isinstance(d, int) for i in inputs for d in _dims(i.shape))
    if has_cache:
        plans = list(CACHE_CASES) + list(OPTIONAL_CACHE_CASES)
    elif not free_axes:
        plans = [(None, 0)]
    else:
        plans = [(n, 0) for n in DEFAULT_SEQ_LENS]
    overridable = with_fixed_dims([i for i in session.get_overridable_initializers() if np.issubdtype(_ORT_TYPES.get(i.type, np.int64), np.floating)], fixed or {})
    cases = []
    for case_index, (seq, past) in enumerate(plans):
        feeds = make_feeds(inputs, vocab, seq=seq, past=past, seed=seed + case_index)
        name = "static shapes" if seq is None else f"seq={seq}" + (f",past={past}" if has_cache else "")
        optional = has_cache and (seq, past) in OPTIONAL_CACHE_CASES
        for flags, flagged in bool_variants(inputs, feeds):
            # with run-time adapter inputs, the defaults may not run at all (Olive's empty defaults
            # beside recorded rank-8 shapes): then the fed case below is the check
            cases.append(InputCase(name + flags, flagged, optional=optional or bool(overridable)))
            if overridable:
                fed = make_feeds(overridable, vocab, seq=seq or 4, past=past, seed=seed + 1000 + case_index)
                cases.append(InputCase(name + flags + ",defaulted inputs fed", {**flagged, **fed}, optional=optional))
    return cases


#: bool inputs beyond this many are flipped one at a time, not in every combination
MAX_BOOL_PRODUCT = 3


def bool_variants(inputs, feeds: dict[str, np.ndarray]) -> list[tuple[str, dict[str, np.ndarray]]]:
    """``feeds`` with every value of its one-element bool inputs (all combinations of up to
    :data:`MAX_BOOL_PRODUCT` inputs, else each flipped alone); the names say which."""
    flags = [i.name for i in inputs if i.type == "tensor(bool)" and feeds[i.name].size == 1]  # switches, not bool masks
    if not flags:
        return [("", feeds)]
    import itertools

    if len(flags) <= MAX_BOOL_PRODUCT:
        settings = list(itertools.product((True, False), repeat=len(flags)))
    else:
        settings = [tuple(True for _ in flags)] + [tuple(j != k for j in range(len(flags))) for k in range(len(flags))]
    variants = []
    for values in settings:
        flagged = dict(feeds)
        for name, value in zip(flags, values):
            flagged[name] = np.full(feeds[name].shape, value, dtype=np.bool_)
        variants.append(("," + ",".join(f"{n}={v}" for n, v in zip(flags, values)), flagged))
    return variants


def has_kv_cache(inputs) -> bool:
    return any(input_role(i.name) == "past" for i in inputs)


def symbol_values(inputs, *, seq: int | None, past: int) -> dict[str, int]:
    """The value of every symbolic input dimension for ``seq`` new tokens after ``past`` cached ones."""
    return _symbols(inputs, {i.name: input_role(i.name) for i in inputs}, seq, past)


def make_feeds(inputs, vocab: int | None, *, seq: int | None, past: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded feeds for ``seq`` new tokens on a ``past``-token KV cache (``seq=None``: static graph).

    ``inputs`` are ONNX Runtime ``NodeArg``s or anything with ``name``, ``type`` ("tensor(float)")
    and ``shape`` (ints and symbolic names).
    """
    rng = np.random.default_rng(seed)
    roles = {i.name: input_role(i.name) for i in inputs}
    symbols = _symbols(inputs, roles, seq, past)
    feeds = {}
    for info in inputs:
        dtype = _ORT_TYPES.get(info.type)
        if dtype is None:
            raise InputError(f"cannot synthesize input '{info.name}' of type {info.type}; use --no-verify")
        shape = [d if isinstance(d, int) else symbols.get(d, 1) for d in _dims(info.shape)]
        if roles[info.name] == "past" and len(shape) >= 3 and not isinstance(_dims(info.shape)[-2], int):
            shape[-2] = past
        feeds[info.name] = np.asarray(_fill(roles[info.name], shape, dtype, rng, vocab, past), dtype=dtype)  # rank 0: an array, not a numpy scalar
    return feeds


def _symbols(inputs, roles, seq: int, past: int) -> dict[str, int]:
    """Values for the symbolic dims, read off the roles of the inputs that carry them."""
    symbols: dict[str, int] = {}
    for info in inputs:
        dims = _dims(info.shape)
        role = roles[info.name]
        if role in ("input_ids", "position_ids") and dims:
            if isinstance(dims[-1], str):
                symbols[dims[-1]] = seq
        elif role == "attention_mask" and dims and isinstance(dims[-1], str):
            symbols[dims[-1]] = past + seq
        elif role == "past" and len(dims) >= 3 and isinstance(dims[-2], str):
            symbols[dims[-2]] = past
        elif role == "cache_position" and dims and isinstance(dims[-1], str):
            symbols[dims[-1]] = seq
    for info in inputs:  # expressions some exporters write, e.g. "past_sequence_length + 1"
        for dim in _dims(info.shape):
            if isinstance(dim, str) and dim not in symbols:
                symbols[dim] = _evaluate_dim(dim, symbols, seq)
    return symbols


def _evaluate_dim(expression: str, symbols: dict[str, int], seq: int) -> int:
    """An expression of known symbols; a free batch axis is 1; any other free axis is ``seq``."""
    tokens = re.findall(r"[A-Za-z_][A-Za-z0-9_]*|\d+|[+\-*]", expression)
    if len(tokens) > 1 and all(t in symbols or t.isdigit() or t in "+-*" for t in tokens):
        try:
            return int(eval(" ".join(str(symbols.get(t, t)) for t in tokens), {"__builtins__": {}}))  # noqa: S307
        except SyntaxError:
            pass
    return 1 if "batch" in expression.lower() else seq


def _fill(role: str, shape: list[int], dtype, rng: np.random.Generator, vocab: int | None, past: int) -> np.ndarray:
    if role == "input_ids":
        return rng.integers(0, vocab or 2, size=shape).astype(dtype)
    if role == "attention_mask":
        return np.ones(shape, dtype=dtype)
    if role in ("position_ids", "cache_position"):
        return np.broadcast_to(np.arange(past, past + shape[-1]), shape).astype(dtype).copy()
    if np.issubdtype(dtype, np.floating):
        return (rng.standard_normal(shape) * 0.5).astype(dtype)
    if dtype == np.bool_:
        return np.ones(shape, dtype=dtype)
    return np.zeros(shape, dtype=dtype)


def session(path: str | os.PathLike | bytes, *, in_memory: dict | None = None) -> ort.InferenceSession:
    """A CPU session of a model file (or of a serialised model: a region); ``in_memory`` maps the
    external data files the model names to buffers holding their bytes (read while it loads)."""
    options = ort.SessionOptions()
    if in_memory:
        names = list(in_memory)
        options.add_external_initializers_from_files_in_memory(names, [in_memory[n] for n in names], [len(in_memory[n]) for n in names])
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 4  # a failing run raises with the message; a skipped optional case must not print it
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), options, providers=["CPUExecutionProvider"])


#: ``--verify auto`` checks the whole model below this many bytes of weights, region by region
#: above. The full check holds two ONNX Runtime sessions of the model (about 2.2x its weights at
#: peak: 847 MB for 385 MB of weights, measured; 14 GiB reported for a 1.5B fp32 model); 2 GiB of
#: weights keeps it under ~5 GB, what a laptop or a CI runner spares beside the compile, while
#: every model this size still gets the check of everything end to end
AUTO_REGIONS_BYTES = 2 * 1024**3


def choose_mode(requested: str, weight_bytes: int) -> tuple[str, str]:
    """(mode, why): ``requested`` unless it is "auto", which picks by ``weight_bytes``."""
    if requested != "auto":
        return requested, f"--verify {requested}"
    size = f"{weight_bytes / 1024**3:.2f} GiB of weights"
    if weight_bytes < AUTO_REGIONS_BYTES:
        return "full", f"auto: {size}, below {AUTO_REGIONS_BYTES / 1024**3:g} GiB: the whole model is run twice"
    return "regions", f"auto: {size}, at least {AUTO_REGIONS_BYTES / 1024**3:g} GiB: two whole-model sessions would need ~2.2x that in memory"


_FLOAT_WIDTH = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def weight_precision(path: str | os.PathLike) -> np.dtype | None:
    """The widest float type of the model's weights (read without loading external data): a float64
    output computed from float32 weights carries float32 rounding and is judged at its tolerance."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    names = {ir.DataType(t.data_type).numpy().name for t in proto.graph.initializer if ir.DataType(t.data_type).is_floating_point()}
    widest = max((n for n in names if n in _FLOAT_WIDTH), key=_FLOAT_WIDTH.get, default=None)
    return None if widest is None or widest == "bfloat16" else np.dtype(widest)


def tolerance_for(dtype: np.dtype, atol: float | None, rtol: float | None) -> tuple[float, float]:
    default_atol, default_rtol = TOLERANCES.get(np.dtype(dtype).name, (0.0, 0.0))
    return (default_atol if atol is None else atol, default_rtol if rtol is None else rtol)


def compare(reference: np.ndarray, candidate: np.ndarray, atol: float, rtol: float) -> dict:
    if reference.shape != candidate.shape:
        return {"passed": False, "reason": f"shape {list(candidate.shape)} != {list(reference.shape)}"}
    ref = reference.astype(np.float64)
    got = candidate.astype(np.float64)
    with np.errstate(all="ignore"):
        diff = np.abs(got - ref)
        same = (np.isnan(ref) & np.isnan(got)) | (np.isinf(ref) & (got == ref))
        diff = np.where(same, 0.0, diff)
        bound = atol + rtol * np.abs(ref)
        passed = bool(np.all(same | (diff <= bound)))  # same non-finite value on both sides: bound is NaN there
    outcome = {}
    mismatched = ~same & ~(np.isfinite(ref) & np.isfinite(got))
    if mismatched.any():  # Inf against -Inf or a number: the bound (Inf) would let it pass
        passed = False
        outcome["reason"] = f"{int(mismatched.sum())} value(s) non-finite in one model and not the other"
    elif ref.size and not np.isfinite(ref).any():  # integers are always finite here
        passed = False  # NaN against NaN everywhere compares nothing: a wrong model would pass too
        outcome["reason"] = "no finite value on either side: nothing to compare (non-finite weights or inputs)"
    return {
        **outcome,
        "passed": passed,
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "max_abs_reference": float(np.nanmax(np.abs(ref))) if ref.size and not np.isnan(ref).all() else 0.0,
        "atol": atol,
        "rtol": rtol,
        "dtype": reference.dtype.name,
    }


def verify_models(
    original: str | os.PathLike,
    rewritten: str | os.PathLike,
    vocab: int | None,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
) -> dict:
    """Run both models on seeded inputs and compare every output. Returns the report section."""
    try:
        reference_session = session(original)
    except Exception as error:  # noqa: BLE001
        from zflora_compile.errors import DependencyError
        from zflora_compile.targets.ort import cpu_kernel_gap  # lazy: targets import this module

        gap = cpu_kernel_gap(Path(original))
        if gap:
            raise DependencyError(
                f"{original}: this model cannot run on this machine, so it cannot be verified: {gap}; verification runs it in "
                "ONNX Runtime on CPU; --no-verify compiles it without running it"
            ) from None
        raise InputError(f"{original}: ONNX Runtime cannot load the original model ({first_line(error)}); use --no-verify to skip verification") from None
    candidate_session = session(rewritten)
    computed_in = weight_precision(rewritten)
    import onnx

    cases = make_cases(reference_session, vocab, seed=seed, fixed=fixed_dims(onnx.load(str(original), load_external_data=False)))
    accepted = {i.name for i in candidate_session.get_inputs()} | {i.name for i in candidate_session.get_overridable_initializers()}
    names = [o.name for o in reference_session.get_outputs()]
    results = []
    worst = {"output": None, "max_abs_diff": -1.0}
    for case in cases:
        try:
            expected = reference_session.run(names, case.feeds)
        except Exception as error:  # noqa: BLE001
            if case.optional:
                results.append({"case": case.name, "inputs": {k: list(v.shape) for k, v in case.feeds.items()}, "outputs": {}, "skipped": f"the original model does not run on it: {first_line(error)}"})
                continue
            raise InputError(f"{original}: the original model does not run on synthesized inputs ({case.name}: {first_line(error)}); use --no-verify") from None
        lost = sorted(set(case.feeds) - accepted)
        if lost:  # a fed input the rewrite turned into a constant (or dropped): the model no longer listens to it
            reason = f"input '{lost[0]}' of the original is no input of the rewritten model"
            results.append({"case": case.name, "inputs": {k: list(v.shape) for k, v in case.feeds.items()}, "outputs": {lost[0]: {"passed": False, "reason": reason}}})
            continue
        actual = candidate_session.run(names, case.feeds)
        outputs = {}
        for name, ref, got in zip(names, expected, actual):
            tol = tolerance_for(computed_in if ref.dtype == np.float64 and computed_in is not None else ref.dtype, atol, rtol)
            outputs[name] = compare(ref, got, *tol)
            if outputs[name].get("max_abs_diff", float("inf")) > worst["max_abs_diff"]:
                worst = {"output": name, "case": case.name, "max_abs_diff": outputs[name].get("max_abs_diff", float("inf"))}
        results.append({"case": case.name, "inputs": {k: list(v.shape) for k, v in case.feeds.items()}, "outputs": outputs})
    return verification_section(f"onnxruntime {ort.__version__} CPUExecutionProvider", results, worst, seed=seed, atol=atol, rtol=rtol)


def verification_section(runtime: str, cases: list[dict], worst: dict, *, seed: int, atol: float | None, rtol: float | None) -> dict:
    """The report's ``verification`` section: passed when every output of every case passed."""
    return {
        "passed": all(o["passed"] for case in cases for o in case["outputs"].values()),
        "runtime": runtime,
        "seed": seed,
        "rule": "|rewritten - original| <= atol + rtol * |original|, elementwise, every output",
        "tolerances": {k: {"atol": a if atol is None else atol, "rtol": r if rtol is None else rtol} for k, (a, r) in TOLERANCES.items()},
        "worst": worst,
        "cases": cases,
    }


def verification_failure_message(result: dict) -> str:
    for case in result["cases"]:
        for name, outcome in case["outputs"].items():
            if not outcome["passed"]:
                detail = outcome.get("reason") or (
                    f"max abs diff {outcome['max_abs_diff']:.3g} > atol {outcome['atol']:g} + rtol {outcome['rtol']:g} * |ref|"
                )
                return f"verification failed: output '{name}' ({case['case']}): {detail}"
    return "verification failed"



@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A graph input as :func:`make_feeds` needs it (the same fields as an ORT ``NodeArg``)."""

    name: str
    type: str
    shape: tuple


_ONNX_ELEM_TO_ORT = {1: "tensor(float)", 10: "tensor(float16)", 11: "tensor(double)", 7: "tensor(int64)", 6: "tensor(int32)", 9: "tensor(bool)", 2: "tensor(uint8)", 3: "tensor(int8)", 16: "tensor(bfloat16)"}


def input_specs(path: str | os.PathLike) -> list[InputSpec]:
    """The model's runtime inputs read from the file (weights are not loaded)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in proto.graph.initializer}
    specs = []
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, _ONNX_ELEM_TO_ORT.get(tensor_type.elem_type, f"elem_type {tensor_type.elem_type}"), dims))
    return with_fixed_dims(specs, fixed_dims(proto))


#: ONNX Runtime's operators that read a precomputed rotary cos cache: its input index
ROTARY_COS_CACHE = {"GroupQueryAttention": 7, "RotaryEmbedding": 2}
#: ONNX Runtime's attention operators that read a KV cache: (past key index, past value index)
_CACHE_READERS = {"GroupQueryAttention": (3, 4), "MultiHeadAttention": (6, 7)}


def fixed_dims(proto) -> dict[str, int]:
    """Symbolic input axes whose size the graph fixes although the signature leaves it free:
    the head size of a KV cache read by ONNX Runtime's ``GroupQueryAttention`` (onnxruntime-genai
    names it ``kv_cache_dim``): the width of the attention's key input over ``kv_num_heads``, or
    twice the rotary cache's width."""
    inputs = {v.name: v for v in proto.graph.input}
    widths = {v.name: v.type.tensor_type.shape.dim[-1].dim_value for v in list(proto.graph.value_info) + list(proto.graph.output) if v.type.tensor_type.shape.dim}
    shapes = {t.name: list(t.dims) for t in proto.graph.initializer}
    fixed: dict[str, int] = {}
    for node in proto.graph.node:
        if node.domain != "com.microsoft" or node.op_type not in _CACHE_READERS:
            continue
        attrs = {a.name: a.i for a in node.attribute}
        kv_heads = attrs.get("kv_num_heads") or attrs.get("num_heads")
        key = node.input[1] if len(node.input) > 1 else ""
        head = widths.get(key, 0) // kv_heads if key and kv_heads and widths.get(key) else 0
        cos = ROTARY_COS_CACHE.get(node.op_type, len(node.input))
        if not head and attrs.get("do_rotary") and len(node.input) > cos and node.input[cos] in shapes:
            head = 2 * shapes[node.input[cos]][-1]
        for index in _CACHE_READERS[node.op_type]:
            name = node.input[index] if len(node.input) > index else ""
            if head and name in inputs:
                last = inputs[name].type.tensor_type.shape.dim[-1]
                if not last.HasField("dim_value") and last.dim_param:
                    fixed[last.dim_param] = head
    fixed.update(_ranks_recorded(proto, inputs))
    return fixed


def _ranks_recorded(proto, inputs) -> dict[str, int]:
    """Symbolic axes of run-time weight inputs (``A: [in, "lora_r"]``) that the exporter's recorded
    intermediate shapes fix: the last axis of ``x @ A`` recorded as a number (Olive records the
    rank the adapter was exported with; ONNX Runtime then insists on it)."""
    recorded = {v.name: v.type.tensor_type.shape.dim for v in proto.graph.value_info}
    fixed = {}
    for node in proto.graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) < 2 or node.input[1] not in inputs:
            continue
        last = inputs[node.input[1]].type.tensor_type.shape.dim
        out = recorded.get(node.output[0])
        if last and not last[-1].HasField("dim_value") and last[-1].dim_param and out and out[-1].HasField("dim_value") and out[-1].dim_value > 0:
            fixed.setdefault(last[-1].dim_param, out[-1].dim_value)
    return fixed


def with_fixed_dims(specs, fixed: dict[str, int]) -> list:
    """``specs`` (anything with ``name``, ``type``, ``shape``) with the ``fixed`` axes as numbers."""
    if not fixed:
        return list(specs)
    return [InputSpec(s.name, s.type, tuple(fixed.get(d, d) if isinstance(d, str) else d for d in s.shape)) for s in specs]
