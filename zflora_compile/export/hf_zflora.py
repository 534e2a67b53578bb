"""A model with zFLoRA adapters (``zflora_compile.adapters``) as a standard Hugging Face checkpoint.

zFLoRA widens the residual stream from ``d`` to ``d + r`` lanes (ADAPTERS.md section 4), so the
fused model is the base architecture (``LlamaForCausalLM``, ``MistralForCausalLM``,
``Qwen2ForCausalLM``) with ``hidden_size = D = d + r (+ p)`` and, torch layout ``[out, in]``:

- embedding ``[E | E_z | 0_p]`` (``E_z`` the learned lanes or zeros);
- entry projections q, k, v, gate, up: ``W' = [W | s*B | 0_p]`` (input widened; zeros where a
  block carries no adapter; the bias is unchanged);
- exit projections o, down: ``W' = [W ; A ; 0_p]`` (output widened; zero rows where a block
  carries no adapter; the bias gets ``r + p`` zeros);
- LM head ``[W_lm | s*B_lm | 0_p]``; untied (``tie_word_embeddings = false``) since E and W_lm
  now differ;
- ``head_dim`` written explicitly (the base's), so ``D / num_attention_heads`` is never used.

RMSNorms.  The project's ``WidenedRMSNorm`` computes ``w' * x / sqrt(mean_{d+r}(x^2) + eps*c)``
with ``c = d/(d+r)`` and ``w' = sqrt(c) * [w ; 1]``.  A plain ``LlamaRMSNorm`` over ``d + r``
lanes computes ``weight * x / sqrt(mean_{d+r}(x^2) + rms_norm_eps)``, the same function with
``weight = w'`` and ``rms_norm_eps = eps * c`` (every norm shares ``eps``, so one config value
serves all of them).  Padding ``p`` zero lanes (``pad_to``: ``D`` a multiple of a quantisation
group size) changes the mean to ``mean_D = (d+r)/D * mean_{d+r}`` (the pad lanes are zero: every
writer of the residual writes zeros there), which is undone exactly by ``weight *=
sqrt((d+r)/D)`` and ``rms_norm_eps = eps * d/D``.  The pad lanes' norm weight is then irrelevant
(it multiplies zeros); it is set to the adapter lanes' value.  Exact up to fp rounding.
"""

from __future__ import annotations

import copy
import math
import pathlib
import shutil

from zflora_compile.errors import InputError
from zflora_compile.export._common import atomic_directory

ENTRY = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
EXIT = ("self_attn.o_proj", "mlp.down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
WEIGHTS_NAME = "model.safetensors"


def _zflora_state(model):
    from zflora_compile.adapters import get_adapter_state

    try:
        state = get_adapter_state(model)
    except ValueError as error:
        raise InputError(f"{type(model).__name__}: {error}") from None
    if state.config.family != "zflora":
        raise InputError(f"the model's adapters are {state.config.family!r}, not 'zflora': only zFLoRA is a standard checkpoint once fused")
    return state


def _norm(norm, p: int, D: int):
    """(weight, eps) of the plain RMSNorm over ``D`` lanes that computes ``norm`` (a WidenedRMSNorm)."""
    import torch

    base = norm.base_layer.weight
    weight = torch.cat([base * norm.weight_scale, norm.lane_weight.to(base.dtype)])  # as WidenedRMSNorm.forward
    if not p:
        return weight, norm.variance_epsilon
    lanes = norm.hidden_size + norm.lanes
    factor = math.sqrt(lanes / D)
    padded = torch.cat([weight.float(), weight.new_full((p,), float(norm.lane_weight[0]) if norm.lanes else 1.0).float()])
    return (padded * factor).to(base.dtype), norm.variance_epsilon * lanes / D


def _entry(module, r: int, p: int, dtype):
    """``[W | s*B | 0]`` for a zFLoRA entry projection (``AdaptedLinear``)."""
    import torch

    weight = module.base_layer.weight
    if hasattr(module, "zflora_B"):
        lanes = (module.zflora_B.weight.float() * module.zflora_scale).to(dtype)
    else:
        lanes = weight.new_zeros((weight.shape[0], r))
    return torch.cat([weight, lanes.to(dtype), weight.new_zeros((weight.shape[0], p))], dim=1)


def _exit(module, r: int, p: int, dtype):
    """``[W ; A ; 0]`` (and the bias with ``r + p`` zeros) for a zFLoRA exit projection."""
    import torch

    weight = module.base_layer.weight
    lanes = module.zflora_A.weight.to(dtype) if hasattr(module, "zflora_A") else weight.new_zeros((r, weight.shape[1]))
    widened = torch.cat([weight, lanes, weight.new_zeros((p, weight.shape[1]))], dim=0)
    bias = module.base_layer.bias
    return widened, None if bias is None else torch.cat([bias, bias.new_zeros(r + p)])


def _check_roles(model) -> None:
    from zflora_compile.adapters.layers import AdaptedLinear

    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear) and (module.produces or module.reads):
            raise InputError(f"module {name} carries FFA/FBA roles; only a pure zFLoRA model is exported")


