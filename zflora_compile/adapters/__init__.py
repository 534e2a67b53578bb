"""Adapter families the compiler fuses, for training in PyTorch: FFA, FBA, FFBA and zFLoRA.

Attach one to a Hugging Face Llama-family causal LM (Llama, Mistral, Qwen2), train it with a
plain torch loop or the HF ``Trainer``, save it, load it onto a fresh base model, and export the
unfused model to ONNX (``torch.onnx.export(..., dynamo=True)``) or ``torch.export``::

    from zflora_compile.adapters import AdapterConfig, attach_adapters, save_adapters, load_adapters
    model = attach_adapters(hf_model, AdapterConfig(family="ffba", rank=8, alpha=16))
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-3)
    ...
    save_adapters(model, "out/adapter")
    model2 = load_adapters(fresh_hf_model, "out/adapter")

The definitions (docs/adapters.md, and the contract in ADAPTERS.md sections 2-4) are exact: at
creation the adapted model computes the base model's function.  Needs the torch extra.
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
    import safetensors  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("zflora_compile.adapters needs the torch extra: pip install torch==2.13.0, then pip install 'zflora-compile[torch]'") from exc

from zflora_compile.adapters.attach import (
    SUPPORTED_MODEL_TYPES,
    adapter_state_dict,
    attach_adapters,
    count_parameters,
    get_adapter_state,
    randomize_adapters,
    trainable_parameters,
)
from zflora_compile.adapters.config import FAMILIES, TARGETS, AdapterConfig, base_config_hash
from zflora_compile.adapters.gaws import (
    GAWS_KINDS,
    GawsDLinear,
    GawsLinear,
    attach_gaws,
    build_gaws_model,
    gaws_parameters,
    randomize_gaws,
)
from zflora_compile.adapters.serialization import (
    BaseModelMismatchError,
    load_adapters,
    read_adapter_config,
    save_adapters,
)

__all__ = [
    "FAMILIES",
    "GAWS_KINDS",
    "SUPPORTED_MODEL_TYPES",
    "TARGETS",
    "AdapterConfig",
    "BaseModelMismatchError",
    "GawsDLinear",
    "GawsLinear",
    "adapter_state_dict",
    "attach_adapters",
    "attach_gaws",
    "base_config_hash",
    "build_gaws_model",
    "count_parameters",
    "gaws_parameters",
    "get_adapter_state",
    "load_adapters",
    "randomize_adapters",
    "randomize_gaws",
    "read_adapter_config",
    "save_adapters",
    "trainable_parameters",
]
