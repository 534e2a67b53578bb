"""Qualcomm NPUs through ONNX Runtime's QNN execution provider (``onnxruntime-qnn``), HTP backend.

The artifact is an offline context binary per input shape: ``model_<shape>_ctx.onnx`` (an
EPContext model) and the ``model_<shape>_ctx_qnn.bin`` it points to, built with CPU fallback
disabled, so a graph that does not run entirely on the NPU is an error naming the nodes that fell
off. HTP graphs have static shapes: each shape (decode: 1 token on a ``past``-token cache;
prefill) is frozen and prepared (:mod:`zflora_compile.targets.prepare_static`, exact rewrites)
before QNN compiles it.

Defaults: fp16 (``enable_htp_fp16_precision=1``), ``soc_model=60``, ``htp_arch=73``
(Snapdragon 8 Gen 3 / HTP v73). ``--precision fp32`` asks HTP for fp32 arithmetic; the HTP
emulator inside the x86_64 wheel (the only backend these CI machines have) computed fp16-level
results in that mode too, so both precisions are compared to ONNX Runtime CPU with fp16
tolerances. Timings taken on the emulator are NOT NPU latencies: they measure an x86 simulation.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
import tempfile
from pathlib import Path

from zflora_compile.errors import InputError, TargetError, first_line
from zflora_compile.model_io import load_model, save_model
from zflora_compile.progress import library_output
from zflora_compile.targets.prepare_static import prepare_static
from zflora_compile.targets.base import Loaded, Shape, Target, check_precision
from zflora_compile.verify import input_specs, symbol_values

EP_NAME = "QNNExecutionProvider"
_registered = False


def _register():
    """Register the plugin EP library with ONNX Runtime once per process; return the EP devices."""
    global _registered
    import onnxruntime as ort
    import onnxruntime_qnn

    if not _registered:
        with library_output():
            ort.register_execution_provider_library(EP_NAME, onnxruntime_qnn.get_library_path())
        _registered = True
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devices:
        raise TargetError("onnxruntime-qnn is installed but registers no QNN device")
    return devices


def artifact_names(shape: Shape) -> tuple[str, str]:
    stem = f"model_{shape.name}_ctx"
    return f"{stem}.onnx", f"{stem}_qnn.bin"


PRECISIONS = ("fp16", "fp32")


@dataclasses.dataclass(frozen=True)
class QnnOptions:
    """HTP arithmetic precision, Qualcomm SoC model id and HTP architecture."""

    precision: str = PRECISIONS[0]
    soc_model: str = "60"
    htp_arch: str = "73"

    def __post_init__(self):
        check_precision("qnn", self.precision, PRECISIONS)
        for flag, value in (("--soc-model", self.soc_model), ("--htp-arch", self.htp_arch)):
            if not str(value).isdigit():
                raise InputError(f"{flag} must be a number (e.g. {QnnOptions.__dataclass_fields__[flag[2:].replace('-', '_')].default}), got '{value}'")


class QnnTarget(Target):
    name = "qnn"
    summary = "Qualcomm HTP via onnxruntime-qnn"
    Options = QnnOptions
    precisions = PRECISIONS
    install_hint = "Install it with: pip install 'zflora-compile[qnn]' (onnxruntime-qnn, Linux x86_64 / Windows ARM64 wheels)."
    artifact_tolerance = (2e-2, 2e-2)  # fp16 arithmetic on HTP vs fp32 on CPU
    artifact_tolerance_why = "fp16 arithmetic on HTP (the emulator reproduces it) vs ONNX Runtime CPU"

    @property
    def emulated(self) -> bool:
        """On x86_64 the HTP backend of the wheel is an emulator."""
        return platform.machine().lower() in ("x86_64", "amd64")

    @classmethod
    def add_arguments(cls, group) -> None:
        group.add_argument("--soc-model", default=QnnOptions.soc_model, help="qnn: Qualcomm SoC model id (default %(default)s: Snapdragon 8 Gen 3)")
        group.add_argument("--htp-arch", default=QnnOptions.htp_arch, help="qnn: HTP architecture (default %(default)s)")

    @classmethod
    def options_from_args(cls, args) -> QnnOptions:
        return QnnOptions(precision=args.precision or PRECISIONS[0], soc_model=args.soc_model, htp_arch=args.htp_arch)

    @classmethod
    def missing_dependency(cls) -> str | None:
        try:
            import onnxruntime as ort
            import onnxruntime_qnn  # noqa: F401
        except ImportError:
            return "onnxruntime-qnn is not installed"
        if not hasattr(ort, "register_execution_provider_library"):
            return f"onnxruntime {ort.__version__} cannot load plugin execution providers (needs >= 1.22)"
        return None

    def _provider_options(self, trace_dir: Path | None = None) -> dict[str, str]:
        options = {
            "backend_type": "htp",
            "enable_htp_fp16_precision": "1" if self.options.precision == "fp16" else "0",
            "soc_model": str(self.options.soc_model),
            "htp_arch": str(self.options.htp_arch),
        }
        if trace_dir is not None:
            options.update({"enable_framework_op_trace": "1", "framework_op_trace_dir": str(trace_dir)})
        return options

    def build(self, model_path: Path, out_dir: Path, shapes: list[Shape]) -> dict:
        self.check_available()
        import onnxruntime as ort

        devices = _register()
        built = []
        specs = input_specs(model_path)
        for shape in shapes:
            ctx_name, bin_name = artifact_names(shape)
            with tempfile.TemporaryDirectory(prefix=".zflora-qnn-", dir=out_dir) as tmp:
                tmp = Path(tmp)
                model = load_model(model_path)
                fired = prepare_static(model, symbol_values(specs, seq=shape.seq, past=shape.past))
                prepared = tmp / "prepared.onnx"
                save_model(model, prepared, external=False)
                trace_dir = tmp / "trace"
                trace_dir.mkdir()
                options = ort.SessionOptions()
                options.log_severity_level = 4
                options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
                options.add_session_config_entry("ep.context_enable", "1")
                options.add_session_config_entry("ep.context_embed_mode", "0")
                options.add_session_config_entry("ep.context_file_path", str(tmp / ctx_name))
                options.add_provider_for_devices(devices, self._provider_options(trace_dir))
                try:
                    with library_output():
                        ort.InferenceSession(str(prepared), sess_options=options)
                except Exception as error:  # noqa: BLE001
                    raise TargetError(_build_failure(model_path, shape, error, trace_dir)) from None
                for name in (ctx_name, bin_name):
                    if not (tmp / name).exists():
                        raise TargetError(f"{model_path}: QNN wrote no {name} for {shape.describe()}")
                    shutil.move(str(tmp / name), out_dir / name)
            built.append({"shape": shape.name, "seq": shape.seq, "past": shape.past, "artifacts": [ctx_name, bin_name], "prepare_rewrites": fired})
        return {
            "name": self.name,
            "runtime": f"onnxruntime {ort.__version__} + onnxruntime-qnn {_qnn_version()}",
            "backend": "htp",
            "precision": self.options.precision,
            "soc_model": str(self.options.soc_model),
            "htp_arch": str(self.options.htp_arch),
            "cpu_fallback": "disabled",
            "artifacts": [name for entry in built for name in entry["artifacts"]],
            "shapes": built,
            **({"note": "on x86_64 the HTP backend is an emulator: its timings are not NPU latencies"} if self.emulated else {}),
        }

    def load(self, out_dir: Path, model_path: Path, shape: Shape, *, for_check: bool = False) -> Loaded:
        self.check_available()
        import onnxruntime as ort

        devices = _register()
        ctx_name, _ = artifact_names(shape)
        options = ort.SessionOptions()
        options.log_severity_level = 4
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        options.add_provider_for_devices(devices, {"backend_type": "htp"})
        try:
            with library_output():
                session = ort.InferenceSession(str(out_dir / ctx_name), sess_options=options)
        except Exception as error:  # noqa: BLE001
            raise TargetError(f"{out_dir / ctx_name}: QNN cannot load the context binary: {first_line(error)}") from None
        session.disable_fallback()
        names = [o.name for o in session.get_outputs()]
        return Loaded(run=lambda feeds: session.run(names, feeds), output_names=names, description=f"QNN HTP context binary {ctx_name}" + (" (emulated on this host)" if self.emulated else ""))


def _qnn_version() -> str:
    try:
        from importlib.metadata import version

        return version("onnxruntime-qnn")
    except Exception:  # noqa: BLE001
        return "unknown"


def _build_failure(model_path: Path, shape: Shape, error: BaseException, trace_dir: Path) -> str:
    """One line naming the nodes that did not go to the NPU (from QNN's op trace), or QNN's error."""
    unsupported = []
    for trace in trace_dir.glob("*.json"):
        try:
            unsupported += json.loads(trace.read_text()).get("unsupported_nodes", [])
        except (OSError, ValueError):
            continue
    if unsupported:
        listed = ", ".join(f"{n.get('node_name')} ({n.get('op_type')}{': ' + n['reason'] if n.get('reason') else ''})" for n in unsupported[:8])
        more = f" and {len(unsupported) - 8} more" if len(unsupported) > 8 else ""
        return f"{model_path}: {len(unsupported)} node(s) cannot run on the QNN HTP backend for {shape.describe()} and CPU fallback is disabled: {listed}{more}"
    return f"{model_path}: QNN HTP could not compile the graph for {shape.describe()}: {first_line(error)}"
