"""The torch modules that carry the adapters: wrappers around a frozen base module (PEFT style:
the base module stays a child named ``base_layer``) whose ``forward`` is plain tensor code, so
``torch.export`` and the dynamo ONNX exporter trace it like any other module.  The token
embedding and the LM head are not wrapped (their weights may be tied): their adapters are child
modules applied by forward hooks, which the exporters trace as well.

Adapter weights are ``nn.Linear(bias=False)`` children named ``<part>_A`` / ``<part>_B``
(``part`` in ``ffa``, ``fba``, ``zflora``), plus ``zflora_E`` (the learned embedding lanes).
An ``A`` reads a projection's input and has ``rank`` outputs; a ``B`` reads ``rank`` lanes and
its output, times the scale ``s``, is added to a projection's output.

FFA and FBA paths cross module boundaries (FFA: the entry projection's input reaches the exit
projection's output; FBA: an exit projection's input reaches the next block's entry
projections).  The low-rank activation ``z = x @ A`` is handed from the producing wrapper to the
reading wrappers through a ``Carrier``: a dict that lives for one forward pass of the whole
model (it is cleared before and after each call by hooks on the top-level model).  zFLoRA uses
it once, to hand the LM head's extra input lanes from its pre-hook to its hook.  During
tracing it holds the traced tensors, so the exported graph has the plain data edge
producer -> consumer and no state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER_PARTS = ("ffa_A", "ffa_B", "fba_A", "fba_B", "zflora_A", "zflora_B", "zflora_E")


class Carrier:
    """Low-rank activations handed between wrappers within one forward pass."""

    def __init__(self):
        self.values: dict[str, torch.Tensor] = {}

    def clear(self) -> None:
        self.values.clear()

    def put(self, key: str, value: torch.Tensor) -> None:
        self.values[key] = value

    def get(self, key: str) -> torch.Tensor:
        try:
            return self.values[key]
        except KeyError:
            raise RuntimeError(
                f"adapter activation {key!r} was not produced earlier in this forward pass. FFA/FBA adapters "
                "hand a low-rank activation from one projection to another: call the whole model (not a single "
                "layer), and do not use gradient checkpointing with 'fba'/'ffba' (the recomputed layer would "
                "need an activation of the layer before it)."
            ) from None


def low_rank(in_features: int, out_features: int, *, zero: bool, dtype) -> nn.Linear:
    """An adapter matrix as a bias-free Linear: zero, or nn.Linear's default (Kaiming-uniform) init."""
    layer = nn.Linear(in_features, out_features, bias=False, dtype=dtype)
    if zero:
        nn.init.zeros_(layer.weight)
    return layer


