"""Loading, validating and writing ONNX models, with one-line errors for bad input."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from zflora_compile.errors import InputError, first_line

MIN_OPSET = 13  # Split with a `split` input, Unsqueeze/Squeeze with `axes` inputs
MAX_OPSET = onnx.defs.onnx_opset_version()
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes: protobuf's 2 GB limit, with headroom
DATA_SUFFIX = ".data"
INLINE_BYTES = 256  # tensors up to this size stay in the .onnx file (onnx-ir's default)
RELEASE_EVERY = 256 * 1024**2  # bytes written between two unmappings of the weights read (save_model)
_LOADED_WEIGHTS = "zflora.loaded_external_weights"  # model.meta key: the external tensors as loaded


EXPORTED_PROGRAM_SUFFIX = ".pt2"
DIRECTORY_MODEL_NAME = "model.onnx"


def resolve_model_path(path: str | os.PathLike) -> Path:
    """The ONNX file a model path names: ``path`` itself; for a directory, the decoder its
    ``genai_config.json`` names (an onnxruntime-genai folder), else ``<dir>/model.onnx`` (or the
    directory's only ``.onnx`` file)."""
    path = Path(path)
    if not path.is_dir():
        return path
    from zflora_compile.genai import decoder_file

    decoder = decoder_file(path)  # an onnxruntime-genai folder: the decoder its config names
    if decoder is not None:
        if not decoder.is_file():
            raise InputError(f"{path}: genai_config.json names the decoder '{decoder.name}', which is not in the folder")
        return decoder
    candidate = path / DIRECTORY_MODEL_NAME
    if candidate.is_file():
        return candidate
    found = sorted(p for p in path.glob("*.onnx") if p.is_file())
    if len(found) == 1:
        return found[0]
    what = f"{len(found)} .onnx files" if found else "no .onnx file"
    raise InputError(f"{path}: is a directory with {what} and no {DIRECTORY_MODEL_NAME}; name the model file")


def export_program_to_onnx(path: str | os.PathLike, onnx_path: str | os.PathLike) -> Path:
    """Export a saved ``torch.export`` program (``.pt2``) to ONNX at ``onnx_path`` (external data
    beside it when over ~2 GB). Needs torch (the optional torch extra)."""
    path, onnx_path = Path(path), Path(onnx_path)
    try:
        import torch
    except ImportError:
        from zflora_compile.errors import DependencyError

        raise DependencyError(f"{path}: reading a .pt2 ExportedProgram needs torch (pip install zflora-compile[torch])") from None
    try:
        program = torch.export.load(str(path))
    except Exception as error:  # noqa: BLE001 - any load failure is bad input
        raise InputError(f"{path}: not a readable torch.export program ({first_line(error)})") from None
    try:
        exported = torch.onnx.export(program, dynamo=True, verbose=False)
    except Exception as error:  # noqa: BLE001
        raise InputError(f"{path}: torch.onnx.export of the program failed ({first_line(error)})") from None
    weight_bytes = sum(t.numel() * t.element_size() for t in program.state_dict.values())
    exported.save(str(onnx_path), external_data=weight_bytes > EXTERNAL_DATA_THRESHOLD)
    return onnx_path


def _load_exported_program(path: Path) -> ir.Model:
    """A ``.pt2`` program exported to ONNX in a temporary directory, loaded fully into memory."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="zflora-pt2-") as tmp:
        onnx_path = export_program_to_onnx(path, Path(tmp) / "model.onnx")
        model = load_model(onnx_path)
        for value in model.graph.initializers.values():  # the temp files go away with the directory
            if value.const_value is not None:
                value.const_value = ir.tensor(value.const_value.numpy(), name=value.name)
    return model


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load ``path`` lazily (external data stays on disk) and check it is usable.

    ``path`` is an ``.onnx`` file, a directory holding ``model.onnx`` (or exactly one ``.onnx``
    file), or a ``.pt2`` file written by ``torch.export.save`` (exported to ONNX on the fly).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        path = resolve_model_path(path)
    if path.suffix == EXPORTED_PROGRAM_SUFFIX and path.is_file() and path.stat().st_size > 0:
        return _load_exported_program(path)
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file, not an ONNX model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not a readable ONNX model (protobuf parse failed: {error})") from None
    if proto.ir_version == 0 or not proto.HasField("graph") or not proto.graph.node:
        raise InputError(f"{path}: not an ONNX model (no ir_version or empty graph; truncated file?)")
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as error:  # noqa: BLE001 - any deserialisation failure is bad input
        raise InputError(f"{path}: malformed ONNX model ({error})") from None
    ir.external_data.set_base_dir(model.graph, path.parent)
    check_opset(model, path)
    check_external_data(model, path)
    # every external weight as loaded: a rewrite may drop one from the graph while a computed
    # tensor still reads it, and it must still be unmapped (release_weights)
    model.meta[_LOADED_WEIGHTS] = [v.const_value for graph in (model.graph, *model.graph.subgraphs()) for v in graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]
    return model


def check_opset(model: ir.Model, path: Path | str) -> None:
    version = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if version is None:
        raise InputError(f"{path}: model imports no ai.onnx opset")
    if not MIN_OPSET <= version <= MAX_OPSET:
        raise InputError(f"{path}: unsupported opset {version} (zcompile supports ai.onnx opsets {MIN_OPSET} to {MAX_OPSET})")


def check_external_data(model: ir.Model, path: Path | str) -> None:
    """Every external tensor's file exists and is long enough for its offset and length."""
    sizes: dict[str, int] = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        data_path = Path(tensor.path)
        key = str(data_path)
        if key not in sizes:
            if not data_path.is_file():
                raise InputError(f"{path}: external data file '{tensor.location}' for tensor '{value.name}' is missing")
            sizes[key] = data_path.stat().st_size
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if end > sizes[key]:
            raise InputError(f"{path}: external data file '{tensor.location}' is too short for tensor '{value.name}' (needs {end} bytes, has {sizes[key]})")


def has_external_data(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def release_weights(model: ir.Model) -> int:
    """Unmap every external weight of ``model`` (all graphs) that nothing holds a view of: a read
    weight stays memory-mapped, and its pages count in the process's resident memory until then.
    Called between steps, it bounds the resident weights to what one step reads; a weight read
    again is mapped again. Returns how many were released."""
    tensors = {id(t): t for t in model.meta.get(_LOADED_WEIGHTS, [])}  # also those a rewrite took out of the graph
    for graph in (model.graph, *model.graph.subgraphs()):
        tensors.update((id(v.const_value), v.const_value) for v in graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor))
    released = 0
    for tensor in tensors.values():
        if tensor.raw is None:
            continue
        try:
            tensor.release()
        except BufferError:  # an array still views the mapping: it stays until that goes
            continue
        released += 1
    return released


def initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_model(model: ir.Model, path: Path, *, external: bool | None = None, progress=None) -> list[Path]:
    """Write ``model`` to ``path`` (external data beside it when asked or when over ~2 GB).

    External data is streamed by onnx-ir one tensor at a time: an untouched weight is copied from
    its file in the kernel (``copy_file_range``, no Python buffer), a computed one is materialised
    alone. The weights computing a tensor read stay mapped until released: every
    :data:`RELEASE_EVERY` bytes written they are (:func:`release_weights`), so the resident weights
    stay bounded by what the last few tensors read. ``progress`` (a :mod:`~zflora_compile.progress`
    display) shows one step per tensor. A weight computed as it is written may refuse the input
    (``InputError``: a non-finite merged weight); onnx-ir's serialiser wraps it, and it is unwrapped."""
    try:
        return _save_model(model, path, external=external, progress=progress)
    except Exception as error:
        cause = error
        while cause is not None and not isinstance(cause, InputError):
            cause = cause.__cause__ or cause.__context__
        if cause is None or cause is error:
            raise
        raise cause from None


def _save_model(model: ir.Model, path: Path, *, external: bool | None, progress) -> list[Path]:
    if external is None:
        external = initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if not external:
        ir.save(model, path)
        return [path]
    data_name = path.name + DATA_SUFFIX
    written = [0]

    def wrote(tensor, info, advance=lambda: None) -> None:
        advance()
        written[0] += tensor.nbytes
        if written[0] >= RELEASE_EVERY:
            written[0] = 0
            release_weights(model)

    if progress is None:
        ir.save(model, path, external_data=data_name, size_threshold_bytes=INLINE_BYTES, callback=wrote)
    else:
        tensors = sum(1 for v in model.graph.initializers.values() if v.const_value is not None and v.const_value.nbytes > INLINE_BYTES)
        with progress.bar(f"writing {data_name}: {tensors} tensors", tensors) as advance:
            ir.save(model, path, external_data=data_name, size_threshold_bytes=INLINE_BYTES, callback=lambda tensor, info: wrote(tensor, info, advance))
    release_weights(model)
    return [path, path.with_name(data_name)]


def to_ir(model) -> ir.Model:
    """``onnx.ModelProto`` or ``onnx_ir.Model`` as an ``onnx_ir.Model`` (a proto is copied)."""
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    raise TypeError(f"expected onnx.ModelProto, onnx_ir.Model or a path, got {type(model).__name__}")
