"""onnxruntime-genai model folders in, runnable onnxruntime-genai model folders out.

The builder (``python -m onnxruntime_genai.models.builder``) writes a folder: the decoder
(``genai_config.json`` names its file, ``model.onnx`` by default, weights beside it), the
tokenizer files and the generation settings. ``zcompile <folder>`` (or the decoder file inside it)
compiles the decoder; the output directory then carries every other file of the folder over, with
``genai_config.json``'s decoder file name pointing at the compiled ``model.onnx``, so that
``onnxruntime_genai.Model(output_dir)`` loads and generates. Other ONNX files the config names
(vision or embedding models of multi-model folders) are copied unchanged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from zflora_compile.errors import InputError

CONFIG_NAME = "genai_config.json"


def read_config(folder: Path) -> dict | None:
    """``folder``'s ``genai_config.json``, or None when there is none."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not a readable onnxruntime-genai config ({error})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise InputError(f"{path}: has no 'model' section; not an onnxruntime-genai config")
    return config


def decoder_file(folder: Path) -> Path | None:
    """The decoder model a GenAI folder's config names, or None when ``folder`` is no GenAI folder."""
    config = read_config(folder)
    if config is None:
        return None
    name = (config["model"].get("decoder") or {}).get("filename")
    if not name:
        raise InputError(f"{Path(folder) / CONFIG_NAME}: names no decoder file (model.decoder.filename)")
    return Path(folder) / name


def source_folder(model_path: Path) -> Path | None:
    """The GenAI folder ``model_path`` is the decoder of (its config names this file), else None."""
    model_path = Path(model_path)
    decoder = decoder_file(model_path.parent) if (model_path.parent / CONFIG_NAME).is_file() else None
    return model_path.parent if decoder is not None and decoder.name == model_path.name else None


def _external_files(model_path: Path) -> set[str]:
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    names = set()
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                names.add(Path(entry.value).parts[0])
    return names


def carry_over(model_path: Path, out_dir: Path, model_name: str) -> list[str]:
    """Copy the GenAI folder of ``model_path`` (the compiled decoder) into ``out_dir``, all but the
    decoder and its weight files, and point the config's decoder at ``model_name``. Returns the
    names written (``[]`` when ``model_path`` is no GenAI decoder)."""
    folder = source_folder(model_path)
    if folder is None:
        return []
    skipped = {Path(model_path).name} | _external_files(model_path)
    written = []
    for entry in sorted(folder.iterdir()):
        if entry.name in skipped or entry.name == CONFIG_NAME or (Path(out_dir) / entry.name).exists():
            continue
        if entry.is_dir():
            shutil.copytree(entry, Path(out_dir) / entry.name)
        elif entry.is_file():
            shutil.copy2(entry, Path(out_dir) / entry.name)
        else:
            continue
        written.append(entry.name)
    config = read_config(folder)
    config["model"]["decoder"]["filename"] = model_name
    (Path(out_dir) / CONFIG_NAME).write_text(json.dumps(config, indent=4) + "\n")
    return sorted(written + [CONFIG_NAME])
