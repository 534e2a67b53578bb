"""ONNX Runtime: the embedded default target (CPU here; CUDA when onnxruntime-gpu sees a GPU).

The artifact is ``model.optimized.onnx``: the model after ONNX Runtime's full graph
optimizations (``ORT_ENABLE_ALL``) for the provider it was built with, saved by ONNX Runtime
itself. It runs in the model's own precision; the optimized file is tied to that provider and
ONNX Runtime version (ONNX Runtime's rule), the portable ``model.onnx`` sits beside it.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort

from zflora_compile.errors import EnvironmentProblem, InputError, VerificationError, first_line
from zflora_compile.targets.base import CannotRunHere, Loaded, Shape, Target, check_precision

OPTIMIZED_NAME = "model.optimized.onnx"


def uses_external_data(model_path: Path) -> bool:
    """Whether any initializer of the file lives in an external data file (weights are not read)."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def choose_provider(requested: str | None) -> str:
    available = ort.get_available_providers()
    if requested is None:
        return "CUDAExecutionProvider" if "CUDAExecutionProvider" in available else "CPUExecutionProvider"
    name = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}.get(requested.lower(), requested)
    if name not in available:
        raise InputError(f"ONNX Runtime provider '{name}' is not available here (available: {', '.join(available)})")
    return name


_NO_KERNEL = re.compile(r"Could not find an implementation for (?P<op>[\w.]+)\((?P<version>\d+)\) node with name '(?P<node>[^']*)'")


def holds_bfloat16(model) -> bool:
    """Whether an ``onnx_ir.Model`` has a bfloat16 input, output, initializer or typed intermediate."""
    import onnx_ir as ir

    values = [*model.graph.inputs, *model.graph.outputs, *model.graph.initializers.values()]
    values += [v for node in model.graph.all_nodes() for v in node.outputs]
    return any(v.dtype == ir.DataType.BFLOAT16 for v in values)


def _without_bfloat16_kernel(model) -> list[str]:
    """Op types of ``model`` that read or write bfloat16 and have no CPU kernel for it in this
    ONNX Runtime (its kernel registry); empty when the registry cannot be read."""
    import onnx_ir as ir

    try:
        from onnxruntime.capi import _pybind_state

        kernels = _pybind_state.get_all_opkernel_def()
    except Exception:  # noqa: BLE001 - a private registry: the error ONNX Runtime gave stays the answer
        return []
    with_bf16: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for kernel in kernels:
        if kernel.provider == "CPUExecutionProvider" and any("tensor(bfloat16)" in types for types in kernel.type_constraints.values()):
            with_bf16.setdefault((kernel.domain, kernel.op_name), []).append(tuple(kernel.version_range))
    missing = set()
    for node in model.graph.all_nodes():
        if not any(v is not None and v.dtype == ir.DataType.BFLOAT16 for v in [*node.inputs, *node.outputs]):
            continue
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        version = model.opset_imports.get(node.domain, model.opset_imports.get(domain, 0))
        if not any(low <= version <= high for low, high in with_bf16.get((domain, node.op_type), [])):
            missing.add(node.op_type)
    return sorted(missing)


def cpu_kernel_gap(model_path: Path, model=None) -> str | None:
    """Why ONNX Runtime's CPU provider cannot run a bfloat16 model here ("ONNX Runtime CPU has no
    bfloat16 kernel for Where (node 'n'; also Softmax)"), or ``None`` when it can or the model
    holds no bfloat16. ``model`` (the file as an ``onnx_ir.Model``) saves reading it again."""
    import onnx_ir as ir

    model = model if model is not None else ir.load(str(model_path))
    if not holds_bfloat16(model):
        return None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    try:
        ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001
        found = _NO_KERNEL.search(str(error))
        if found is None:
            return None
        others = [op for op in _without_bfloat16_kernel(model) if op != found["op"]]
        also = f"; also {', '.join(others[:6])}{', ...' if len(others) > 6 else ''}" if others else ""
        return f"ONNX Runtime CPU has no bfloat16 kernel for {found['op']}-{found['version']} (node '{found['node']}'{also})"
    return None


@dataclasses.dataclass(frozen=True)
class OrtOptions:
    """``ort_provider``: cpu, cuda or a provider name (None: CUDA when onnxruntime-gpu sees a GPU,
    else CPU); ``threads``: intra-op threads (None: ONNX Runtime's default)."""

    ort_provider: str | None = None
    threads: int | None = None

    def __post_init__(self):
        if self.threads is not None and self.threads < 1:
            raise InputError(f"--threads must be at least 1, got {self.threads}")


