"""Engine-neutral PEFT LoRA: every module's true scale folded into ``lora_B``, config scale 1.

PEFT computes, per adapted module ``m``, ``y = base(x) + s_m * B_m(A_m(x))`` with
``r_m = rank_pattern[key] or r``, ``alpha_m = alpha_pattern[key] or lora_alpha`` (the key found
by PEFT's rule: the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", name)``) and
``s_m = alpha_m / sqrt(r_m)`` with ``use_rslora``, else ``alpha_m / r_m``.  Serving engines
read these fields differently (one global ``lora_alpha / r``; rsLoRA honoured or not;
``rank_pattern`` / ``alpha_pattern`` honoured or dropped), so the same file gives different
models.  The export writes ``B'_m = s_m * B_m`` (in fp32, cast back to B's dtype; a
``lora_B`` bias is scaled too, since PEFT scales the whole ``lora_B`` output) and a config whose
every reading gives scale 1:

- one rank in the whole adapter: ``r = lora_alpha = that rank``, no patterns, ``use_rslora = false``;
- mixed ranks: ``lora_alpha = r`` (the default rank), ``rank_pattern`` kept as it was (it
  still resolves each module to its true rank) and ``alpha_pattern = rank_pattern`` (same keys,
  same order, so PEFT's rule picks the same key for both and ``alpha_m = r_m``).  A reader that
  honours the patterns gets ``r_m / r_m = 1``; one that ignores them gets ``lora_alpha / r = 1``.
  The scale is then right for every reader; what a pattern-ignoring reader can still get wrong
  is the *shape* (it must take each module's rank from its tensors).  ``uniform_rank=True``
  removes that too: every module is zero-padded to the largest rank (``A`` gains zero rows,
  ``B`` zero columns, exact) and no pattern is written, at the cost of the padded FLOPs.

Refused (``InputError`` naming the file and the field or module): anything whose update is not
``s * B(A(x))`` with plain tensors: DoRA (the magnitude vector), BD-LoRA (use ``bdlora_tp``),
QA-LoRA, aLoRA, VeLoRA, MonteCLoRA, Arrow, KaSA, layer replication, ``target_parameters``,
trainable tokens, ``bias != "none"`` (trained base biases), PiSSA/OLoRA/CorDA/LoftQ/LoRA-GA
initialisations (they rewrite the base weights), and non-LoRA PEFT types.
"""

from __future__ import annotations

import pathlib
import shutil

from zflora_compile.errors import InputError
from zflora_compile.export._common import atomic_directory, write_peft_adapter
from zflora_compile.peft_format import (
    BIN_NAME,
    CONFIG_NAME,
    PEFT_PREFIX,
    SAFETENSORS_NAME,
    ModuleLoRA,
    module_lora,
    module_of,
    read_peft_adapter,
)

A_ROLES = ("lora_A", "lora_embedding_A")
B_ROLES = ("lora_B", "lora_embedding_B")
REFUSED_ROLES = ("lora_magnitude_vector",)
ROLES = A_ROLES + B_ROLES + REFUSED_ROLES

REFUSED_FIELDS = {
    "use_dora": "DoRA (the magnitude vector rescales the adapted weight's columns; it does not fold into B)",
    "use_bdlora": "BD-LoRA (block-diagonal factors): use `export bdlora-tp`, whose dense/ output is the neutral plain LoRA",
    "use_qalora": "QA-LoRA (A reads pooled inputs)",
    "alora_invocation_tokens": "aLoRA (active only after the invocation tokens)",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "layer_replication": "layer replication (changes the base model)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens",
}
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def check_plain_lora(config: dict, where, *, allow: tuple[str, ...] = ()) -> None:
    """Refuse (``InputError``) every config field whose update is not ``s * B(A(x))``."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InputError(f"{where}: peft_type {peft_type} is not LoRA; only plain LoRA adapters can be exported")
    for name, what in REFUSED_FIELDS.items():
        if name not in allow and config.get(name) not in (None, False, [], {}):
            raise InputError(f"{where}: {name} is set: {what} is not plain LoRA and is not exported")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        raise InputError(
            f"{where}: init_lora_weights={init!r} rewrites the base weights; convert the adapter first "
            "(PEFT save_pretrained(path_initial_model_for_weight_conversion=...))"
        )
    if config.get("bias", "none") != "none":
        raise InputError(f"{where}: bias={config.get('bias')!r} trains the base model's biases; only bias='none' is exported")


def collect_modules(config: dict, tensors: dict, where) -> tuple[dict[str, ModuleLoRA], dict]:
    """``({module: ModuleLoRA}, {key: tensor} passed through unchanged)``; checks every shape."""
    modules: dict[str, ModuleLoRA] = {}
    passthrough = {}
    keep = [str(m) for m in (config.get("modules_to_save") or [])]
    for key, value in tensors.items():
        split = module_of(key, ROLES)
        if split is None:
            if any(m in key.split(".") or key.removeprefix(PEFT_PREFIX).startswith(m) for m in keep):
                passthrough[key] = value
                continue
            raise InputError(f"{where}: tensor {key} is not a LoRA factor (nor in modules_to_save); refusing to guess")
        name, role, _ = split
        if role in REFUSED_ROLES:
            raise InputError(f"{where}: module {name} has {role} (DoRA): not plain LoRA, not exported")
        if name not in modules:
            modules[name] = module_lora(config, name)
    splits = {key: module_of(key, ROLES) for key in tensors}
    for name, module in modules.items():
        a = [tensors[k] for k, s in splits.items() if s and s[0] == name and s[1] in A_ROLES]
        b = [tensors[k] for k, s in splits.items() if s and s[0] == name and s[1] in B_ROLES and s[2] in ("weight", "")]
        if len(a) != 1 or len(b) != 1:
            raise InputError(f"{where}: module {name} needs exactly one lora_A and one lora_B weight, found {len(a)} and {len(b)}")
        ranks = (a[0].shape[0], b[0].shape[1] if b[0].dim() > 1 else -1)
        if ranks != (module.r, module.r):
            raise InputError(
                f"{where}: module {name}: lora_A/lora_B have rank {ranks[0]}/{ranks[1]} but the config "
                f"(r, rank_pattern) gives {module.r}"
            )
    if not modules:
        raise InputError(f"{where}: no LoRA weights found")
    return modules, passthrough


def fold_scales(tensors: dict, modules: dict[str, ModuleLoRA]) -> dict:
    """``lora_B' = s * lora_B`` (weight and bias), in fp32, cast back; ``lora_A`` unchanged."""
    import torch

    out = {}
    for key, value in tensors.items():
        split = module_of(key, ROLES)
        if split is not None and split[0] in modules and split[1] in B_ROLES:
            value = (value.to(torch.float32) * modules[split[0]].scale).to(value.dtype)
        out[key] = value
    return out


