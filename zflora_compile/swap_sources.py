"""The adapters a swap reads (:mod:`zflora_compile.swap`): PEFT directories, ONNX models, zflora adapters.

- PEFT LoRA / DoRA / BD-LoRA (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``,
  read, split into modules and given ranks / scales by :mod:`zflora_compile.peft_format`, the reader
  ``zcompile export`` uses too): per module
  ``A = lora_A.weight^T`` ``[in, r]``, ``B = lora_B.weight^T`` ``[r, out]`` (BD-LoRA's block-diagonal
  factor densified: ``blockdiag(chunks)``), ``r`` read off the tensors and checked against
  ``rank_pattern`` / ``r``, ``s = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``) with
  ``alpha`` from ``alpha_pattern`` / ``lora_alpha`` (PEFT's key match: ``(.*\\.)?(key)$``). DoRA:
  ``c = m / ||W + s A @ B||`` per output column, ``W`` the compiled base lanes.
- An ONNX model: detected and planned with ``fuse`` exactly as a compile of it would be; the
  rewrites' constants are the new adapter's, their base columns are checked against the compiled ones.
- A saved FFA / FBA / FFBA / zFLoRA adapter (:mod:`zflora_compile.adapters`): attached to a model
  built from the base config it records, exported unfused and read as an ONNX model; its lanes do
  not depend on the base weights, so only the lane blocks are taken (no base check: the export's
  base is not the compiled one).

Module names map to compiled sites by label (the exporter's module path, e.g.
``model.layers.0.self_attn.q_proj``): equal after dropping PEFT's ``base_model.model.`` prefix, or
the one module whose dotted name ends with the label (or the label with it); anything else refuses.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from zflora_compile.swap_adapter import Adapter, GroupUpdate, WidenedUpdate, product, refuse


def match_label(label: str, names) -> str | None:
    """The one module name that is ``label``, or ends with it / it ends with (dotted); else None."""
    names = list(names)
    if label in names:
        return label
    hits = [n for n in names if n.endswith("." + label) or label.endswith("." + n)]
    return hits[0] if len(hits) == 1 else None


class _Factors:
    def __init__(self, a, b, scale, magnitude=None):
        self.a, self.b, self.scale, self.magnitude = a, b, scale, magnitude


class PeftAdapter(Adapter):
    kind = "PEFT"

    def __init__(self, path: Path, config: dict):
        try:
            from zflora_compile.peft_format import FACTOR_ROLES, module_of, read_weights, targeted
        except ImportError as error:  # pragma: no cover - the torch extra
            refuse(f"--adapter {path}: a PEFT adapter needs the torch extra ({error})")

        self.source = str(path)
        self.config = config
        if config.get("peft_type") != "LORA":
            refuse(f"--adapter {path}: PEFT type '{config.get('peft_type')}' is not LoRA (a swap reads LoRA, DoRA and BD-LoRA adapters)")
        if config.get("lora_bias"):
            refuse(f"--adapter {path}: lora_bias=True: the compiled group's bias holds the base bias and the old adapter's together; a PEFT swap cannot separate them (swap from an ONNX model instead)")
        tensors, _ = read_weights(path)
        self.modules: dict[str, dict] = {}
        for key, value in tensors.items():
            split = module_of(key, FACTOR_ROLES)
            if split is None or split[2] not in ("weight", ""):
                refuse(f"--adapter {path}: tensor '{key.removeprefix('base_model.model.')}' is no LoRA factor (modules_to_save and other extras cannot be swapped)")
            self.modules.setdefault(split[0], {})[split[1]] = value
        for name, parts in self.modules.items():
            if "lora_embedding_A" in parts:
                refuse(f"--adapter {path}: module '{name}' is an embedding LoRA; compiled embedding LoRA is merged, so it cannot be swapped")
            if "lora_A" not in parts or "lora_B" not in parts:
                refuse(f"--adapter {path}: module '{name}' lacks lora_A or lora_B")
            if not targeted(name, config):
                refuse(f"--adapter {path}: module '{name}' has LoRA tensors but is not among the target_modules / layers_to_transform of adapter_config.json")
        self.used: set[str] = set()
        self.sites: dict[str, str] = {}  # module -> the compiled site (label) it was placed at

    def factors(self, name: str, n_in: int, n_out: int) -> _Factors:
        from zflora_compile.peft_format import bdlora_config, block_diagonal, module_lora

        parts, config = self.modules[name], self.config
        a_t, b_t = parts["lora_A"], parts["lora_B"]
        bd = bdlora_config(config)
        if bd and a_t.shape[1] * int(bd["nblocks"]) == n_in and a_t.shape[1] != n_in:
            a_t = block_diagonal(a_t, int(bd["nblocks"]))
        if bd and b_t.shape[1] * int(bd["nblocks"]) == a_t.shape[0] and b_t.shape[1] != a_t.shape[0]:
            b_t = block_diagonal(b_t, int(bd["nblocks"]))
        a_t, b_t = a_t.float().numpy(), b_t.float().numpy()  # fp16 / bf16 factors read in fp32
        rank = a_t.shape[0]
        if a_t.shape != (rank, n_in) or b_t.shape != (n_out, rank):
            refuse(f"module '{name}' of {self.source}: lora_A {list(parts['lora_A'].shape)} / lora_B {list(parts['lora_B'].shape)} do not fit the compiled projection [{n_in}, {n_out}]")
        lora = module_lora(config, name)
        if lora.r != rank:
            refuse(f"module '{name}' of {self.source}: lora_A has rank {rank}, adapter_config.json says {lora.r}")
        magnitude = parts.get("lora_magnitude_vector")
        if magnitude is not None and not config.get("use_dora"):
            refuse(f"module '{name}' of {self.source}: a magnitude vector without use_dora")
        return _Factors(a_t.T, b_t.T, lora.scale, None if magnitude is None else magnitude.float().numpy().reshape(-1))

    def _module(self, label: str, group: str) -> str:
        name = match_label(label, self.modules)
        if name is None:
            close = [n for n in self.modules if n.endswith(label.rsplit(".", 1)[-1])][:2]
            refuse(f"compiled site '{label}' (group '{group}') has no counterpart in {self.source}" + (f" (modules such as '{close[0]}' do not match it)" if close else ""))
        if self.sites.setdefault(name, label) != label:  # a short module name ending two labels
            refuse(f"module '{name}' of {self.source} matches two compiled sites, '{self.sites[name]}' and '{label}': ambiguous")
        return name

    def group(self, group: dict, base: np.ndarray) -> GroupUpdate:
        lanes, blocks, ranks, scales = [], [], [], []
        dora = False
        col = 0
        for label, out in zip(group["labels"], group["out_splits"]):
            name = self._module(label, group["name"])
            self.used.add(name)
            f = self.factors(name, int(group["in_features"]), int(out))
            w = base[:, col : col + out].astype(np.float32)
            lanes.append(f.a)
            blocks.append(f.b * np.float32(f.scale))
            ranks.append(f.a.shape[1])
            if f.magnitude is not None:
                dora = True
                norm = np.linalg.norm(w + np.float32(f.scale) * product(f.a, f.b), axis=0)
                scales.append(f.magnitude / norm)
            else:
                scales.append(np.ones(out, dtype=np.float32))
            col += out
        low = np.zeros((sum(ranks), sum(group["out_splits"])), dtype=np.float32)
        r = c = 0
        for block, out in zip(blocks, group["out_splits"]):
            low[r : r + block.shape[0], c : c + out] = block
            r, c = r + block.shape[0], c + out
        return GroupUpdate(np.concatenate(lanes, axis=1), low, ranks, np.concatenate(scales).astype(np.float32) if dora else None)

    def unused(self) -> list[str]:
        return sorted(set(self.modules) - self.used)


class OnnxAdapter(Adapter):
    kind = "ONNX"

    def __init__(self, path: Path, *, check_base: bool = True, source: str | None = None):
        from zflora_compile import subgraphs
        from zflora_compile.families.gaws import FuseGrouped, KeepGrouped
        from zflora_compile.families.lora import FuseGroup
        from zflora_compile.families.widening import Widen
        from zflora_compile.model_io import load_model
        from zflora_compile.pipeline import detect

        self.source = source or str(path)
        self.reference = Path(path) if check_base else None
        self.check_base = check_base
        model = load_model(path)
        detection = detect(model)
        if not detection.all_sites:
            refuse(f"--adapter {path}: no adapter site found in the ONNX model")
        plan = subgraphs.plan(detection, "fuse")
        self.groups, self.grouped_steps, self.widen_steps, self.kept = {}, {}, {}, []
        for step in plan:
            if isinstance(step, FuseGroup):
                self.groups[tuple(s.label for s in step.sites)] = step
            elif isinstance(step, FuseGrouped):
                self.grouped_steps[tuple(s.label for s in step.sites)] = step
            elif isinstance(step, Widen):
                self.widen_steps[step.site.label] = step
            elif isinstance(step, KeepGrouped):
                self.kept.append(step.site.label)
        self.labels = {s.label for s in detection.all_sites}
        self.used: set[str] = set()
        self.model = model  # keeps the lazy weights' tensors alive

    def _find(self, table: dict, labels: list[str], name: str):
        step = table.get(tuple(labels))
        if step is None:
            missing = [label for label in labels if match_label(label, self.labels) is None]
            if missing:
                refuse(f"compiled site '{missing[0]}' (group '{name}') has no counterpart in {self.source}")
            refuse(f"group '{name}' ({', '.join(labels)}) is grouped differently in {self.source} (a from-scratch compile of it packs other projections together): site mismatch")
        self.used.update(labels)
        return step

    def group(self, group: dict, base: np.ndarray) -> GroupUpdate:
        step = self._find(self.groups, group["labels"], group["name"])
        D = step.base_width
        weight = step.weight.numpy()
        if D != int(group["base_width"]) or weight.shape[0] != int(group["in_features"]):
            refuse(f"group '{group['name']}' is [{group['in_features']}, {group['base_width']}] in the compiled model, [{weight.shape[0]}, {D}] in {self.source}")
        names = [getattr(getattr(s.binding.gemm, "weight", None), "name", None) or s.label for s in step.sites]
        return GroupUpdate(
            lanes=weight[:, D:].astype(np.float32),
            lowrank=step.lowrank.numpy().astype(np.float32),
            ranks=[s.rank for s in step.sites],
            column_scale=step.column_scale.numpy().astype(np.float32) if step.column_scale is not None else None,
            # no bias in the new adapter's group: its base has none either (same base), so the fused bias is 0
            bias=step.bias.numpy().astype(np.float32) if step.bias is not None else np.zeros(D, dtype=np.float32),
            base=weight[:, :D] if self.check_base else None,
            base_names=names,
        )

    def grouped(self, group: dict) -> np.ndarray:
        return self._find(self.grouped_steps, group["labels"], group["name"]).blocks.numpy()

    def widened(self, site: dict) -> WidenedUpdate:
        label = site.get("label") or site["site"]
        step = self.widen_steps.get(label)
        if step is None:
            refuse(f"compiled widened projection '{label}' ({site.get('family')}) has no counterpart in {self.source}")
        self.used.add(label)
        new = step.site
        weight = step.weight.numpy().astype(np.float32)
        if not self.check_base:  # the base block is the compiled one's (swap copies it): nothing to compare
            weight = weight.copy()
        return WidenedUpdate(weight, list(step.out_splits), [r.rank for r in new.reads], new.family, getattr(getattr(new.binding.gemm, "weight", None), "name", None) if new.binding.gemm is not None else None)

    def unused(self) -> list[str]:
        left = sorted(self.labels - self.used)
        kept = [label for label in left if label in self.kept]
        if kept:
            refuse(
                f"the GAWS site '{kept[0]}' of {self.source} is alone on its input: a compile keeps it unfused and records no "
                "lanes for it, so a swap cannot place it (swap covers GAWS groups of two or more projections)"
            )
        return left


class ZfloraAdapter(OnnxAdapter):
    """A saved :mod:`zflora_compile.adapters` adapter: attached to a model built from its recorded
    base config (random base weights: only the lanes are read), exported unfused, read as ONNX."""

    kind = "zflora"

    def __init__(self, path: Path, meta: dict):
        try:
            import torch
            import transformers

            from zflora_compile.adapters import load_adapters
            from zflora_compile import zoo
        except ImportError as error:
            refuse(f"--adapter {path}: a zflora adapter needs the torch extra ({error})")
        config = meta.get("base_config")
        if not isinstance(config, dict) or not meta.get("base_model_type"):
            refuse(f"--adapter {path}: adapter_config.json records no base_config")
        hf_config = transformers.AutoConfig.for_model(meta["base_model_type"], **{k: v for k, v in config.items() if k != "model_type"})
        hf_config._attn_implementation = "eager"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            base = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
        model = load_adapters(base, path, check_base=False)
        self._tmp = tempfile.TemporaryDirectory(prefix="zflora-swap-")  # the export's weights live as long as the adapter
        onnx_path = zoo.export_onnx(model, Path(self._tmp.name) / "adapter.onnx")
        super().__init__(onnx_path, check_base=False, source=str(path))
        self.reference = None

    def group(self, group: dict, base: np.ndarray) -> GroupUpdate:
        refuse(f"the compiled model has the fused LoRA group '{group['name']}'; a zflora adapter has no LoRA factors for it")
