"""PEFT LoRA adapter directories, read one way for ``zcompile swap`` and ``zcompile export``.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or the older
``adapter_model.bin``). Its state-dict keys are the module's path in the PeftModel plus a role:
``base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight`` is module
``model.layers.0.self_attn.q_proj`` (PEFT's ``base_model.model.`` prefix dropped: the name PEFT
matched ``target_modules`` / ``rank_pattern`` against, the base model's own module path), role
``lora_B``, tail ``weight``.

Per module PEFT computes (``LoraModel._create_and_replace``, ``LoraLayer.update_layer``):

- ``r_m = rank_pattern[k]`` for the first key ``k`` (in the dict's order) with
  ``re.match(rf"(.*\\.)?({k})$", name)`` (``peft.utils.other.get_pattern_key``), else ``r``;
- ``alpha_m`` likewise from ``alpha_pattern``, else ``lora_alpha``;
- ``s_m = alpha_m / sqrt(r_m)`` with ``use_rslora``, else ``alpha_m / r_m``.

(``save_pretrained`` writes the config with sorted keys, so "the dict's order" is the sorted one
after a reload: a more specific key that sorts before a general one wins, in PEFT and here alike.)
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re

from zflora_compile.errors import InputError

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
FACTOR_ROLES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def read_config(directory) -> dict:
    """``adapter_config.json`` of a PEFT adapter directory, as a dict (``InputError`` naming the file)."""
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
    return config


def read_weights(directory) -> tuple[dict, pathlib.Path]:
    """``({key: torch tensor}, weights file)``: ``adapter_model.safetensors``, else ``adapter_model.bin``
    (``torch.load(weights_only=True)``)."""
    import torch
    from safetensors.torch import load_file

    directory = pathlib.Path(directory)
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
    return tensors, weights


def read_peft_adapter(directory) -> tuple[dict, dict, pathlib.Path]:
    """``(adapter_config.json as a dict, {key: torch tensor}, weights file)`` of a PEFT adapter directory."""
    config = read_config(directory)
    tensors, weights = read_weights(directory)
    return config, tensors, weights


def module_of(key: str, roles: tuple[str, ...] = FACTOR_ROLES) -> tuple[str, str, str] | None:
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


def pattern_key(patterns, name: str) -> str | None:
    """PEFT's rule (``peft.utils.other.get_pattern_key``): the first pattern matching ``name``'s suffix."""
    for key in patterns or {}:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


@dataclasses.dataclass
class ModuleLoRA:
    """One adapted module: its rank, alpha and the scale PEFT applies."""

    name: str
    r: int
    alpha: float
    scale: float


def module_lora(config: dict, name: str) -> ModuleLoRA:
    """The rank, alpha and scale PEFT gives module ``name`` (without the ``base_model.model.`` prefix)."""
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r_key, a_key = pattern_key(rank_pattern, name), pattern_key(alpha_pattern, name)
    r = int(rank_pattern[r_key]) if r_key is not None else int(config.get("r", 8))
    alpha = float(alpha_pattern[a_key]) if a_key is not None else float(config.get("lora_alpha", 8))
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return ModuleLoRA(name, r, alpha, scale)


def targeted(name: str, config: dict) -> bool:
    """PEFT's ``target_modules`` rule: a string is a full regex match, a list a name or dotted
    suffix; ``layers_to_transform`` restricts the layer index (``.layers.<i>.``)."""
    targets = config.get("target_modules")
    if isinstance(targets, str):
        hit = re.fullmatch(targets, name) is not None
    elif targets:
        hit = any(name == t or name.endswith("." + t) for t in targets)
    else:
        hit = True  # target_parameters or a config without targets: the tensors decide
    layers = config.get("layers_to_transform")
    if hit and layers is not None:
        m = re.search(r"\.(\d+)\.", name)
        hit = m is not None and int(m.group(1)) in ([layers] if isinstance(layers, int) else layers)
    return hit


def block_diagonal(compact, nblocks: int):
    """PEFT's ``BlockDiagonalLinear.weight_as_blockdiagonal_matrix`` (BD-LoRA): the compact
    ``[out, in/nblocks]`` weight as the dense ``[out, in]`` one, ``block_diag(*chunk(weight, nblocks, 0))``."""
    import torch

    return torch.block_diag(*torch.chunk(compact, nblocks, dim=0))


def bdlora_config(config: dict) -> dict | None:
    """``use_bdlora`` as a dict (a JSON string in some saved configs), or None when it is not set."""
    bd = config.get("use_bdlora")
    if isinstance(bd, str):
        bd = json.loads(bd)
    return bd if isinstance(bd, dict) else None
