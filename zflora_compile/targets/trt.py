"""NVIDIA GPUs through the TensorRT Python API (``tensorrt`` >= 10; optional extra).

The artifact is ``model.plan``, a serialized engine built by the ONNX parser and builder with
one optimization profile covering the dynamic sequence and cache axes (min / opt / max from
``TrtOptions.seq_range`` and ``past_range``), in fp32, fp16 (default) or bf16, optionally
refittable. Device buffers are torch CUDA tensors; timing uses CUDA events around
``execute_async_v3``.

TensorRT could not be installed where this tool is developed (NVIDIA's package index is out of
reach there), so this module is written against the documented API and was never run by its
authors; its tests skip with that reason.

``--refit`` (changed with ``zcompile swap``): the engine is built with
``BuilderFlag.REFIT_INDIVIDUAL`` and only the adapter-owned weights the model's ``zflora.compiled``
record names (widened weights, low-rank constants, column scales, GAWS blocks, widened lane weights;
:func:`zflora_compile.deploy.onnx_adapter.owned_names`) are marked refittable
(``network.mark_weights_refittable``); the base weights stay constants TensorRT may fold and
fuse. It was ``BuilderFlag.REFIT`` (every weight refittable) before; that flag is not used because
TensorRT documents that a refit with ``kREFIT`` can drop GEMM biases. A model with no record
(nothing compiled with ``--strategy fuse``) is refused with ``--refit``. ``zcompile swap --format
trt`` refits a copy of ``model.plan`` with the swapped tensors (:func:`refit_plan`: ``trt.Refitter``,
``set_named_weights``, ``refit_cuda_engine``); ``--max-rank`` keeps their shapes.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from zflora_compile.errors import InputError, TargetError
from zflora_compile.targets.base import Loaded, Shape, Target, check_precision
from zflora_compile.verify import input_specs, symbol_values

PLAN_NAME = "model.plan"
PRECISIONS = ("fp16", "fp32", "bf16")


@dataclasses.dataclass(frozen=True)
class TrtOptions:
    """Engine precision, optimization profile (min / opt / max new and cached tokens), refit, workspace."""

    precision: str = PRECISIONS[0]
    seq_range: tuple[int, int, int] = (1, 128, 512)
    past_range: tuple[int, int, int] = (0, 128, 512)
    refit: bool = False
    workspace_gib: float = 4.0

    def __post_init__(self):
        check_precision("trt", self.precision, PRECISIONS)
        for flag, value in (("--trt-seq", self.seq_range), ("--trt-past", self.past_range)):
            if len(value) != 3 or not 0 <= value[0] <= value[1] <= value[2]:
                raise InputError(f"{flag}: expected 0 <= MIN <= OPT <= MAX, got {value}")
        if not self.workspace_gib > 0 or self.workspace_gib == float("inf"):
            raise InputError(f"--workspace-gib must be positive, got {self.workspace_gib:g}")


def _triple(text: str) -> tuple[int, int, int]:
    """``MIN,OPT,MAX`` for argparse."""
    try:
        low, opt, high = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX integers, got '{text}'") from None
    if not 0 <= low <= opt <= high:
        raise argparse.ArgumentTypeError(f"expected 0 <= MIN <= OPT <= MAX, got '{text}'")
    return (low, opt, high)


class TrtTarget(Target):
    name = "trt"
    summary = "TensorRT"
    Options = TrtOptions
    precisions = PRECISIONS
    install_hint = (
        "Install it on a machine with an NVIDIA GPU and CUDA: pip install 'zflora-compile[trt]' "
        "(or pip install tensorrt --extra-index-url https://pypi.nvidia.com, plus a CUDA build of torch)."
    )
    artifact_tolerance = (2e-2, 2e-2)  # fp16 / TF32 kernels vs fp32 on CPU
    artifact_tolerance_why = "TensorRT's fp16 / TF32 kernels vs ONNX Runtime CPU"

    @classmethod
    def missing_dependency(cls) -> str | None:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return "the tensorrt Python package (TensorRT builder and ONNX parser) is not installed"
        try:
            import torch
        except ImportError:
            return "torch (used for CUDA buffers and events) is not installed"
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible to torch"
        return None

    @classmethod
    def add_arguments(cls, group) -> None:
        defaults = TrtOptions()
        group.add_argument("--trt-seq", type=_triple, default=defaults.seq_range, metavar="MIN,OPT,MAX", help="trt: optimization profile of new tokens (default 1,128,512)")
        group.add_argument("--trt-past", type=_triple, default=defaults.past_range, metavar="MIN,OPT,MAX", help="trt: optimization profile of cached tokens (default 0,128,512)")
        group.add_argument("--refit", action="store_true", help="trt: build a refittable engine")
        group.add_argument("--workspace-gib", type=float, default=defaults.workspace_gib, help="trt: builder workspace limit (default %(default)s GiB)")

    @classmethod
    def options_from_args(cls, args) -> TrtOptions:
        return TrtOptions(precision=args.precision or PRECISIONS[0], seq_range=args.trt_seq, past_range=args.trt_past, refit=args.refit, workspace_gib=args.workspace_gib)

    def build(self, model_path: Path, out_dir: Path, shapes: list[Shape]) -> dict:
        self.check_available()
        import tensorrt as trt

        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(model_path)):
            raise TargetError(f"{model_path}: TensorRT's ONNX parser failed: {_parser_errors(parser)}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.options.workspace_gib * (1 << 30)))
        if self.options.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif self.options.precision == "bf16":
            config.set_flag(trt.BuilderFlag.BF16)
        refittable = []
        if self.options.refit:
            refittable = mark_refittable(network, model_path)
            config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
        profile = builder.create_optimization_profile()
        ranges = self.profile_shapes(model_path)
        for index in range(network.num_inputs):
            name = network.get_input(index).name
            low, opt, high = ranges[name]
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise TargetError(f"{model_path}: TensorRT could not build an engine (see the TensorRT log above)")
        (out_dir / PLAN_NAME).write_bytes(bytes(plan))
        return {
            "name": self.name,
            "runtime": f"tensorrt {trt.__version__}",
            "precision": self.options.precision,
            "refittable": self.options.refit,
            **({"refittable_weights": refittable} if self.options.refit else {}),
            "profile": {name: {"min": list(r[0]), "opt": list(r[1]), "max": list(r[2])} for name, r in ranges.items()},
            "artifacts": [PLAN_NAME],
        }

    def profile_shapes(self, model_path: Path) -> dict[str, tuple[tuple[int, ...], ...]]:
        """(min, opt, max) shape of every input, from the seq and past ranges."""
        specs = input_specs(model_path)
        per_point = []
        for seq, past in zip(self.options.seq_range, self.options.past_range):
            symbols = symbol_values(specs, seq=seq, past=past)
            per_point.append({s.name: tuple(d if isinstance(d, int) else symbols.get(str(d), 1) for d in s.shape) for s in specs})
        return {s.name: tuple(point[s.name] for point in per_point) for s in specs}

    def load(self, out_dir: Path, model_path: Path, shape: Shape, *, for_check: bool = False) -> Loaded:
        self.check_available()
        import tensorrt as trt
        import torch

        logger = trt.Logger(trt.Logger.WARNING)
        engine = trt.Runtime(logger).deserialize_cuda_engine((out_dir / PLAN_NAME).read_bytes())
        if engine is None:
            raise TargetError(f"{out_dir / PLAN_NAME}: TensorRT cannot deserialize the engine")
        context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        stream = torch.cuda.Stream()
        bound: dict = {"key": None, "outputs": {}}

        def bind(feeds: dict[str, np.ndarray]) -> None:
            key = tuple((k, id(v)) for k, v in sorted(feeds.items()))
            if bound["key"] == key:
                return
            keep = {}
            for name in inputs:
                array = np.ascontiguousarray(feeds[name].astype(trt.nptype(engine.get_tensor_dtype(name)), copy=False))
                tensor = torch.from_numpy(array).cuda()
                keep[name] = tensor
                context.set_input_shape(name, tuple(array.shape))
                context.set_tensor_address(name, tensor.data_ptr())
            for name in outputs:
                dtype = torch.from_numpy(np.zeros(0, trt.nptype(engine.get_tensor_dtype(name)))).dtype
                tensor = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
                keep[name] = tensor
                context.set_tensor_address(name, tensor.data_ptr())
            bound.update(key=key, tensors=keep)

        def execute() -> None:
            if not context.execute_async_v3(stream.cuda_stream):
                raise TargetError(f"{out_dir / PLAN_NAME}: TensorRT execution failed")

        def run(feeds):
            bind(feeds)
            execute()
            stream.synchronize()
            return [bound["tensors"][name].cpu().numpy() for name in outputs]

        def timed(feeds) -> float:
            bind(feeds)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            execute()
            end.record(stream)
            end.synchronize()
            return float(start.elapsed_time(end))

        return Loaded(run=run, output_names=outputs, timed=timed, description=f"TensorRT engine {PLAN_NAME} on {torch.cuda.get_device_name()}")


def refittable_names(model_path: Path) -> list[str]:
    """The adapter-owned tensors the model's record names (what a swap changes)."""
    from zflora_compile import metadata
    from zflora_compile.deploy.onnx_adapter import owned_names

    record = metadata.read_file(model_path)
    if not record or record.get("unreadable"):
        return []
    return [name for entry in metadata.active(record) for name in owned_names(entry)]


