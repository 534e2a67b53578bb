"""BD-LoRA (PEFT ``use_bdlora``) cut into ``n`` tensor-parallel shards, plus a densified plain LoRA.

Torch layout: ``lora_A.weight`` is ``A: [r, in]``, ``lora_B.weight`` is ``B: [out, r]``, the
update is ``y += s * (x A^T) B^T``.  PEFT stores the block-diagonal factor compactly
(``BlockDiagonalLinear``, ``weight: [out, in/nb]``, block ``i`` = rows ``i*out/nb ...``,
densified by ``torch.block_diag(*chunk(weight, nb, dim=0))``).

With ``k = r/n``, true scale ``s`` folded into ``B' = s*B`` (as in ``peft_neutral``):

- column-parallel module (``B`` block diagonal: q, k, v, gate, up), ``o = out/n``: shard ``i``
  holds base weight rows ``[i*o, (i+1)*o)`` (and those bias entries), ``A_i = A[i*k:(i+1)*k, :]``,
  ``B_i = B'[i*o:(i+1)*o, i*k:(i+1)*k]``.  Because ``B'`` is zero off its diagonal blocks,
  ``concat_i(x A_i^T B_i^T) = x A^T B'^T``: the shards' outputs are concatenated, like the base.
- row-parallel module (``A`` block diagonal: o, down), ``m = in/n``: shard ``i`` holds base weight
  columns ``[i*m, (i+1)*m)`` and reads ``x_i = x[.., i*m:(i+1)*m]``,
  ``A_i = A[i*k:(i+1)*k, i*m:(i+1)*m]``, ``B_i = B'[:, i*k:(i+1)*k]``.  Because ``A`` is zero off
  its diagonal blocks, ``sum_i x_i A_i^T B_i^T = x A^T B'^T``: the shards' outputs are summed by
  the all-reduce the base layer already does (the base bias is added once, after it).

No shard needs another shard's adapter activations.  ``n`` may differ from the training
``nblocks``: the densified factor must be block diagonal with ``n`` blocks (exactly zero off
them; true whenever ``n`` divides ``nblocks``), and ``r``, ``in``/``out`` must be divisible by
``n``; otherwise ``InputError`` names the module.  A module that is neither A- nor
B-block-diagonal (``match_strict=False``) cannot be cut without communication and is refused.
"""

from __future__ import annotations

from zflora_compile.errors import InputError
from zflora_compile.export._common import atomic_directory, write_json, write_peft_adapter
from zflora_compile.export.peft_neutral import check_plain_lora, neutralize
from zflora_compile.peft_format import FACTOR_ROLES, bdlora_config, block_diagonal, module_lora, module_of, read_peft_adapter

ROLES = FACTOR_ROLES
MANIFEST = "manifest.json"


def _bd_config(config: dict, where) -> dict:
    bd = bdlora_config(config)
    if bd is None or int(bd.get("nblocks", 1)) < 1:
        raise InputError(f"{where}: use_bdlora is not set: not a BD-LoRA adapter (use `export peft` for plain LoRA)")
    return {"a": list(bd.get("target_modules_bd_a") or []), "b": list(bd.get("target_modules_bd_b") or []), "nblocks": int(bd.get("nblocks", 1))}


def _check_block_diagonal(matrix, n: int, name: str, factor: str, where) -> None:
    rows, cols = matrix.shape[0] // n, matrix.shape[1] // n
    for i in range(n):
        for j in range(n):
            if i != j and bool(matrix[i * rows : (i + 1) * rows, j * cols : (j + 1) * cols].any()):
                raise InputError(f"{where}: module {name}: {factor} is not block diagonal with {n} blocks (block {i},{j} is nonzero)")


