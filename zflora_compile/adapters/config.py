"""``AdapterConfig`` and the base-model fingerprint stored with a saved adapter."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import operator

FAMILIES = ("ffa", "fba", "ffba", "zflora")
TARGETS = ("both", "attention", "mlp")
ZFLORA_EMBEDDINGS = ("zeros", "learned")
DTYPES = ("float32", "float16", "bfloat16")

# Config fields that decide the shapes and the function of a Llama-family decoder.  The hash is
# taken over these only, so that bookkeeping fields (``_name_or_path``, ``transformers_version``,
# ``dtype``, ``use_cache``...) do not make an adapter unloadable.
BASE_CONFIG_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "attention_bias",
    "mlp_bias",
    "tie_word_embeddings",
    "sliding_window",
    "use_sliding_window",
)


@dataclasses.dataclass
class AdapterConfig:
    """What to attach: the family, its rank and scale, where, and in which dtype.

    ``family``: ``"ffa"`` (parallel adapter across a block's core), ``"fba"`` (across a block
    boundary into the next block's entry projections), ``"ffba"`` (both), ``"zflora"`` (the
    residual stream widened by ``rank`` lanes).  ``target``: the blocks that carry adapters,
    ``"attention"``, ``"mlp"`` or ``"both"``.  ``layers``: decoder layer indices (``None``: all).
    ``alpha``: the scale is ``alpha / rank``.  ``dtype``: the adapter weights' dtype
    (``None``: the base model's).  ``zflora_embedding``: the extra residual lanes at the
    embedding, ``"zeros"`` or a ``"learned"`` table (zFLoRA only).
    """

    family: str
    rank: int = 8
    alpha: float = 16.0
    target: str = "both"
    layers: list[int] | None = None
    dtype: str | None = None
    zflora_embedding: str = "zeros"

    def __post_init__(self):
        self.family = str(self.family).lower()
        if self.family not in FAMILIES:
            raise ValueError(f"unknown adapter family {self.family!r}; expected one of {FAMILIES}")
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}; expected one of {TARGETS}")
        try:
            rank = operator.index(self.rank)
        except TypeError:
            rank = 0
        if isinstance(self.rank, bool) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {self.rank!r}")
        self.rank = rank
        self.alpha = float(self.alpha)
        if self.layers is not None:
            self.layers = sorted({int(i) for i in self.layers})
        if self.dtype is not None:
            self.dtype = str(self.dtype).removeprefix("torch.")
            if self.dtype not in DTYPES:
                raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {DTYPES} or None")
        if self.zflora_embedding not in ZFLORA_EMBEDDINGS:
            raise ValueError(f"unknown zflora_embedding {self.zflora_embedding!r}; expected one of {ZFLORA_EMBEDDINGS}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def blocks(self) -> tuple[str, ...]:
        return ("attention", "mlp") if self.target == "both" else (self.target,)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AdapterConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def base_config_fields(config) -> dict:
    """The architecture-defining fields of a ``transformers`` config, JSON-normalised."""
    fields = {}
    for name in BASE_CONFIG_FIELDS:
        value = getattr(config, name, None)
        if value is not None:
            fields[name] = json.loads(json.dumps(value, sort_keys=True, default=str))
    return fields


def base_config_hash(config) -> str:
    """sha256 of the canonical JSON of ``base_config_fields(config)``."""
    blob = json.dumps(base_config_fields(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()
