"""zflora-compile: find adapter subgraphs in LLM graphs, fuse or merge them exactly, verify.

Python API::

    from zflora_compile import detect_adapters, fuse_adapters
    sites = detect_adapters(model)                  # IR-neutral AdapterSite records
    fused = fuse_adapters(model, strategy="fuse")   # same type out as in

    FuseAdaptersPass("fuse")(ir_model)              # an onnx-ir pass (in place, verified)
"""

from __future__ import annotations

from zflora_compile._version import __version__

from zflora_compile.api import detect_adapters, fuse_adapters  # noqa: E402
from zflora_compile.errors import DependencyError, InputError, VerificationError, ZcompileError  # noqa: E402
from zflora_compile.graph.records import AdapterSite, Rejection  # noqa: E402
from zflora_compile.onnx_pass import FuseAdaptersPass  # noqa: E402

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
]