def _apply(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run an adapter matrix on ``x`` in the adapter's dtype (a no-op cast when they agree)."""
    return module(x.to(module.weight.dtype))


def _scaled(y: torch.Tensor, scale: float) -> torch.Tensor:
    return y if scale == 1.0 else y * scale


class AdaptedLinear(nn.Module):
    """A frozen ``nn.Linear`` (``base_layer``) with adapter roles.

    - producer (FFA/FBA ``A``): ``carrier[key] = x @ A``;
    - reader (FFA/FBA ``B``): ``out += s * (carrier[key] @ B)``;
    - zFLoRA entry: the input has ``d + r`` lanes; ``out = x[..., :d] @ W (+ s * x[..., d:] @ B)``;
    - zFLoRA exit: ``out = concat(x @ W, x @ A)`` (or ``x @ W`` padded with ``r`` zero lanes
      where this block carries no adapter).
    """

    def __init__(self, base_layer: nn.Linear, carrier: Carrier):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.carrier = carrier
        self.produces: list[tuple[str, str]] = []  # (carrier key, child name)
        self.reads: list[tuple[str, str, float]] = []  # (carrier key, child name, scale)
        self.lanes_in = 0  # zFLoRA: extra input lanes (cut away, or read by zflora_B)
        self.lanes_out = 0  # zFLoRA: extra output lanes (zflora_A, or zeros)
        self.zflora_scale = 1.0

    # Code that inspects a projection's weight (dtype, device) keeps working, as with PEFT.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def add_producer(self, part: str, key: str, rank: int, dtype) -> None:
        name = f"{part}_A"
        self.add_module(name, low_rank(self.in_features, rank, zero=False, dtype=dtype))
        self.produces.append((key, name))

    def add_reader(self, part: str, key: str, rank: int, scale: float, dtype) -> None:
        name = f"{part}_B"
        self.add_module(name, low_rank(rank, self.out_features, zero=True, dtype=dtype))
        self.reads.append((key, name, scale))

    def widen_input(self, lanes: int, scale: float | None = None, dtype=None) -> None:
        """zFLoRA entry: accept ``d + lanes`` inputs; with ``scale``, read the lanes through ``zflora_B``."""
        self.lanes_in = lanes
        if scale is not None:
            # B starts random and A (the writers of the lanes) starts at zero: see docs/adapters.md.
            self.add_module("zflora_B", low_rank(lanes, self.out_features, zero=False, dtype=dtype))
            self.zflora_scale = scale

    def widen_output(self, lanes: int, adapted: bool, dtype=None) -> None:
        """zFLoRA exit: emit ``lanes`` extra outputs, from ``zflora_A`` or zeros."""
        self.lanes_out = lanes
        if adapted:
            self.add_module("zflora_A", low_rank(self.in_features, lanes, zero=True, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_in = x[..., : self.in_features] if self.lanes_in else x
        out = self.base_layer(base_in)
        for key, name in self.produces:
            self.carrier.put(key, _apply(getattr(self, name), base_in))
        for key, name, scale in self.reads:
            out = out + _scaled(_apply(getattr(self, name), self.carrier.get(key)), scale).to(out.dtype)
        if self.lanes_in and hasattr(self, "zflora_B"):
            lanes = x[..., self.in_features :]
            out = out + _scaled(_apply(self.zflora_B, lanes), self.zflora_scale).to(out.dtype)
        if self.lanes_out:
            if hasattr(self, "zflora_A"):
                out = torch.cat([out, _apply(self.zflora_A, base_in).to(out.dtype)], dim=-1)
            else:
                out = F.pad(out, (0, self.lanes_out))
        return out

    def extra_repr(self) -> str:
        roles = [f"produces {k}" for k, _ in self.produces] + [f"reads {k} (s={s:g})" for k, _, s in self.reads]
        if self.lanes_in:
            roles.append(f"zflora reads {self.lanes_in} lanes" if hasattr(self, "zflora_B") else f"cuts {self.lanes_in} lanes")
        if self.lanes_out:
            roles.append(f"zflora writes {self.lanes_out} lanes" if hasattr(self, "zflora_A") else f"pads {self.lanes_out} zero lanes")
        return ", ".join(roles)


class WidenedRMSNorm(nn.Module):
    """zFLoRA: a Llama-style RMSNorm run over ``d + r`` lanes.

    The mean square is taken over all ``d + r`` lanes with epsilon ``eps * d/(d+r)``; the weight
    is ``sqrt(d/(d+r)) * [w ; 1]`` (``w`` the frozen base weight).  While the extra lanes are
    zero this equals the base norm on the base lanes exactly (up to fp rounding):
    ``sqrt(c) * w * x / sqrt(c * (ms + eps)) = w * x / sqrt(ms + eps)`` with ``c = d/(d+r)``.
    """

    def __init__(self, base_layer: nn.Module, lanes: int):
        super().__init__()
        weight = base_layer.weight
        eps = getattr(base_layer, "variance_epsilon", getattr(base_layer, "eps", None))
        if weight is None or weight.dim() != 1 or eps is None:
            raise ValueError(f"zFLoRA expects a Llama-style RMSNorm (weight [d], variance_epsilon), got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.hidden_size = weight.shape[0]
        self.lanes = lanes
        ratio = self.hidden_size / (self.hidden_size + lanes)
        self.weight_scale = math.sqrt(ratio)
        self.variance_epsilon = float(eps) * ratio
        self.register_buffer("lane_weight", torch.full((lanes,), self.weight_scale, dtype=weight.dtype), persistent=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.variance_epsilon)
        weight = torch.cat([self.base_layer.weight * self.weight_scale, self.lane_weight.to(self.base_layer.weight.dtype)])
        return weight * h.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}+{self.lanes} lanes, eps={self.variance_epsilon:g}"


# The token embedding and the LM head stay the model's own modules (their weights may be tied,
# and transformers' tie_weights / save_pretrained look them up by name); their adapters are
# children of them, applied by forward hooks.  Hook state lives on the module, so deep copies
# and pickles keep working.


def widen_embedding(embedding: nn.Embedding, lanes: int, *, learned: bool, dtype) -> None:
    """zFLoRA: the embedding's output gains ``lanes`` lanes, zeros or a learned table ``zflora_E``."""
    embedding.zflora_lanes = lanes
    if learned:
        # Zero at creation: the lanes must start at zero for the base model to be unchanged.
        embedding.zflora_E = nn.Embedding(embedding.num_embeddings, lanes, dtype=dtype)
        nn.init.zeros_(embedding.zflora_E.weight)
    embedding.register_forward_hook(_widen_embedding_output)


def _widen_embedding_output(module, args, output):
    if hasattr(module, "zflora_E"):
        return torch.cat([output, module.zflora_E(args[0]).to(output.dtype)], dim=-1)
    return F.pad(output, (0, module.zflora_lanes))


def adapt_lm_head(lm_head: nn.Linear, carrier: Carrier, *, part: str, key: str | None, rank: int, scale: float, zero: bool, dtype) -> None:
    """Add ``s * (z @ B)`` to the LM head's output.

    FBA (``key`` given): ``z`` is the last layer's MLP-side activation from the carrier.  zFLoRA
    (``key=None``): the LM head reads ``d + rank`` lanes; the base lanes go to the head's own
    weight and ``z`` is the extra lanes.
    """
    name = f"{part}_B"
    lm_head.add_module(name, low_rank(rank, lm_head.out_features, zero=zero, dtype=dtype))
    lm_head.adapter_carrier = carrier
    lm_head.adapter_read = (key or "lm_head.zflora_lanes", name, scale)
    if key is None:
        lm_head.register_forward_pre_hook(_cut_lm_head_lanes)
    lm_head.register_forward_hook(_add_lm_head_adapter)


def _cut_lm_head_lanes(module, args):
    x = args[0]
    module.adapter_carrier.put(module.adapter_read[0], x[..., module.in_features :])
    return (x[..., : module.in_features], *args[1:])


def _add_lm_head_adapter(module, args, output):
    key, name, scale = module.adapter_read
    z = module.adapter_carrier.get(key)
    if z.shape[-2] != output.shape[-2]:
        z = z[..., -output.shape[-2] :, :]  # the head saw only the last positions (logits_to_keep)
    return output + _scaled(_apply(getattr(module, name), z), scale).to(output.dtype)
