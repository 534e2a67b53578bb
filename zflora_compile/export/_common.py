"""Shared by the exporters: writing PEFT adapter directories, atomic output folders (reading: :mod:`zflora_compile.peft_format`)."""

from __future__ import annotations

import contextlib
import json
import pathlib
import shutil
import tempfile

from zflora_compile.errors import InputError

from zflora_compile.peft_format import CONFIG_NAME, SAFETENSORS_NAME


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
