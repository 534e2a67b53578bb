"""zflora-compile: find adapter subgraphs in LLM graphs, fuse or merge them exactly, verify.

Python API::

    from zflora_compile import detect_adapters, fuse_adapters
    sites = detect_adapters(model)                  # IR-neutral AdapterSite records
    fused = fuse_adapters(model, strategy="fuse")   # same type out as in

    FuseAdaptersPass("fuse")(ir_model)              # an onnx-ir pass (in place, verified)

The names are imported on first use, so ``zcompile --version`` does not load ONNX Runtime.
"""

from __future__ import annotations

import importlib

from zflora_compile._version import __version__

_LAZY = {
    "detect_adapters": "zflora_compile.api",
    "fuse_adapters": "zflora_compile.api",
    "ZcompileError": "zflora_compile.errors",
    "InputError": "zflora_compile.errors",
    "VerificationError": "zflora_compile.errors",
    "DependencyError": "zflora_compile.errors",
    "EnvironmentProblem": "zflora_compile.errors",
    "AdapterSite": "zflora_compile.graph.records",
    "Rejection": "zflora_compile.graph.records",
    "FuseAdaptersPass": "zflora_compile.onnx_pass",
}

__all__ = [
    "__version__",
    "detect_adapters",
    "fuse_adapters",
    "FuseAdaptersPass",
    "AdapterSite",
    "Rejection",
    "ZcompileError",
    "InputError",
    "VerificationError",
    "DependencyError",
    "EnvironmentProblem",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'zflora_compile' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
