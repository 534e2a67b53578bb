"""Tiny adapted Llama-family test models and ONNX exporters.

Builders for seeded, randomly initialised ``transformers`` decoders (no model hub
access needed), PEFT LoRA adapters with non-zero B matrices, and an ONNX export
helper covering the three torch exporters.  Used by the tests, examples and
benchmarks; needs the optional torch extra.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import warnings

import onnx

try:
    import torch
    import transformers
    from peft import BdLoraConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, VeraConfig, get_peft_model
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "zflora_compile.zoo needs the torch extra: pip install torch==2.13.0 transformers peft"
    ) from exc

__all__ = [
    "ALL_TARGETS",
    "ARCHS",
    "EXPORTERS",
    "PEFT_SPELLINGS",
    "PEFT_VARIANTS",
    "build_base_model",
    "build_lora_model",
    "build_peft_spelling",
    "build_peft_variant",
    "adapted_module_count",
    "export_onnx",
    "export_program",
    "tiny_config",
]

ARCHS = ("llama", "mistral", "qwen2", "phi3")
EXPORTERS = ("dynamo", "dynamo-noopt", "torchscript")

_SPLIT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALL_TARGETS: dict[str, list[str]] = {
    "llama": list(_SPLIT_TARGETS),
    "mistral": list(_SPLIT_TARGETS),
    "qwen2": list(_SPLIT_TARGETS),
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}

_CONFIG_CLASSES = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "phi3": "Phi3Config",
}
# Per-arch defaults that keep the tiny configs self-consistent (no sliding
# window, no out-of-vocab special token ids).
_ARCH_DEFAULTS = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {"use_sliding_window": False},
    "phi3": {"pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2},
}
_OPSET = {"dynamo": 20, "dynamo-noopt": 20, "torchscript": 18}
# Protobuf caps a file at 2 GB: bigger dynamo exports keep their weights in ``<path>.data``.
_INLINE_WEIGHT_BYTES = 1_500_000_000
_LORA_B_STD = 0.05


def tiny_config(
    arch: str = "llama",
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 128,
    **overrides,
):
    """Return a tiny ``PretrainedConfig`` for ``arch`` (eager attention, 256 positions)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    kwargs = dict(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        attn_implementation="eager",
        **_ARCH_DEFAULTS[arch],
    )
    kwargs.update(overrides)
    return getattr(transformers, _CONFIG_CLASSES[arch])(**kwargs)


@contextlib.contextmanager
def _quiet():
    """Silence warnings and INFO/WARNING exporter log lines; errors still propagate."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch's CPU RNG for the block without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _random_model(arch: str, seed: int, config_kwargs: dict):
    config = tiny_config(arch, **config_kwargs)
    with _seeded(seed):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def build_base_model(arch: str = "llama", *, seed: int = 0, dtype=torch.float32, **config_kwargs):
    """Build a seeded random-weight causal LM for ``arch`` in eval mode."""
    return _random_model(arch, seed, config_kwargs).to(dtype).eval()


def _randomize_lora(model, seed: int) -> None:
    """Give every LoRA A/B matrix seeded Gaussian values (B is zero after PEFT init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".lora_A." in name:
                param.normal_(0.0, param.shape[1] ** -0.5, generator=gen)
            elif ".lora_B." in name:
                param.normal_(0.0, _LORA_B_STD, generator=gen)


def build_lora_model(
    arch: str = "llama",
    *,
    r: int = 4,
    alpha: float = 8,
    targets=None,
    layers=None,
    rank_pattern=None,
    alpha_pattern=None,
    use_rslora: bool = False,
    seed: int = 0,
    dtype=torch.float32,
    adapter_dtype=None,
    **config_kwargs,
):
    """Wrap ``build_base_model(arch, seed=seed)`` (same base weights) in a PEFT LoRA adapter, eval mode.

    ``targets`` defaults to ``ALL_TARGETS[arch]``; ``layers`` is PEFT's
    ``layers_to_transform``.  A/B are re-drawn from a generator seeded with
    ``seed`` (A ~ N(0, 1/in), B ~ N(0, 0.05^2)), so the adapter visibly changes
    the logits.  ``adapter_dtype`` (default ``dtype``) keeps the LoRA weights in
    another dtype, like PEFT's ``autocast_adapter_dtype`` does for fp16 bases.
    """
    base = _random_model(arch, seed, config_kwargs)
    lora_config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=[targets] if isinstance(targets, str) else list(targets or ALL_TARGETS[arch]),
        layers_to_transform=layers,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        use_rslora=use_rslora,
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=False,
    )
    with _quiet():
        model = get_peft_model(base, lora_config)
    _randomize_lora(model, seed)
    model.to(dtype)
    if adapter_dtype is not None:
        for name, module in model.named_modules():
            if name.endswith((".lora_A", ".lora_B")):
                module.to(adapter_dtype)
    return model.eval()


