"""Save an attached adapter (safetensors + JSON) and load it back onto a fresh base model."""

from __future__ import annotations

import json
import pathlib

import torch
from safetensors.torch import load_file, save_file

from zflora_compile.adapters.attach import adapter_state_dict, attach_adapters, get_adapter_state
from zflora_compile.adapters.config import AdapterConfig, base_config_fields, base_config_hash

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "zflora-compile-adapter"
FORMAT_VERSION = 1


class BaseModelMismatchError(ValueError):
    """The adapter was trained on a base model with a different config."""


def save_adapters(model, directory) -> pathlib.Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``directory``; returns it.

    The JSON names the family, rank, alpha, scale, target blocks, layers, dtype, and the
    base model's type, architecture fields and their sha256 (``base_config_hash``).
    """
    state = get_adapter_state(model)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: param.detach().contiguous().cpu() for name, param in adapter_state_dict(model).items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "family": state.config.family})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **state.config.to_dict(),
        "scale": state.config.scale,
        "base_model_type": state.base_config.get("model_type"),
        "base_config_hash": state.base_config_hash,
        "base_config": state.base_config,
    }
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return directory


def read_adapter_config(directory) -> tuple[AdapterConfig, dict]:
    """The ``AdapterConfig`` and the raw JSON of a saved adapter."""
    path = pathlib.Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a zflora_compile adapter config (format {meta.get('format')!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} has format version {meta['format_version']}; this zflora_compile reads up to {FORMAT_VERSION}")
    return AdapterConfig.from_dict(meta), meta


def _mismatch_message(saved: dict, current: dict, saved_hash: str, current_hash: str) -> str:
    diffs = [
        f"{key}: adapter {saved.get(key)!r} vs model {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
    detail = "; ".join(diffs) if diffs else "(fields not recorded)"
    return (
        f"the adapter was trained on a different base model: base config hash {saved_hash[:12]} != "
        f"{current_hash[:12]} of this model. Differences: {detail}"
    )


def load_adapters(model, directory, *, check_base: bool = True):
    """Attach the adapter saved in ``directory`` to the (fresh, unadapted) ``model``; returns ``model``.

    Raises ``BaseModelMismatchError`` when ``model.config`` does not hash to the saved
    ``base_config_hash`` (``check_base=False`` skips the check; the weight shapes must still fit).
    """
    config, meta = read_adapter_config(directory)
    current_hash = base_config_hash(model.config)
    if check_base and meta.get("base_config_hash") != current_hash:
        raise BaseModelMismatchError(
            _mismatch_message(meta.get("base_config", {}), base_config_fields(model.config), meta.get("base_config_hash", ""), current_hash)
        )
    attach_adapters(model, config)
    tensors = load_file(str(pathlib.Path(directory) / WEIGHTS_NAME))
    params = adapter_state_dict(model)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"adapter weights do not match the attached adapter: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, param in params.items():
            value = tensors[name]
            if value.shape != param.shape:
                raise ValueError(f"adapter weight {name}: saved shape {tuple(value.shape)} != {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))
    return model