def pad_ranks(tensors: dict, modules: dict[str, ModuleLoRA], rank: int) -> dict:
    """Zero-pad every module to ``rank``: ``A`` gains zero rows, ``B`` zero columns (``B A`` unchanged)."""
    import torch

    out = {}
    for key, value in tensors.items():
        split = module_of(key, ROLES)
        if split is not None and split[0] in modules:
            extra = rank - modules[split[0]].r
            if extra and split[1] in A_ROLES:
                value = torch.cat([value, value.new_zeros((extra, *value.shape[1:]))], dim=0)
            elif extra and split[1] in B_ROLES and split[2] != "bias":
                value = torch.cat([value, value.new_zeros((value.shape[0], extra, *value.shape[2:]))], dim=1)
        out[key] = value
    return out


def neutral_config(config: dict, ranks: set[int], *, padded_to: int | None = None) -> tuple[dict, str]:
    """The exported ``adapter_config.json`` (scale 1 for every reader) and a note on the choice made."""
    out = dict(config)
    out.update(use_rslora=False, use_dora=False)
    if out.get("init_lora_weights") not in (True, False):
        out["init_lora_weights"] = True  # an init recipe (e.g. "mica") would only cost time at load
    if padded_to is not None or len(ranks) == 1:
        rank = padded_to if padded_to is not None else next(iter(ranks))
        out.update(r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={})
        note = f"one rank ({rank}{', zero-padded' if padded_to is not None and len(ranks) > 1 else ''}): r = lora_alpha = {rank}, no patterns"
    else:
        rank_pattern = dict(config.get("rank_pattern") or {})
        out.update(lora_alpha=int(config.get("r", 8)), rank_pattern=rank_pattern, alpha_pattern=dict(rank_pattern))
        note = (
            f"mixed ranks {sorted(ranks)}: kept rank_pattern, alpha_pattern = rank_pattern, lora_alpha = r; "
            "every reader computes scale 1, but a reader that ignores rank_pattern must take each module's "
            "rank from its tensors (or export with --uniform-rank)"
        )
    return out, note


def neutralize(config: dict, tensors: dict, where, *, uniform_rank: bool = False, allow: tuple[str, ...] = ()):
    """``(config, tensors, summary)`` of the neutral adapter for a PEFT LoRA config and state dict."""
    check_plain_lora(config, where, allow=allow)
    modules, _ = collect_modules(config, tensors, where)
    ranks = {m.r for m in modules.values()}
    folded = fold_scales(tensors, modules)
    padded_to = max(ranks) if uniform_rank else None
    if padded_to is not None:
        folded = pad_ranks(folded, modules, padded_to)
    new_config, note = neutral_config(config, ranks, padded_to=padded_to)
    summary = {
        "format": "zflora-compile-neutral-lora",
        "note": note,
        "modules": {n: {"r": m.r, "alpha": m.alpha, "scale_folded_into_lora_B": m.scale} for n, m in sorted(modules.items())},
    }
    return new_config, folded, summary


def export_peft(adapter_dir, out, *, uniform_rank: bool = False, force: bool = False) -> dict:
    """Read the PEFT LoRA adapter in ``adapter_dir``, write the neutral one to ``out``; returns the summary."""
    config, tensors, weights = read_peft_adapter(adapter_dir)
    new_config, new_tensors, summary = neutralize(config, tensors, weights, uniform_rank=uniform_rank)
    summary["source"] = str(adapter_dir)
    with atomic_directory(out, force=force) as tmp:
        write_peft_adapter(tmp, new_config, new_tensors, extra=summary)
        for item in pathlib.Path(adapter_dir).iterdir():  # README, tokenizer files: copied as they are
            if item.is_file() and item.name not in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME, "zflora_export.json"):
                shutil.copy2(item, tmp / item.name)
    return summary