class OrtTarget(Target):
    name = "ort"
    summary = "ONNX Runtime (default)"
    Options = OrtOptions

    @classmethod
    def add_arguments(cls, group) -> None:
        group.add_argument("--ort-provider", help="ort: cpu or cuda (default: cuda when onnxruntime-gpu sees a GPU, else cpu)")
        group.add_argument("--threads", type=int, help="ort: intra-op threads (default: ONNX Runtime's)")

    @classmethod
    def options_from_args(cls, args) -> OrtOptions:
        check_precision(cls.name, args.precision, cls.precisions)
        return OrtOptions(ort_provider=args.ort_provider, threads=args.threads)

    def check_available(self) -> None:
        super().check_available()
        choose_provider(self.options.ort_provider)

    def _session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if self.options.threads:
            options.intra_op_num_threads = self.options.threads
        return options

    def _providers(self) -> list[str]:
        provider = choose_provider(self.options.ort_provider)
        return [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]

    def build(self, model_path: Path, out_dir: Path, shapes: list[Shape]) -> dict:
        """``model.optimized.onnx``; :class:`CannotRunHere` when only the CPU provider is used and
        it has no kernel for the model's bfloat16 ops (nothing is written then)."""
        if self._providers() == ["CPUExecutionProvider"]:
            gap = cpu_kernel_gap(model_path)
            if gap:
                raise CannotRunHere(f"{model_path}: target ort cannot build its artifact on this machine: {gap}", gap)
        options = self._session_options()
        options.add_session_config_entry("session.disable_prepacking", "1")  # building only: the artifact is the same, the session holds one copy of the weights less
        optimized = out_dir / OPTIMIZED_NAME
        options.optimized_model_filepath = str(optimized)
        if uses_external_data(model_path):
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name", optimized.name + ".data")
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            session = ort.InferenceSession(str(model_path), options, providers=self._providers())
        except Exception as error:  # noqa: BLE001
            if self._loads_without_saving(model_path):  # the model is fine: writing the artifact failed
                raise EnvironmentProblem(f"{optimized}: ONNX Runtime could not write the optimized model ({_disk_state(out_dir)}): {first_line(error)}") from None
            raise VerificationError(f"{model_path}: ONNX Runtime cannot load the model: {first_line(error)}") from None
        artifacts = sorted(p.name for p in out_dir.iterdir() if p.name.startswith(OPTIMIZED_NAME))
        return {
            "name": self.name,
            "runtime": f"onnxruntime {ort.__version__}",
            "providers": session.get_providers(),
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "artifacts": artifacts,
        }

    def regional_artifact(self, out_dir: Path) -> Path | None:
        """``model.optimized.onnx`` when it runs on the CPU provider: ONNX Runtime's own CPU
        kernels then run its regions as they run the whole artifact."""
        artifact = out_dir / OPTIMIZED_NAME
        return artifact if artifact.exists() and self._providers() == ["CPUExecutionProvider"] else None

    def _loads_without_saving(self, model_path: Path) -> bool:
        options = self._session_options()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        try:
            ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001
            return False
        return True

    def load(self, out_dir: Path, model_path: Path, shape: Shape, *, for_check: bool = False) -> Loaded:
        artifact = out_dir / OPTIMIZED_NAME
        options = self._session_options()
        if for_check:  # prepacking copies every MatMul weight once more: worth it for timing only
            options.add_session_config_entry("session.disable_prepacking", "1")
        return loaded_session(artifact if artifact.exists() else model_path, options, self._providers())


def loaded_session(path: Path, options: ort.SessionOptions, providers: list[str]) -> Loaded:
    """An ONNX Runtime session of ``path`` as a target's :class:`Loaded`: plain runs for checks,
    I/O-bound ones (:func:`bound_run`) for timing."""
    session = ort.InferenceSession(str(path), options, providers=providers)
    names = [o.name for o in session.get_outputs()]
    return Loaded(
        run=lambda feeds: session.run(names, feeds),
        output_names=names,
        description=f"{session.get_providers()[0]} ({path.name})",
        prepare=lambda feeds: bound_run(session, feeds),
    )


def bound_run(session, feeds: dict[str, np.ndarray]):
    """A call of ``session`` on ``feeds`` with nothing to copy: the inputs are bound once where
    the session computes (CPU memory as they are; on CUDA, copied to the device once), one untimed
    run learns the outputs' shapes and types, and each output is bound to a buffer of that shape
    allocated once on the same device (an output of a type numpy has no buffer for, bfloat16,
    stays allocated by ONNX Runtime); the call is ``run_with_iobinding``. (The CUDA branch follows
    ONNX Runtime's documented I/O binding API; no GPU was available to run it here.)"""
    device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
    binding = session.io_binding()
    arrays = {name: np.ascontiguousarray(array) for name, array in feeds.items()}
    placed = {}
    for name, array in arrays.items():
        if device == "cpu":
            binding.bind_cpu_input(name, array)
        else:
            placed[name] = ort.OrtValue.ortvalue_from_numpy(array, device, 0)
            binding.bind_ortvalue_input(name, placed[name])
    names = [o.name for o in session.get_outputs()]
    for name in names:
        binding.bind_output(name, device)
    session.run_with_iobinding(binding)
    learned = binding.get_outputs()
    binding.clear_binding_outputs()
    buffers = []
    for name, output in zip(names, learned):
        dtype = _NUMPY_OF.get(output.data_type())
        if dtype is None:
            binding.bind_output(name, device)
            continue
        buffers.append(ort.OrtValue.ortvalue_from_shape_and_type(output.shape(), dtype, device, 0))
        binding.bind_ortvalue_output(name, buffers[-1])
    keep = (arrays, buffers, placed)  # the bound memory lives as long as the call

    def run():
        session.run_with_iobinding(binding)
        return keep

    return run


#: ONNX Runtime's element type names of outputs -> numpy types (for preallocated output buffers)
_NUMPY_OF = {
    f"tensor({name})": dtype
    for name, dtype in {
        "float": np.float32, "float16": np.float16, "double": np.float64, "bool": np.bool_,
        "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
        "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    }.items()
}


def _disk_state(directory: Path) -> str:
    """Why a write into ``directory`` may have failed, as far as the filesystem tells."""
    import os

    try:
        stats = os.statvfs(directory)
    except OSError as error:
        return f"{error.strerror}"
    if stats.f_flag & getattr(os, "ST_RDONLY", 1):
        return "read-only file system (EROFS)"
    if stats.f_bavail * stats.f_frsize < 1 << 20:
        return "No space left on device (ENOSPC)"
    return "write failed"