PEFT_VARIANTS = ("dora", "bdlora", "lokr", "loha", "vera", "ia3", "embedding", "two_loras")

_ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Multiplicative adapter parameters (ones-like at init): perturbed as p * (1 + 0.1 N(0, 1)).
_SCALE_PARAMS = ("lora_magnitude_vector", "ia3_l", "vera_lambda_d")
# Zero-init "B-like" factors: N(0, 0.05^2).  Everything else: N(0, 1/fan_in).
_SMALL_PARAMS = ("lora_B", "lora_embedding_B", "vera_lambda_b")


def _variant_configs(kind: str, arch: str, r: int) -> list:
    """(adapter name, PEFT config) pairs for one ``PEFT_VARIANTS`` kind."""
    targets = list(ALL_TARGETS[arch])
    lora = dict(r=r, lora_alpha=2 * r, lora_dropout=0.0, bias="none")
    if kind == "dora":
        return [("default", LoraConfig(target_modules=targets, use_dora=True, **lora))]
    if kind == "bdlora":
        # BdLoraConfig's guideline: column-sharded q/k/v/gate/up -> block-diagonal B; row-sharded o/down -> A.
        bd = BdLoraConfig(
            target_modules_bd_a=["o_proj", "down_proj"],
            target_modules_bd_b=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"],
            nblocks=2,
        )
        return [("default", LoraConfig(target_modules=targets, use_bdlora=bd, **lora))]
    if kind == "lokr":
        return [("default", LoKrConfig(r=r, alpha=2 * r, target_modules=targets, init_weights=False))]
    if kind == "loha":
        return [("default", LoHaConfig(r=r, alpha=2 * r, target_modules=targets, init_weights=False))]
    if kind == "vera":  # one shared A/B pair: targets must share a shape (k/v differ from q under GQA)
        return [("default", VeraConfig(r=r, target_modules=["q_proj", "o_proj"], vera_dropout=0.0))]
    if kind == "ia3":
        return [("default", IA3Config(target_modules=_ATTN_MLP, feedforward_modules=["down_proj"]))]
    if kind == "embedding":
        return [("default", LoraConfig(target_modules=["embed_tokens", "q_proj"], **lora))]
    if kind == "two_loras":
        return [(name, LoraConfig(target_modules=["q_proj", "v_proj"], **lora)) for name in ("a", "b")]
    raise ValueError(f"unknown PEFT variant {kind!r}; expected one of {PEFT_VARIANTS}")