def fused_checkpoint(model, *, pad_to: int | None = None):
    """``(config, {name: tensor})`` of the fused standard checkpoint of a zFLoRA-adapted model."""
    import torch

    state = _zflora_state(model)
    _check_roles(model)
    r = state.config.rank
    decoder, config = model.model, model.config
    d = config.hidden_size
    if pad_to is not None and (not isinstance(pad_to, int) or pad_to < 1):
        raise InputError(f"--pad-to must be a positive integer, got {pad_to!r}")
    # transformers (5.x) refuses a config whose hidden_size is no multiple of num_attention_heads,
    # even with head_dim given: D is rounded up to a multiple of the heads (and of pad_to) with
    # zero pad lanes, which are exact (see the module docstring).
    multiple = math.lcm(int(pad_to or 1), int(config.num_attention_heads))
    D = -(-(d + r) // multiple) * multiple
    p = D - d - r
    dtype = decoder.embed_tokens.weight.dtype
    tensors = {
        name.replace(".base_layer.", "."): value
        for name, value in model.state_dict().items()
        if not any(part.startswith("zflora_") for part in name.split("."))
    }
    with torch.no_grad():
        eps = set()
        norms = {"model.norm": decoder.norm}
        for i, layer in enumerate(decoder.layers):
            prefix = f"model.layers.{i}."
            norms.update({prefix + n: getattr(layer, n) for n in NORMS})
            for name in ENTRY:
                module = layer.get_submodule(name)
                tensors[prefix + name + ".weight"] = _entry(module, r, p, dtype)
            for name in EXIT:
                weight, bias = _exit(layer.get_submodule(name), r, p, dtype)
                tensors[prefix + name + ".weight"] = weight
                if bias is not None:
                    tensors[prefix + name + ".bias"] = bias
        for name, norm in norms.items():
            tensors[name + ".weight"], value = _norm(norm, p, D)
            eps.add(value)
        if len(eps) != 1:
            raise InputError(f"the model's RMSNorms have different epsilons {sorted(eps)}; one rms_norm_eps cannot express them")
        embed = decoder.embed_tokens
        lanes = embed.zflora_E.weight.to(dtype) if hasattr(embed, "zflora_E") else embed.weight.new_zeros((embed.weight.shape[0], r))
        tensors["model.embed_tokens.weight"] = torch.cat([embed.weight, lanes, embed.weight.new_zeros((embed.weight.shape[0], p))], dim=1)
        head = model.lm_head
        scale = head.adapter_read[2]
        lanes = (head.zflora_B.weight.float() * scale).to(dtype)
        tensors["lm_head.weight"] = torch.cat([head.weight, lanes, head.weight.new_zeros((head.weight.shape[0], p))], dim=1)
    new_config = copy.deepcopy(config)
    new_config.head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    new_config.hidden_size = D
    new_config.rms_norm_eps = eps.pop()
    new_config.tie_word_embeddings = False
    new_config.architectures = [type(model).__name__]
    new_config.dtype = dtype
    _check_against_architecture(type(model), new_config, tensors)
    return new_config, {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def _check_against_architecture(cls, config, tensors: dict) -> None:
    """The tensors are exactly the parameters (names and shapes) ``cls(config)`` has."""
    import torch

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != got:
        diff = sorted(set(expected.items()) ^ set(got.items()))[:4]
        raise InputError(f"the fused tensors do not fit {cls.__name__} with hidden_size {config.hidden_size}: {diff}")


def export_hf_zflora(model, out, *, pad_to: int | None = None, force: bool = False, copy_from=None):
    """Write ``out/config.json`` + ``out/model.safetensors`` for a zFLoRA-adapted model; returns the config.

    ``copy_from``: a base model directory whose tokenizer / generation files are copied along.
    """
    from safetensors.torch import save_file

    config, tensors = fused_checkpoint(model, pad_to=pad_to)
    with atomic_directory(out, force=force) as tmp:
        if copy_from is not None:
            for item in pathlib.Path(copy_from).iterdir():
                if item.is_file() and not item.name.startswith(("config.json", "model", "pytorch_model")) and item.suffix != ".safetensors":
                    shutil.copy2(item, tmp / item.name)
        config.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    return config


def export_hf_zflora_dir(adapter_dir, base_dir, out, *, pad_to: int | None = None, force: bool = False):
    """The same from a saved zFLoRA adapter directory and the base model's HF directory."""
    from transformers import AutoModelForCausalLM

    from zflora_compile.adapters import BaseModelMismatchError, load_adapters, read_adapter_config

    try:
        config, _ = read_adapter_config(adapter_dir)
    except (OSError, ValueError) as error:
        raise InputError(f"{adapter_dir}: {error}") from None
    if config.family != "zflora":
        raise InputError(f"{adapter_dir}: adapter family {config.family!r} is not 'zflora'")
    if not (pathlib.Path(base_dir) / "config.json").is_file():
        raise InputError(f"{base_dir}: no config.json (expected the base model's Hugging Face directory)")
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()  # errors stay one line on stderr
    hf_logging.set_verbosity_error()
    try:
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype="auto")
    except (OSError, ValueError) as error:
        raise InputError(f"{base_dir}: cannot load the base model ({type(error).__name__}: {error})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    try:
        model = load_adapters(base.eval(), adapter_dir)
    except BaseModelMismatchError as error:
        raise InputError(f"{adapter_dir}: {error}") from None
    except ValueError as error:
        raise InputError(f"{adapter_dir}: {error}") from None
    return export_hf_zflora(model, out, pad_to=pad_to, force=force, copy_from=base_dir)
