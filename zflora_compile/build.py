"""The file pipeline: load, compile in memory, write, build and check the target artifact, gate.

Nothing reaches the output directory until every step has passed: the model is written into a
temporary sibling directory that is renamed into place at the end.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

import onnx_ir as ir

from zflora_compile import genai
from zflora_compile.errors import DependencyError, EnvironmentProblem, InputError, LatencyGateError, LatencyInconclusive, VerificationError, ZcompileError, first_line
from zflora_compile.gate import Variant, gate_failure_message, gate_inconclusive_message, phase_shapes, run_gate
from zflora_compile.memory import check_fits
from zflora_compile.model_io import has_external_data, initializer_bytes, load_model, resolve_model_path, save_model
from zflora_compile.options import CompileOptions
from zflora_compile.pipeline import compile_model, compile_onnx
from zflora_compile.progress import TimedSteps
from zflora_compile.report import InputInfo, Report, file_digest, report_text
from zflora_compile.targets import Shape, Target, get_target
from zflora_compile.targets.base import CannotRunHere
from zflora_compile.targets.check import check_artifact
from zflora_compile.targets.ort import cpu_kernel_gap, holds_bfloat16
from zflora_compile.verify import choose_mode, token_vocab

MODEL_NAME = "model.onnx"
LOCK_NAME = ".zcompile.lock"


def default_output_dir(model_path: Path, strategy: str) -> Path:
    """``<stem>_<strategy>`` beside the model: deterministic, so pipelines can find it."""
    return model_path.with_name(f"{model_path.stem}_{strategy}")


def compile_file(
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    options: CompileOptions | None = None,
    *,
    progress=None,
) -> dict:
    """Compile ``input_path`` into ``output_dir`` (``model.onnx``, the target's artifact, ``report.json``).

    Returns the report (JSON). Raises :class:`ZcompileError` subclasses for bad input, a refusing
    environment (full disk, read-only filesystem: :class:`EnvironmentProblem`) or a missing target
    runtime (exit 2), failed verification and a failed latency gate (exit 1), with the report
    attached as ``error.report``; any other exception (a bug, an :class:`Interrupted`) carries the
    report too. A failed gate still writes the complete output directory (its report says
    ``latency_gate_failed``, exit 1, or ``latency_gate_inconclusive``, exit 4); every other failure writes nothing and leaves nothing behind.

    The output directory is claimed exclusively for the whole run (a lock file inside it, held
    with ``flock``), so two runs on one directory cannot both write it; a symlinked output
    directory is written through (the link stays, its target is replaced).
    """
    options = options or CompileOptions()
    input_path, output_dir = Path(input_path), Path(output_dir)
    report = Report(options.to_json(), InputInfo(path=str(input_path)))
    steps = TimedSteps(progress, report.timings_s)
    claim: _OutputClaim | None = None
    staging: Path | None = None
    where = [output_dir, "checking the output directory"]  # the path and step an OSError is blamed on
    try:
        target = get_target(options.target, options.target_options)
        if "onnx" not in target.accepts:
            raise InputError(f"target '{target.name}' does not build from an ONNX file")
        destination = _destination(output_dir)
        _check_output_dir(destination, input_path, options.force, shown=output_dir)
        claim = _OutputClaim(destination, options.force, shown=output_dir)
        claim.acquire()
        where[:] = [input_path, "reading the model"]
        with steps.step("load"):
            model = load_model(input_path)
            source = resolve_model_path(input_path)
            report.input.sha256 = file_digest(source)
            report.input.external_data = has_external_data(model)
        vocab = token_vocab(model)
        onnx_source = source if source.suffix == ".onnx" else None
        chosen = choose_mode(options.verify_mode, initializer_bytes(model))  # verification's and the artifact check's
        mode = chosen[0] if options.verify else "off"
        report.memory = check_fits(model, verify=mode, target=target.name, check_latency=options.check_latency, limit_gib=options.memory_limit_gib)
        if options.verify and onnx_source is not None and holds_bfloat16(model):
            gap = cpu_kernel_gap(onnx_source, model)
            if gap:  # before compiling: verification would fail on it after the work
                raise DependencyError(
                    f"{input_path}: this model cannot run on this machine, so it cannot be verified: {gap}; "
                    "verification runs it in ONNX Runtime on CPU; --no-verify compiles it without running it"
                )
        where[:] = [destination.parent, "writing the output"]
        staging = _make_staging(destination)

        def write(rewritten: ir.Model) -> list[Path]:
            """The rewritten model, written once, into the staging directory (verified there)."""
            where[:] = [staging, "writing the output"]
            written = _write_model(rewritten, staging, report, options, steps)
            where[:] = [Path(tempfile.gettempdir()), "compiling in the temporary directory"]
            return written

        where[:] = [Path(tempfile.gettempdir()), "compiling in the temporary directory"]
        model = compile_onnx(report, model, options, steps, source=onnx_source, write=write)
        where[:] = [staging, "writing the output"]
        try:
            shapes = _build(model, staging, report, options, steps, target, vocab, chosen)
        except VerificationError:
            if not options.verify:  # nothing loaded the input: a model ONNX Runtime cannot load is the input's fault
                _refuse_unloadable_input(source)
            raise
        report.output.files += genai.carry_over(source, staging, MODEL_NAME)  # a GenAI folder stays a GenAI folder
        report.succeed()
        if report.target.get("not_run"):
            report.message += f"; not run on this machine ({report.target['cannot_run_here']}): {', '.join(report.target['not_run'])}"
        if options.check_latency:
            where[:] = [Path(tempfile.gettempdir()), "building the latency gate's variants"]
            _latency_gate(report, staging, input_path, target, shapes, options, vocab, steps)
        where[:] = [staging, "writing the output"]
        report.output.dir = str(output_dir)
        report.stop_clock()
        (staging / "report.json").write_text(report_text(report.to_json()))
        where[:] = [destination, "moving the output into place"]
        claim.commit(staging)
        staging = None
        if report.status == "latency_gate_failed":
            raise LatencyGateError(report.message)
        if report.status == "latency_gate_inconclusive":
            raise LatencyInconclusive(report.message)
        return report.to_json()
    except ZcompileError as error:
        if staging is not None:  # the hidden staging directory is gone: name the output directory
            error.args = (_shown(str(error), staging, output_dir),)
        report.fail(error)
        error.report = report.to_json()
        raise error from None
    except OSError as error:
        problem = EnvironmentProblem.from_os_error(error, where[0], where[1])
        if staging is not None:
            problem = EnvironmentProblem(_shown(str(problem), staging, output_dir))
        report.fail(problem)
        problem.report = report.to_json()
        raise problem from None
    except BaseException as error:  # a bug (exit 3) or an interruption: the report goes with it
        report.fail_other(error)
        try:
            error.report = report.to_json()
        except Exception:  # noqa: BLE001 - some exception types take no attributes
            pass
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if claim is not None:
            claim.release()


def _shown(message: str, staging: Path, output_dir: Path) -> str:
    """A message about the hidden staging directory, naming the output directory instead."""
    return message.replace(str(staging), str(output_dir))


def _write_model(model: ir.Model, staging: Path, report: Report, options: CompileOptions, steps: TimedSteps) -> list[Path]:
    """Write ``model.onnx`` (external data beside it when the input had it, or over ~2 GB) and,
    with ``adapter_inputs``, ONNX Runtime's adapter file; returns the model's files, the model first."""
    with steps.step("write"):
        written = save_model(model, staging / MODEL_NAME, external=True if report.input.external_data else None)
        report.output.files = [p.name for p in written] + ["report.json"]
        if options.adapter_inputs:  # ONNX Runtime's adapter file of the compiled adapter (docs/swap.md)
            from zflora_compile.deploy.onnx_adapter import write_compiled_adapter

            report.output.files += write_compiled_adapter(model, staging)
    return written


def _build(model: ir.Model, staging: Path, report: Report, options: CompileOptions, steps: TimedSteps, target: Target, vocab, chosen: tuple[str, str]) -> list[Shape]:
    """Build the target's artifact beside the written ``model.onnx`` and check it (``chosen``: the
    verification mode and why, decided once on the input's weights); returns the shapes built."""
    model_path = staging / MODEL_NAME
    shapes = phase_shapes(model_path, options.latency, model)
    with steps.step(f"build target {target.name}"):
        try:
            report.target = target.build(model_path, staging, shapes)
        except CannotRunHere as error:
            if options.verify:
                raise
            if options.check_latency:
                raise DependencyError(f"--check-latency runs the model, which cannot run on this machine: {error.reason}") from None
            report.target = _not_built(target, error.reason)
            report.verification = {**(report.verification or {}), "cannot_run_here": error.reason}
            return shapes
    report.output.files += report.target["artifacts"]
    clamped = [s.clamped for s in shapes if s.clamped]
    if clamped:
        report.target["shapes_clamped"] = clamped
    if options.verify:
        with steps.step(f"check the {target.name} artifact against the model"):
            check = check_artifact(target, staging, model_path, shapes, vocab, options.seed, model, mode=chosen[0], mode_reason=chosen[1])
            report.target["check"] = check
            if not check["passed"]:
                raise VerificationError(f"the {target.name} artifact does not match model.onnx: {check['failure']}")
    return shapes


def _refuse_unloadable_input(source: Path) -> None:
    """``InputError`` (exit 2) when ONNX Runtime cannot load the *input* either (with ``--no-verify``
    the failure surfaces first on the written model, and would be blamed on the rewrite)."""
    if source.suffix != ".onnx":
        return
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    try:
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001
        raise InputError(f"{source}: ONNX Runtime cannot load the input model ({first_line(error)})") from None


def _not_built(target: Target, reason: str) -> dict:
    """The report's ``target`` section of a model the target's runtime cannot run here (``--no-verify``):
    no artifact; what did not run and why."""
    return {
        "name": target.name,
        "artifacts": [],
        "cannot_run_here": reason,
        "not_run": {
            "verification": "--no-verify; it could not run here either",
            f"build target {target.name}": "the runtime has no kernel for the model's ops here; model.onnx is written",
            f"check the {target.name} artifact": "no artifact; --no-verify",
        },
    }


def _latency_gate(report: Report, staging: Path, input_path: Path, target: Target, shapes: list[Shape], options: CompileOptions, vocab, steps: TimedSteps) -> None:
    from zflora_compile.plot import latency_chart

    with steps.step("latency gate"), tempfile.TemporaryDirectory(prefix="zflora-gate-") as tmp:
        variants = _gate_variants(input_path, Path(tmp), target, shapes, options, steps.progress)
        variants["fused"] = Variant(staging, staging / MODEL_NAME)
        latency = run_gate(target, variants, shapes, options.latency, vocab, seed=options.seed, progress=steps.progress)
    latency_chart(latency, staging / "latency.png")
    report.output.files.append("latency.png")
    verdict = latency["verdict"]
    report.record_gate(latency, gate_failure_message(latency) if verdict == "regression" else None, gate_inconclusive_message(latency) if verdict == "inconclusive" else None)


def _gate_variants(input_path: Path, tmp: Path, target: Target, shapes: list[Shape], options: CompileOptions, progress) -> dict[str, Variant]:
    """``base`` (the input with every adapter stripped, verified) and ``unfused`` (the input), built for ``target``."""
    original = load_model(input_path)
    unfused = _write_variant(original, tmp / "unfused")  # before the strip rewrites `original` in place
    with progress.step(f"latency gate: base model (strip) for {target.name}"):
        try:
            stripped, _ = compile_model(original, dataclasses.replace(options, strategy="strip", check_latency=False))
        except InputError as error:  # zFLoRA: the base model cannot be derived from the adapted one
            raise InputError(f"--check-latency needs the base model, derived by stripping the adapters: {error}") from None
        base = _write_variant(stripped, tmp / "base")
        target.build(base.model, base.dir, shapes)
    with progress.step(f"latency gate: unfused model for {target.name}"):
        target.build(unfused.model, unfused.dir, shapes)
    return {"base": base, "unfused": unfused}


def _write_variant(model: ir.Model, directory: Path) -> Variant:
    directory.mkdir()
    save_model(model, directory / MODEL_NAME, external=True if has_external_data(model) else None)
    return Variant(directory, directory / MODEL_NAME)


def _destination(output_dir: Path) -> Path:
    """Where the output really goes: a symlinked ``-o`` (or one under a symlinked directory) is
    written through, so the link stays and its target is replaced."""
    return Path(os.path.realpath(output_dir))


def _contains(directory: Path, path: Path) -> bool:
    return path == directory or directory in path.parents


def _check_output_dir(destination: Path, input_path: Path, force: bool, *, shown: Path | None = None) -> None:
    """Refuse an output directory that holds the input (or is above it), one that is not a
    directory, and a non-empty one without ``force``."""
    shown = shown or destination
    real_input = Path(os.path.realpath(input_path))
    if _contains(destination, real_input):
        raise InputError(f"{shown}: output directory contains the input {input_path} (it would be replaced); choose another")
    if destination.exists() and not destination.is_dir():
        raise InputError(f"{shown}: exists and is not a directory")
    if destination.is_dir() and _lock_held(destination / LOCK_NAME):
        raise InputError(f"{shown}: another zcompile run is writing this output directory")
    if destination.is_dir() and _entries(destination) and not force:
        raise InputError(f"{shown}: output directory exists and is not empty (use --force to replace it)")


def _entries(directory: Path) -> list[str]:
    """The directory's entries, less a lock file no run holds any more (a killed run's)."""
    return [name for name in os.listdir(directory) if not (name == LOCK_NAME and not _lock_held(directory / name))]


def _lock_held(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _make_parents(path: Path) -> None:
    """``path``'s missing parents; a regular file in the way is ENOTDIR (naming that file)."""
    existing = next((p for p in path.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
    path.parent.mkdir(parents=True, exist_ok=True)


def _make_staging(destination: Path) -> Path:
    """A fresh hidden sibling of the output directory, with the permissions the umask gives."""
    _make_parents(destination)
    for _ in range(100):
        staging = destination.parent / f".{destination.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            os.mkdir(staging, 0o777)
        except FileExistsError:
            continue
        return staging
    raise FileExistsError(errno.EEXIST, "cannot create a unique staging directory", str(destination.parent))


class _OutputClaim:
    """Exclusive ownership of the output directory for one run.

    ``acquire`` creates the directory when it is missing and takes an ``flock`` on a lock file
    inside it (released by the kernel if the process dies); a second run finds the lock held and
    fails with exit 2. ``commit`` swaps the finished staging directory in atomically
    (``renameat2(RENAME_EXCHANGE)`` where the kernel has it), ``release`` removes the lock and a
    directory this run created but did not fill.
    """

    def __init__(self, destination: Path, force: bool, *, shown: Path):
        self.destination, self.force, self.shown = destination, force, shown
        self.fd: int | None = None
        self.created = False
        self.committed = False

    def _busy(self) -> InputError:
        return InputError(f"{self.shown}: another zcompile run is writing this output directory")

    def acquire(self) -> None:
        _make_parents(self.destination)
        try:
            os.mkdir(self.destination, 0o777)
            self.created = True
        except FileExistsError:
            if not self.destination.is_dir():
                raise InputError(f"{self.shown}: exists and is not a directory") from None
        lock = self.destination / LOCK_NAME
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(lock).st_ino:  # the lock file was replaced meanwhile
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            self.created = False
            raise self._busy() from None
        self.fd = fd
        if _entries(self.destination) != [LOCK_NAME] and not self.force:  # filled since the first look
            self.release()
            raise InputError(f"{self.shown}: output directory exists and is not empty (use --force to replace it)")

    def commit(self, staging: Path) -> None:
        """Swap ``staging`` in; the old directory (with the lock file) is removed after."""
        if _exchange(staging, self.destination):
            old = staging
        else:  # no atomic exchange here: rename the old one aside, then the new one in
            old = self.destination.with_name(f".{self.destination.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            os.replace(self.destination, old)
            os.replace(staging, self.destination)
        self.committed = True
        shutil.rmtree(old, ignore_errors=True)

    def release(self) -> None:
        if self.fd is None:
            return
        if not self.committed:
            lock = self.destination / LOCK_NAME
            try:
                if os.stat(lock).st_ino == os.fstat(self.fd).st_ino:
                    os.unlink(lock)
            except OSError:
                pass
            if self.created:
                try:
                    os.rmdir(self.destination)
                except OSError:
                    pass
        os.close(self.fd)
        self.fd = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two directories (Linux ``renameat2``); False where unsupported."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))