def dense_modules(config: dict, tensors: dict, shards: int, where) -> tuple[dict, dict]:
    """``({key: dense tensor}, {module: layout})``: every factor densified and checked at ``shards``."""
    bd = _bd_config(config, where)
    nb = bd["nblocks"]
    dense, layout = {}, {}
    factors: dict[str, dict] = {}
    for key, value in tensors.items():
        split = module_of(key, ROLES)
        if split is None:
            raise InputError(f"{where}: tensor {key} is not a LoRA factor; BD-LoRA export reads lora_A/lora_B only")
        name, role, tail = split
        if role not in ("lora_A", "lora_B") or tail != "weight":
            raise InputError(f"{where}: module {name} has {role}.{tail}: not a BD-LoRA linear factor")
        factors.setdefault(name, {})[role] = (key, value)
    for name, pair in sorted(factors.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise InputError(f"{where}: module {name} lacks lora_A or lora_B")
        (a_key, a), (b_key, b) = pair["lora_A"], pair["lora_B"]
        on_a, on_b = any(p in name for p in bd["a"]), any(p in name for p in bd["b"])  # PEFT: `pattern in target_name`
        if on_a == on_b:
            raise InputError(f"{where}: module {name} is {'both' if on_a else 'neither'} A- and B-block-diagonal; only BD-LoRA modules can be sharded without communication")
        r = module_lora(config, name).r
        if a.shape[0] != r:
            raise InputError(f"{where}: module {name}: lora_A has rank {a.shape[0]}, the config gives {r}")
        if on_b:  # column parallel: B [out, r/nb] compact (or [out, r] already dense)
            b = block_diagonal(b, nb) if b.shape[1] * nb == r and nb > 1 else b
            if b.shape[1] != r or b.shape[0] % nb:
                raise InputError(f"{where}: module {name}: lora_B shape {tuple(b.shape)} is not BD-LoRA's [out, r/{nb}]")
            in_f, out_f, parallel, factor = a.shape[1], b.shape[0], "column", b
        else:  # row parallel: A [r, in/nb] compact
            if r % nb:
                raise InputError(f"{where}: module {name}: rank {r} is not divisible by nblocks {nb}")
            a = block_diagonal(a, nb) if nb > 1 else a
            if b.shape[1] != r:
                raise InputError(f"{where}: module {name}: lora_B shape {tuple(b.shape)} does not have rank {r}")
            in_f, out_f, parallel, factor = a.shape[1], b.shape[0], "row", a
        split_dim = out_f if parallel == "column" else in_f
        if r % shards or split_dim % shards:
            what = "out_features" if parallel == "column" else "in_features"
            raise InputError(f"{where}: module {name}: rank {r} and {what} {split_dim} must be divisible by --shards {shards}")
        _check_block_diagonal(factor, shards, name, "lora_B" if parallel == "column" else "lora_A", where)
        dense[a_key], dense[b_key] = a, b
        layout[name] = {"parallel": parallel, "in_features": int(in_f), "out_features": int(out_f), "rank": int(r), "a_key": a_key, "b_key": b_key}
    if not layout:
        raise InputError(f"{where}: no LoRA weights found")
    return dense, layout


def _shard(tensors: dict, layout: dict, i: int, n: int) -> tuple[dict, dict]:
    """Shard ``i``'s tensors (from the scale-folded dense ones) and its manifest entries."""
    out, entries = {}, {}
    for name, info in layout.items():
        a, b = tensors[info["a_key"]], tensors[info["b_key"]]
        k = info["rank"] // n
        if info["parallel"] == "column":
            o = info["out_features"] // n
            out[info["a_key"]] = a[i * k : (i + 1) * k, :].clone()
            out[info["b_key"]] = b[i * o : (i + 1) * o, i * k : (i + 1) * k].clone()
            rows, cols = [i * o, (i + 1) * o], [0, info["in_features"]]
        else:
            m = info["in_features"] // n
            out[info["a_key"]] = a[i * k : (i + 1) * k, i * m : (i + 1) * m].clone()
            out[info["b_key"]] = b[:, i * k : (i + 1) * k].clone()
            rows, cols = [0, info["out_features"]], [i * m, (i + 1) * m]
        entries[name] = {"weight_rows": rows, "weight_cols": cols}
    return out, entries


def _shard_config(config: dict, n: int, where) -> dict:
    """The neutral config with every rank divided by ``n`` (scale stays 1: alpha = rank)."""
    out = dict(config)
    r = int(config["r"])
    out["r"] = out["lora_alpha"] = r // n if r % n == 0 else max(1, r // n)
    out["rank_pattern"] = {k: int(v) // n for k, v in (config.get("rank_pattern") or {}).items()}
    out["alpha_pattern"] = dict(out["rank_pattern"])
    return out


def export_bdlora_tp(adapter_dir, out, *, shards: int, force: bool = False) -> dict:
    """Write ``out/manifest.json``, ``out/shard-<i>/`` (PEFT LoRA, rank r/n) and ``out/dense/``; returns the manifest."""
    if not isinstance(shards, int) or shards < 1:
        raise InputError(f"--shards must be a positive integer, got {shards!r}")
    config, tensors, where = read_peft_adapter(adapter_dir)
    check_plain_lora(config, where, allow=("use_bdlora",))
    if config.get("lora_bias"):
        raise InputError(f"{where}: lora_bias with BD-LoRA is not exported (the bias would be split across shards)")
    nblocks = _bd_config(config, where)["nblocks"]
    dense, layout = dense_modules(config, tensors, shards, where)
    plain = dict(config, use_bdlora=None)
    dense_config, folded, summary = neutralize(plain, dense, where)
    manifest = {
        "format": "zflora-compile-bdlora-tp",
        "format_version": 1,
        "source": str(adapter_dir),
        "shards": shards,
        "training_nblocks": nblocks,
        "weight_layout": "torch nn.Linear weight [out_features, in_features]; weight_rows/weight_cols: the slice of the base weight shard i holds",
        "combine": {"column": "concatenate the shards' outputs along the output features (base bias: each shard adds its rows)", "row": "sum the shards' outputs (the base layer's all-reduce); the base bias is added once"},
        "shard_dirs": [f"shard-{i}" for i in range(shards)],
        "dense_dir": "dense",
        "modules": {},
    }
    for name, info in sorted(layout.items()):
        manifest["modules"][name] = {
            "parallel": info["parallel"],
            "combine": "concat" if info["parallel"] == "column" else "sum",
            "block_diagonal_factor": "lora_B" if info["parallel"] == "column" else "lora_A",
            "in_features": info["in_features"],
            "out_features": info["out_features"],
            "rank": info["rank"],
            "shard_rank": info["rank"] // shards,
            "scale_folded_into_lora_B": summary["modules"][name]["scale_folded_into_lora_B"],
            "shards": [],
        }
    shard_config = _shard_config(dense_config, shards, where)
    with atomic_directory(out, force=force) as tmp:
        write_peft_adapter(tmp / "dense", dense_config, folded, extra={**summary, "source": str(adapter_dir), "densified_from": "BD-LoRA"})
        for i in range(shards):
            shard_tensors, entries = _shard(folded, layout, i, shards)
            for name, entry in entries.items():
                manifest["modules"][name]["shards"].append(entry)
            extra = {"format": "zflora-compile-bdlora-shard", "shard": i, "shards": shards, "manifest": f"../{MANIFEST}"}
            write_peft_adapter(tmp / f"shard-{i}", shard_config, shard_tensors, extra=extra)
        write_json(tmp / MANIFEST, manifest)
    return manifest


__all__ = ["dense_modules", "export_bdlora_tp"]