def mark_refittable(network, model_path: Path) -> list[str]:
    """``network.mark_weights_refittable`` for each adapter-owned weight (REFIT_INDIVIDUAL builds)."""
    names = refittable_names(model_path)
    if not names:
        raise InputError(f"--refit: {model_path} records no adapter weights to refit (compile it with --strategy fuse; the base weights are never refitted)")
    for name in names:
        if not network.mark_weights_refittable(name):
            raise TargetError(f"--refit: TensorRT's network has no weights named '{name}' (the ONNX parser folded or renamed the initializer)")
    return names


def refit_plan(plan_path: Path, arrays: dict[str, np.ndarray], out_path: Path) -> list[str]:
    """Refit the engine at ``plan_path`` with ``arrays`` (name -> new value, same shapes) and write it
    to ``out_path``; returns the names refitted. Every weight marked refittable must be given."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(plan_path).read_bytes())
    if engine is None:
        raise TargetError(f"{plan_path}: TensorRT cannot deserialize the engine")
    refitter = trt.Refitter(engine, logger)
    keep = []  # TensorRT reads the host arrays during refit_cuda_engine
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        keep.append(array)
        if not refitter.set_named_weights(name, trt.Weights(array)):
            raise TargetError(f"{plan_path}: the engine has no refittable weights named '{name}' (build it with --refit)")
    missing = refitter.get_missing_weights()
    if missing:
        raise TargetError(f"{plan_path}: refit needs weights the swap did not give: {', '.join(missing[:5])}")
    if not refitter.refit_cuda_engine():
        raise TargetError(f"{plan_path}: TensorRT's refit failed (see the TensorRT log above)")
    Path(out_path).write_bytes(bytes(engine.serialize()))
    del keep
    return list(arrays)


def _parser_errors(parser) -> str:
    messages = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        where = error.node_name() or (f"node #{error.node()}" if error.node() >= 0 else "graph")
        messages.append(f"{where} ({error.node_operator() or '?'}): {error.desc()}")
    return "; ".join(messages[:5]) + (f"; and {len(messages) - 5} more" if len(messages) > 5 else "")