def _randomize_adapter(model, seed: int) -> None:
    """Seeded non-trivial values for every adapter parameter (PEFT zero-inits B and friends)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if not param.requires_grad:  # base weights are frozen by get_peft_model
                continue
            if any(key in name for key in _SCALE_PARAMS):
                param.mul_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            elif any(f".{key}." in name or name.endswith(f".{key}") for key in _SMALL_PARAMS):
                param.normal_(0.0, _LORA_B_STD, generator=gen)
            else:
                param.normal_(0.0, param.shape[-1] ** -0.5, generator=gen)


def build_peft_variant(kind: str, arch: str = "llama", *, r: int = 4, seed: int = 0, dtype=torch.float32, **config_kwargs):
    """Wrap ``build_base_model(arch, seed=seed)`` in a non-LoRA-classic PEFT adapter of ``kind``, eval mode.

    ``kind`` is one of ``PEFT_VARIANTS``: DoRA and BD-LoRA (2 blocks) on every
    projection, LoKr / LoHa / (IA)^3 on the attention and MLP projections, VeRA
    on q_proj/o_proj, LoRA on ``embed_tokens`` + q_proj, or two LoRA adapters
    ``a`` and ``b`` on q_proj/v_proj active together.  Every adapter parameter is
    re-drawn from a generator seeded with ``seed`` (scale-like vectors, DoRA's
    magnitude included, are multiplied by 1 + 0.1 N(0, 1)).
    """
    if arch not in ALL_TARGETS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    configs = _variant_configs(kind, arch, r)
    base = _random_model(arch, seed, config_kwargs)
    with _quiet(), _seeded(seed):
        name, config = configs[0]
        model = get_peft_model(base, config, adapter_name=name)
        for name, config in configs[1:]:
            model.add_adapter(name, config)
        if len(configs) > 1:
            model.base_model.set_adapter([name for name, _ in configs])
    _randomize_adapter(model, seed)
    return model.to(dtype).eval()


PEFT_SPELLINGS = ("autocast_fp16", "autocast_bf16", "conv1d", "lora_bias")
_GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]  # c_proj: attention's and the MLP's


def tiny_gpt2_config(*, n_embd: int = 64, n_layer: int = 1, n_head: int = 4, vocab_size: int = 128, **overrides):
    """A tiny ``GPT2Config`` (eager attention, 128 positions, in-vocabulary special tokens)."""
    kwargs = dict(
        n_embd=n_embd, n_layer=n_layer, n_head=n_head, vocab_size=vocab_size, n_positions=128,
        bos_token_id=1, eos_token_id=2, attn_implementation="eager",
    )
    kwargs.update(overrides)
    return transformers.GPT2Config(**kwargs)


def build_peft_spelling(kind: str, *, r: int = 4, alpha: float = 6, seed: int = 0, num_hidden_layers: int = 1, disabled: bool = False):
    """A PEFT LoRA model written in one of PEFT's spellings other than the plain fp32 ``Linear``, eval mode.

    ``kind`` is one of ``PEFT_SPELLINGS``:

    * ``autocast_fp16`` / ``autocast_bf16``: a Llama base in fp16 / bf16 with LoRA on every
      projection under PEFT's default ``autocast_adapter_dtype=True`` (A and B stay fp32; the
      forward casts ``x`` up, adds in fp32 and casts the sum back);
    * ``conv1d``: GPT-2 (``Conv1D``, weight ``[in, out]``, ``addmm``) with ``fan_in_fan_out=True``
      LoRA on ``c_attn``, both ``c_proj`` and ``c_fc``;
    * ``lora_bias``: a Llama base with biased projections (``attention_bias``, ``mlp_bias``) and
      ``lora_bias=True`` (a bias on every ``lora_B``) on every projection.

    Every adapter parameter is re-drawn from a generator seeded with ``seed`` (A ~ N(0, 1/in),
    B and B's bias ~ N(0, 0.05^2)), and so are the base projections' biases (N(0, 0.02^2); the
    models initialise them to zero). ``disabled``: the same model (same weights) whose forward
    skips the adapter, by PEFT's own switch -- the reference for ``strip``.
    """
    if kind not in PEFT_SPELLINGS:
        raise ValueError(f"unknown PEFT spelling {kind!r}; expected one of {PEFT_SPELLINGS}")
    lora = dict(r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", init_lora_weights=False)
    if kind == "conv1d":
        with _seeded(seed):
            base = transformers.GPT2LMHeadModel(tiny_gpt2_config(n_layer=num_hidden_layers))
        config = LoraConfig(target_modules=list(_GPT2_TARGETS), fan_in_fan_out=True, **lora)
    elif kind == "lora_bias":
        base = build_base_model("llama", seed=seed, num_hidden_layers=num_hidden_layers, attention_bias=True, mlp_bias=True)
        config = LoraConfig(target_modules=list(ALL_TARGETS["llama"]), lora_bias=True, **lora)
    else:
        dtype = torch.float16 if kind == "autocast_fp16" else torch.bfloat16
        base = build_base_model("llama", seed=seed, dtype=dtype, num_hidden_layers=num_hidden_layers)
        config = LoraConfig(target_modules=list(ALL_TARGETS["llama"]), **lora)  # autocast_adapter_dtype=True: PEFT's default
    with _quiet():
        model = get_peft_model(base.eval(), config)
    _randomize_adapter(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("base_layer.bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    if disabled:
        for module in model.modules():
            if hasattr(module, "enable_adapters") and hasattr(module, "lora_A"):
                module.enable_adapters(False)
    return model.eval()


def adapted_module_count(model) -> int:
    """How many modules of a PEFT model carry an active LoRA adapter (the sites a compile should find)."""
    return sum(1 for module in model.modules() if hasattr(module, "lora_A") and len(module.lora_A) and not module.disable_adapters)


class _ExportWrapper(torch.nn.Module):
    """Plain-tensor interface: (input_ids, attention_mask, *past k/v) -> (logits, *present k/v)."""

    def __init__(self, model, with_cache: bool):
        super().__init__()
        self.model = model
        self.with_cache = with_cache

    def forward(self, input_ids, attention_mask, *past):
        if not self.with_cache:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        cache = transformers.DynamicCache(list(zip(past[0::2], past[1::2])))
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True
        )
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def _io_names(num_layers: int, with_cache: bool):
    kv = [f"{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")] if with_cache else []
    inputs = ["input_ids", "attention_mask"] + [f"past_key_values.{x}" for x in kv]
    outputs = ["logits"] + [f"present.{x}" for x in kv]
    return inputs, outputs


def _example_inputs(config, dtype, *, seq_len, batch, past_len):
    """(input_ids, attention_mask, *past k/v); ``past_len=None`` means no cache inputs."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=gen)
    mask = torch.ones(batch, (past_len or 0) + seq_len, dtype=torch.int64)
    if past_len is None:
        return (ids, mask)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shape = (batch, config.num_key_value_heads, past_len, head_dim)
    past = [torch.randn(shape, generator=gen).to(dtype) for _ in range(2 * config.num_hidden_layers)]
    return (ids, mask, *past)


def _dynamic_axes(input_names, output_names, dynamic_batch: bool):
    """{io name: {axis: symbolic dim name}} for every input and output."""
    batch = {0: "batch"} if dynamic_batch else {}
    total = "total_sequence_length" if len(input_names) > 2 else "sequence_length"
    axes = {"input_ids": {**batch, 1: "sequence_length"}, "attention_mask": {**batch, 1: total}}
    axes["logits"] = {**batch, 1: "sequence_length"}
    axes.update({name: {**batch, 2: "past_sequence_length"} for name in input_names[2:]})
    axes.update({name: {**batch, 2: total} for name in output_names[1:]})
    return axes


def _dynamo_shapes(input_names, axes):
    """torch.export ``dynamic_shapes`` for ``_ExportWrapper.forward`` built from ``axes``."""
    dims = {}

    def spec(name):
        return {axis: dims.setdefault(sym, torch.export.Dim(sym)) for axis, sym in axes[name].items()}

    ids, mask, *past = (spec(name) for name in input_names)
    # forward(input_ids, attention_mask, *past): the varargs form one nested entry.
    return (ids, mask, tuple(past)) if past else (ids, mask)


def _finalize(path: pathlib.Path, axes, batch: int) -> None:
    """Check the inputs kept their symbolic axes; give outputs the same dim names on every exporter."""
    model = onnx.load(str(path), load_external_data=False)
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        fixed = [axis for axis in axes[value.name] if not dims[axis].dim_param]
        if fixed:
            raise RuntimeError(f"exporter specialised axes {fixed} of input {value.name!r}; use sizes >= 2")
    for value in model.graph.output:
        dims = value.type.tensor_type.shape.dim
        for axis, sym in axes[value.name].items():
            dims[axis].dim_param = sym
        if 0 not in axes[value.name]:
            dims[0].dim_value = batch
    onnx.save(model, str(path))


def _export(wrapper, args, path, exporter, input_names, output_names, axes) -> None:
    common = {
        "input_names": input_names,
        "output_names": output_names,
        "opset_version": _OPSET[exporter],
        "verbose": False,
    }
    if exporter == "torchscript":
        torch.onnx.export(wrapper, args, str(path), dynamo=False, dynamic_axes=axes, **common)
        return
    program = torch.onnx.export(
        wrapper,
        args,
        dynamo=True,
        optimize=exporter == "dynamo",
        dynamic_shapes=_dynamo_shapes(input_names, axes),
        **common,
    )
    weight_bytes = sum(p.numel() * p.element_size() for p in wrapper.parameters())
    program.save(str(path), external_data=weight_bytes > _INLINE_WEIGHT_BYTES)


def export_onnx(
    model,
    path,
    *,
    exporter: str = "dynamo",
    seq_len: int = 7,
    batch: int = 1,
    with_cache: bool = False,
    past_len: int = 3,
    dynamic_batch: bool = False,
) -> pathlib.Path:
    """Export ``model`` (HF causal LM or PeftModel, put in eval mode) to ONNX; return the file's path.

    Inputs ``input_ids`` [batch, seq], ``attention_mask`` [batch, past+seq] and,
    with ``with_cache``, ``past_key_values.{i}.key|value`` [batch, kv_heads, past,
    head_dim]; outputs ``logits`` and ``present.{i}.key|value``.  Sequence/past
    axes are symbolic (example sizes must be >= 2); batch only with
    ``dynamic_batch``.  ``exporter``: ``"dynamo"`` (optimised) or
    ``"dynamo-noopt"`` (opset 20), ``"torchscript"`` (opset 18).  Weights are
    inline (one file) unless over 1.5 GB (dynamo then writes ``<path>.data``).
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")
    if seq_len < 2 or (with_cache and past_len < 2):
        raise ValueError("seq_len and past_len must be >= 2: exporters specialise example sizes 0 and 1")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = model.config  # a PeftModel forwards .config to its base model
    dtype = next(model.parameters()).dtype
    args = _example_inputs(
        config, dtype, seq_len=seq_len, batch=batch, past_len=past_len if with_cache else None
    )
    input_names, output_names = _io_names(config.num_hidden_layers, with_cache)
    axes = _dynamic_axes(input_names, output_names, dynamic_batch)
    wrapper = _ExportWrapper(model, with_cache).eval()
    with _quiet(), torch.no_grad():
        _export(wrapper, args, path, exporter, input_names, output_names, axes)
    _finalize(path, axes, batch)
    return path


def export_program(
    model,
    *,
    seq_len: int = 7,
    batch: int = 1,
    with_cache: bool = False,
    past_len: int = 3,
    dynamic: bool = True,
    decompose: bool = False,
):
    """``torch.export`` ``model`` (HF causal LM or PeftModel, put in eval mode) with the same
    plain-tensor interface as :func:`export_onnx`: ``(input_ids, attention_mask, *past k/v)``
    -> ``(logits, *present k/v)``. Sequence (and past) axes are dynamic unless ``dynamic=False``;
    ``decompose`` returns ``program.run_decompositions()`` (core ATen). With dynamic axes the
    example sizes must be >= 2; static programs (``dynamic=False``) may use ``seq_len=1``.
    """
    if dynamic and (seq_len < 2 or (with_cache and past_len < 2)):
        raise ValueError("seq_len and past_len must be >= 2 with dynamic axes: torch.export specialises example sizes 0 and 1")
    config = model.config
    dtype = next(model.parameters()).dtype
    args = _example_inputs(config, dtype, seq_len=seq_len, batch=batch, past_len=past_len if with_cache else None)
    args = tuple(a.to(next(model.parameters()).device) for a in args)
    wrapper = _ExportWrapper(model, with_cache).eval()
    shapes = None
    if dynamic:  # sequence / past axes: let torch.export derive their ranges and relations
        seq = {1: torch.export.Dim.DYNAMIC}
        shapes = (seq, seq, tuple({2: torch.export.Dim.DYNAMIC} for _ in args[2:])) if with_cache else (seq, seq)
    with _quiet(), torch.no_grad():
        program = torch.export.export(wrapper, args, dynamic_shapes=shapes, strict=False)
        return program.run_decompositions() if decompose else program
