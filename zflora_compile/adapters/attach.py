"""``attach_adapters``: put an adapter family on a Hugging Face Llama-family causal LM."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from zflora_compile.adapters.config import AdapterConfig, base_config_fields, base_config_hash
from zflora_compile.adapters.layers import (
    ADAPTER_PARTS,
    AdaptedLinear,
    Carrier,
    WidenedRMSNorm,
    adapt_lm_head,
    widen_embedding,
)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
ATTENTION_ENTRY = ("q_proj", "k_proj", "v_proj")
MLP_ENTRY = ("gate_proj", "up_proj")
STATE_ATTR = "_zflora_adapters"


@dataclasses.dataclass
class AdapterState:
    """Kept on the adapted model (``model._zflora_adapters``): the resolved config and the carrier."""

    config: AdapterConfig
    carrier: Carrier
    base_config_hash: str
    base_config: dict


def get_adapter_state(model: nn.Module) -> AdapterState:
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ValueError("this model has no zflora_compile adapters (call attach_adapters or load_adapters first)")
    return state


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_model(model: nn.Module):
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        hint = " (a PEFT model? pass the plain transformers model)" if hasattr(model, "peft_config") else ""
        raise ValueError(f"adapters support transformers causal LMs of type {SUPPORTED_MODEL_TYPES}, got {model_type!r}{hint}")
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if layers is None or not isinstance(getattr(model, "lm_head", None), nn.Linear):
        raise ValueError("expected a *ForCausalLM with .model.layers and an nn.Linear .lm_head")
    for i, layer in enumerate(layers):
        for block, names in (("self_attn", (*ATTENTION_ENTRY, "o_proj")), ("mlp", (*MLP_ENTRY, "down_proj"))):
            for name in names:
                if not isinstance(getattr(getattr(layer, block, None), name, None), nn.Linear):
                    raise ValueError(f"layer {i} has no nn.Linear {block}.{name} (already adapted, or not a Llama-family layer?)")
    return decoder, layers


def _wrap(parent: nn.Module, name: str, carrier: Carrier) -> AdaptedLinear:
    module = getattr(parent, name)
    if not isinstance(module, AdaptedLinear):
        module = AdaptedLinear(module, carrier)
        setattr(parent, name, module)
    return module


def _resolve_layers(config: AdapterConfig, num_layers: int) -> list[int]:
    layers = list(range(num_layers)) if config.layers is None else list(config.layers)
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {num_layers} decoder layers")
    return layers


def _attach_ffa(layers, config, carrier, dtype) -> None:
    r, s = config.rank, config.scale
    for i in config.layers:
        layer = layers[i]
        if "attention" in config.blocks:
            key = f"layers.{i}.attention.ffa"
            _wrap(layer.self_attn, "q_proj", carrier).add_producer("ffa", key, r, dtype)  # A reads norm1(x)
            _wrap(layer.self_attn, "o_proj", carrier).add_reader("ffa", key, r, s, dtype)  # B adds to o @ Wo
        if "mlp" in config.blocks:
            key = f"layers.{i}.mlp.ffa"
            _wrap(layer.mlp, "gate_proj", carrier).add_producer("ffa", key, r, dtype)  # A reads norm2(h)
            _wrap(layer.mlp, "down_proj", carrier).add_reader("ffa", key, r, s, dtype)  # B adds to m @ Wd


def _attach_fba(model, layers, config, carrier, dtype) -> None:
    r, s = config.rank, config.scale
    for i in config.layers:
        layer = layers[i]
        if "attention" in config.blocks:
            key = f"layers.{i}.attention.fba"
            _wrap(layer.self_attn, "o_proj", carrier).add_producer("fba", key, r, dtype)  # A reads o
            for name in MLP_ENTRY:
                _wrap(layer.mlp, name, carrier).add_reader("fba", key, r, s, dtype)
        if "mlp" in config.blocks:
            key = f"layers.{i}.mlp.fba"
            _wrap(layer.mlp, "down_proj", carrier).add_producer("fba", key, r, dtype)  # A reads m
            if i + 1 < len(layers):
                for name in ATTENTION_ENTRY:
                    _wrap(layers[i + 1].self_attn, name, carrier).add_reader("fba", key, r, s, dtype)
            else:
                adapt_lm_head(model.lm_head, carrier, part="fba", key=key, rank=r, scale=s, zero=True, dtype=dtype)


def _attach_zflora(model, decoder, layers, config, carrier, dtype) -> None:
    r, s = config.rank, config.scale
    selected = set(config.layers)
    widen_embedding(decoder.embed_tokens, r, learned=config.zflora_embedding == "learned", dtype=dtype)
    decoder.norm = WidenedRMSNorm(decoder.norm, r)
    for i, layer in enumerate(layers):
        layer.input_layernorm = WidenedRMSNorm(layer.input_layernorm, r)
        layer.post_attention_layernorm = WidenedRMSNorm(layer.post_attention_layernorm, r)
        for block, parent, entries, exit_name in (
            ("attention", layer.self_attn, ATTENTION_ENTRY, "o_proj"),
            ("mlp", layer.mlp, MLP_ENTRY, "down_proj"),
        ):
            adapted = i in selected and block in config.blocks
            for name in entries:
                _wrap(parent, name, carrier).widen_input(r, s if adapted else None, dtype)
            _wrap(parent, exit_name, carrier).widen_output(r, adapted, dtype)
    # B random, like the other zFLoRA readers (the lanes start at zero).
    adapt_lm_head(model.lm_head, carrier, part="zflora", key=None, rank=r, scale=s, zero=False, dtype=dtype)


def _clear_before(module, args, kwargs):
    """Forward pre-hook of the adapted model: refuse FBA with gradient checkpointing; empty the carrier."""
    state = getattr(module, STATE_ATTR)
    if state.config.family in ("fba", "ffba") and module.training and getattr(module, "is_gradient_checkpointing", False):
        raise RuntimeError("gradient checkpointing is not supported with 'fba'/'ffba' adapters: their low-rank path crosses layer boundaries")
    state.carrier.clear()


def _clear_after(module, args, kwargs, output):
    """Forward hook of the adapted model (always called): drop the activations of this pass."""
    getattr(module, STATE_ATTR).carrier.clear()


def attach_adapters(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Freeze ``model`` and attach ``config.family`` adapters in place; returns ``model``.

    The adapted model computes exactly the base model's function until the adapters are trained
    (one matrix of each adapter pair starts at zero).  Only adapter parameters have
    ``requires_grad``.  The model keeps its ``transformers`` interface (``forward(input_ids,
    labels=...)``, ``generate``, the HF ``Trainer``).  With ``zflora`` the hidden states have
    ``hidden_size + rank`` lanes (``output_hidden_states``, ``inputs_embeds`` included).
    """
    if hasattr(model, STATE_ATTR):
        raise ValueError("this model already has zflora_compile adapters attached")
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig, got {type(config).__name__}")
    decoder, layers = _check_model(model)
    if config.family == "zflora":  # check every norm before anything is changed
        norms = [decoder.norm] + [n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        for norm in norms:
            weight = getattr(norm, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not hasattr(norm, "variance_epsilon"):
                raise ValueError(f"zFLoRA needs Llama-style RMSNorms (weight [d], variance_epsilon); found {type(norm).__name__}")
    base_dtype = model.get_input_embeddings().weight.dtype
    dtype = getattr(torch, config.dtype) if config.dtype else base_dtype
    resolved = dataclasses.replace(config, layers=_resolve_layers(config, len(layers)), dtype=_dtype_name(dtype))
    fields, digest = base_config_fields(model.config), base_config_hash(model.config)

    for param in model.parameters():
        param.requires_grad_(False)
    carrier = Carrier()
    device = model.get_input_embeddings().weight.device
    with torch.device(device):
        if resolved.family in ("ffa", "ffba"):
            _attach_ffa(layers, resolved, carrier, dtype)
        if resolved.family in ("fba", "ffba"):
            _attach_fba(model, layers, resolved, carrier, dtype)
        if resolved.family == "zflora":
            _attach_zflora(model, decoder, layers, resolved, carrier, dtype)
    state = AdapterState(config=resolved, carrier=carrier, base_config_hash=digest, base_config=fields)
    setattr(model, STATE_ATTR, state)
    # Module-level hook functions that look the state up on the module, so that a deep copy of
    # the model clears its own carrier.
    model.register_forward_pre_hook(_clear_before, with_kwargs=True)
    model.register_forward_hook(_clear_after, with_kwargs=True, always_call=True)
    for param in trainable_parameters(model):
        param.requires_grad_(True)
    return model


def is_adapter_parameter(name: str) -> bool:
    return any(part in ADAPTER_PARTS for part in name.split("."))


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights by parameter name (the base model's weights are not included)."""
    return {name: param for name, param in model.named_parameters() if is_adapter_parameter(name)}


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (what an optimizer should get)."""
    return list(adapter_state_dict(model).values())


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(adapter parameters, all parameters)."""
    return sum(p.numel() for p in trainable_parameters(model)), sum(p.numel() for p in model.parameters())


def randomize_adapters(model: nn.Module, seed: int = 0, *, std: float = 0.05) -> nn.Module:
    """Give every adapter weight seeded Gaussian values, so the adapters visibly change the model.

    ``*_A`` matrices get ``N(0, 1/in_features)``, every other adapter weight ``N(0, std^2)``.
    For tests and examples; training does not need it.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(adapter_state_dict(model).items()):
            sigma = param.shape[1] ** -0.5 if name.endswith("_A.weight") else std
            values = torch.randn(param.shape, generator=gen, dtype=torch.float32) * sigma
            param.copy_(values.to(param.dtype))
    return model
