"""GAWS and GAWS-D: adapters whose weight update is a Kronecker product with an identity.

Weights are in right-multiplication layout (``t @ W`` with ``W: [in, out]``; a torch Linear
stores ``weight = W.T``).  Both wrappers keep the frozen ``nn.Linear`` as a child named
``base_layer`` (bias included) and add the adapter output to its output:

- ``GawsLinear`` (grouped adaptive weight sharing): one shared block ``V: [s_in, s_out]`` for
  ``g`` groups, ``in = g * s_in``, ``out = g * s_out``.  The input is cut into ``g`` chunks of
  ``s_in`` lanes, each chunk is multiplied by the same ``V``, the chunks are put back together::

      y = x @ W + b + s * reshape(reshape(x, [..., g, s_in]) @ V, [..., g * s_out])
      dW = s * kron(I_g, V)                      (block diagonal, g identical blocks)

  ``diag=True`` adds a learned vector ``d`` (``s_in`` entries, init 1) scaling V's rows:
  ``V' = diag(d) @ V``.

- ``GawsDLinear`` (GAWS-D): a small matrix ``G: [g_out, g_in]`` mixes blocks of ``block`` lanes,
  ``in = g_in * block``, ``out = g_out * block``::

      y = x @ W + b + s * reshape(G @ reshape(x, [..., g_in, block]), [..., g_out * block])
      dW = s * kron(G^T, I_block)

  ``diag=True`` adds a learned vector (``g_in`` entries, init 1) scaling G's columns:
  ``G' = G @ diag(d)``.

``V`` / ``G`` start at zero, so a freshly attached model computes the base model's function
exactly.  ``forward`` is plain reshape / matmul / reshape code (the leading axes are kept as
they are, nothing is flattened over tokens), so ``torch.export`` and
``torch.onnx.export(dynamo=True)`` trace it.  See docs/gaws.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

__all__ = [
    "DEFAULT_GAWS_TARGETS",
    "GAWS_KINDS",
    "GawsDLinear",
    "GawsLinear",
    "attach_gaws",
    "build_gaws_model",
    "gaws_parameters",
    "pick_factor",
    "randomize_gaws",
]

GAWS_KINDS = ("gaws", "gaws_d")
DEFAULT_GAWS_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The automatic rule aims at this many groups (GAWS) / lanes per block (GAWS-D).
DEFAULT_FACTOR = 8
_PREFIX = "gaws_"


def _check_linear(base: nn.Module, what: str) -> nn.Linear:
    if not isinstance(base, nn.Linear):
        raise TypeError(f"{what} wraps an nn.Linear, got {type(base).__name__}")
    return base


def _check_factor(value: int, base: nn.Linear, arg: str, name: str | None) -> int:
    where = f"module {name!r}" if name else "the base Linear"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{arg} must be a positive int, got {value!r} (for {where})")
    bad = [f"{label}={n}" for label, n in (("in_features", base.in_features), ("out_features", base.out_features)) if n % value]
    if bad:
        raise ValueError(
            f"{arg}={value} must divide both in_features and out_features of {where} "
            f"(in={base.in_features}, out={base.out_features}); it does not divide {', '.join(bad)}. "
            f"Divisors of gcd(in, out)={math.gcd(base.in_features, base.out_features)} are valid."
        )
    return value


def pick_factor(in_features: int, out_features: int, target: int = DEFAULT_FACTOR, *, name: str = "module") -> int:
    """The automatic groups (GAWS) / block (GAWS-D) of one Linear.

    The largest divisor of ``gcd(in_features, out_features)`` that is at most ``target``.  It
    divides both widths by construction.  A result of 1 is refused (``ValueError``): it would
    make ``V`` / ``G`` a dense ``in x out`` matrix, with no weight sharing at all.
    """
    common = math.gcd(in_features, out_features)
    factor = max(d for d in range(1, min(common, target) + 1) if common % d == 0)
    if factor < 2:
        raise ValueError(
            f"{name}: no factor > 1 divides both in_features={in_features} and out_features={out_features} "
            f"(gcd {common}); GAWS / GAWS-D cannot share weights here: leave it out of the targets"
        )
    return factor


class _GawsBase(nn.Module):
    def __init__(self, base: nn.Linear, scale: float):
        super().__init__()
        self.base_layer = base
        self.scale = float(scale)
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def _scaled(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.scale == 1.0 else y * self.scale


class GawsLinear(_GawsBase):
    """``base(x) + s * reshape(reshape(x, [..., g, s_in]) @ V, [..., g * s_out])``; ``dW = s * kron(I_g, V)``.

    Parameters ``gaws_V: [s_in, s_out]`` (zero init) and, with ``diag``, ``gaws_diag: [s_in]``
    (ones), which scales V's rows.
    """

    def __init__(self, base: nn.Linear, groups: int, diag: bool = False, scale: float = 1.0, *, name: str | None = None):
        base = _check_linear(base, "GawsLinear")
        super().__init__(base, scale)
        self.groups = _check_factor(groups, base, "groups", name)
        self.s_in = base.in_features // groups
        self.s_out = base.out_features // groups
        self.diag = bool(diag)
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.gaws_V = nn.Parameter(torch.zeros(self.s_in, self.s_out, **kw))
        self.gaws_diag = nn.Parameter(torch.ones(self.s_in, **kw)) if self.diag else None

    def block(self) -> torch.Tensor:
        """The shared block in use: ``V``, or ``diag(d) @ V``."""
        v = self.gaws_V
        return v if self.gaws_diag is None else self.gaws_diag.unsqueeze(-1) * v

    def delta_weight(self) -> torch.Tensor:
        """Dense ``dW: [in, out]`` (right-multiplication layout), ``s * kron(I_g, V')``."""
        eye = torch.eye(self.groups, dtype=self.gaws_V.dtype, device=self.gaws_V.device)
        return torch.kron(eye, self.block()) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        chunks = x.reshape(x.shape[:-1] + (self.groups, self.s_in))
        y = torch.matmul(chunks, self.block())
        y = y.reshape(x.shape[:-1] + (self.groups * self.s_out,))
        return out + self._scaled(y)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, block=[{self.s_in}, {self.s_out}], diag={self.diag}, scale={self.scale}"


class GawsDLinear(_GawsBase):
    """``base(x) + s * reshape(G @ reshape(x, [..., g_in, b]), [..., g_out * b])``; ``dW = s * kron(G^T, I_b)``.

    Parameters ``gaws_G: [g_out, g_in]`` (zero init) and, with ``diag``, ``gaws_diag: [g_in]``
    (ones), which scales G's columns.
    """

    def __init__(self, base: nn.Linear, block: int, diag: bool = False, scale: float = 1.0, *, name: str | None = None):
        base = _check_linear(base, "GawsDLinear")
        super().__init__(base, scale)
        self.block_size = _check_factor(block, base, "block", name)
        self.g_in = base.in_features // block
        self.g_out = base.out_features // block
        self.diag = bool(diag)
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.gaws_G = nn.Parameter(torch.zeros(self.g_out, self.g_in, **kw))
        self.gaws_diag = nn.Parameter(torch.ones(self.g_in, **kw)) if self.diag else None

    def mixer(self) -> torch.Tensor:
        """The block mixer in use: ``G``, or ``G @ diag(d)``."""
        g = self.gaws_G
        return g if self.gaws_diag is None else g * self.gaws_diag

    def delta_weight(self) -> torch.Tensor:
        """Dense ``dW: [in, out]`` (right-multiplication layout), ``s * kron(G'^T, I_b)``."""
        eye = torch.eye(self.block_size, dtype=self.gaws_G.dtype, device=self.gaws_G.device)
        return torch.kron(self.mixer().T.contiguous(), eye) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        blocks = x.reshape(x.shape[:-1] + (self.g_in, self.block_size))
        y = torch.matmul(self.mixer(), blocks)
        y = y.reshape(x.shape[:-1] + (self.g_out * self.block_size,))
        return out + self._scaled(y)

    def extra_repr(self) -> str:
        return f"block={self.block_size}, G=[{self.g_out}, {self.g_in}], diag={self.diag}, scale={self.scale}"


def _factor_for(spec, target: str, base: nn.Linear, arg: str, name: str) -> int:
    """Resolve ``groups`` / ``block``: None -> :func:`pick_factor`; an int or {target: int} is used as given."""
    if isinstance(spec, Mapping):
        spec = spec.get(target)
    if spec is None:
        return pick_factor(base.in_features, base.out_features, name=name)
    return spec


def attach_gaws(
    model: nn.Module,
    kind: str = "gaws",
    targets: Iterable[str] = DEFAULT_GAWS_TARGETS,
    *,
    groups: int | Mapping[str, int] | None = None,
    block: int | Mapping[str, int] | None = None,
    diag: bool = False,
    scale: float = 1.0,
) -> nn.Module:
    """Wrap the ``targets`` Linears of every decoder layer of a Llama-family causal LM in place.

    ``kind="gaws"`` uses ``groups``, ``kind="gaws_d"`` uses ``block``.  Each may be ``None``
    (default: per module, the largest divisor of ``gcd(in, out)`` that is at most 8, see
    :func:`pick_factor`), one int for every target, or a ``{target name: int}`` mapping (missing
    names fall back to the automatic rule).  A given value must divide both ``in_features`` and
    ``out_features`` of each module it is used on, else ``ValueError`` naming the module.
    Every base parameter is frozen; only the GAWS parameters train.  Returns ``model``.
    """
    if kind not in GAWS_KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {GAWS_KINDS}")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError("expected a Hugging Face *ForCausalLM with .model.layers (Llama / Mistral / Qwen2 structure)")
    # Resolve and validate every module before changing any, so a bad value leaves the model untouched.
    plan = []
    for i, layer in enumerate(layers):
        for name, module in layer.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in targets:
                continue
            full = f"model.layers.{i}.{name}"
            if isinstance(module, _GawsBase):
                raise ValueError(f"{full} already has a GAWS adapter")
            if not isinstance(module, nn.Linear):
                continue
            spec = groups if kind == "gaws" else block
            factor = _factor_for(spec, leaf, module, "groups" if kind == "gaws" else "block", full)
            _check_factor(factor, module, "groups" if kind == "gaws" else "block", full)
            parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
            plan.append((parent, leaf, module, factor, full))
    if not plan:
        raise ValueError(f"no nn.Linear named one of {targets} in model.model.layers")
    for param in model.parameters():
        param.requires_grad_(False)
    cls = GawsLinear if kind == "gaws" else GawsDLinear
    for parent, leaf, module, factor, full in plan:
        setattr(parent, leaf, cls(module, factor, diag=diag, scale=scale, name=full))
    return model


def gaws_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The GAWS parameters (``gaws_V`` / ``gaws_G`` and the diag vectors): what an optimizer should get."""
    return [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1].startswith(_PREFIX)]


def randomize_gaws(model: nn.Module, seed: int = 0, *, std: float = 0.05) -> nn.Module:
    """Seeded non-trivial values: ``V`` / ``G`` ~ N(0, std^2), diag vectors 1 + N(0, std^2). For tests."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted((n, p) for n, p in model.named_parameters() if n.rsplit(".", 1)[-1].startswith(_PREFIX)):
            values = torch.randn(param.shape, generator=gen, dtype=torch.float32) * std
            if name.endswith("gaws_diag"):
                values += 1.0
            param.copy_(values.to(param.dtype))
    return model


def build_gaws_model(
    kind: str = "gaws",
    arch: str = "llama",
    *,
    seed: int = 0,
    groups: int | Mapping[str, int] | None = None,
    block: int | Mapping[str, int] | None = None,
    diag: bool = False,
    scale: float = 1.0,
    targets: Iterable[str] = DEFAULT_GAWS_TARGETS,
    dtype=torch.float32,
    **config_kwargs,
) -> nn.Module:
    """``zoo.build_base_model(arch, seed=seed, **config_kwargs)`` with GAWS attached and randomized
    (seed ``seed + 1``), in ``dtype`` and eval mode."""
    from zflora_compile import zoo

    model = zoo.build_base_model(arch, seed=seed, **config_kwargs)
    attach_gaws(model, kind, targets, groups=groups, block=block, diag=diag, scale=scale)
    randomize_gaws(model, seed + 1)
    return model.to(dtype).eval()
