"""Shared by the exporters: reading and writing PEFT adapter directories, atomic output folders."""

from __future__ import annotations

import contextlib
import json
import pathlib
import shutil
import tempfile

from zflora_compile.errors import InputError

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."


def read_peft_adapter(directory) -> tuple[dict, dict, pathlib.Path]:
    """``(adapter_config.json as a dict, {key: tensor}, weights file)`` of a PEFT adapter directory.

    Reads ``adapter_model.safetensors``, else ``adapter_model.bin`` (``torch.load(weights_only=True)``).
    """
    import torch
    from safetensors.torch import load_file

    directory = pathlib.Path(directory)
    config_path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise InputError(f"{directory}: not a directory (expected a PEFT adapter directory)")
    if not config_path.is_file():
        raise InputError(f"{config_path}: missing (not a PEFT adapter directory)")
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise InputError(f"{config_path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise InputError(f"{config_path}: expected a JSON object")
    weights = directory / SAFETENSORS_NAME
    try:
        if weights.is_file():
            tensors = load_file(str(weights))
        elif (directory / BIN_NAME).is_file():
            weights = directory / BIN_NAME
            tensors = torch.load(str(weights), map_location="cpu", weights_only=True)
        else:
            raise InputError(f"{directory}: no {SAFETENSORS_NAME} or {BIN_NAME}")
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - a corrupt file: one line naming it
        raise InputError(f"{weights}: cannot read the adapter weights ({type(error).__name__}: {error})") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise InputError(f"{weights}: expected a flat dict of tensors")
    return config, tensors, weights


def write_peft_adapter(directory, config: dict, tensors: dict, extra: dict | None = None) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (+ ``zflora_export.json`` when ``extra``)."""
    from safetensors.torch import save_file

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(directory / SAFETENSORS_NAME), metadata={"format": "pt"})
    if extra is not None:
        write_json(directory / "zflora_export.json", extra)


def write_json(path, data) -> None:
    pathlib.Path(path).write_text(json.dumps(data, indent=2) + "\n")


def module_of(key: str, roles: tuple[str, ...]) -> tuple[str, str, str] | None:
    """Split a PEFT state-dict key into ``(module name without the PEFT prefix, role, tail)``.

    ``base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight`` ->
    ``("model.layers.0.self_attn.q_proj", "lora_B", "weight")``; ``None`` if no role matches.
    """
    parts = key.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in roles:
            module = ".".join(parts[:i])
            return module.removeprefix(PEFT_PREFIX), parts[i], ".".join(parts[i + 1 :])
    return None


@contextlib.contextmanager
def atomic_directory(out, *, force: bool = False):
    """Yield a fresh temp directory next to ``out``; rename it to ``out`` when the block succeeds.

    Nothing is left behind on failure.  ``out`` must not exist unless ``force`` (then it is replaced).
    """
    out = pathlib.Path(out)
    if out.exists() and not force:
        raise InputError(f"{out}: already exists (pass --force to replace it)")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            out.rename(old / "x")
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
