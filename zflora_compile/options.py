"""What a compile is asked to do: strategy, verification, and for files the target and latency gate."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from zflora_compile.errors import InputError
from zflora_compile.gate import LatencyOptions
from zflora_compile.graph.records import DEFAULT_MAX_RANK_RATIO
from zflora_compile.planner import STRATEGIES
from zflora_compile.targets import target_class

VERIFY_MODES = ("auto", "full", "regions", "off")


@dataclasses.dataclass
class CompileOptions:
    """``target``, ``target_options`` (the target's own ``Options``; None: its defaults), ``force``,
    ``latency`` and ``check_latency`` apply to :func:`zflora_compile.build.compile_file` only."""

    strategy: str = "fuse"
    target: str = "ort"
    #: False: no verification (the same as ``verify_mode="off"``)
    verify: bool = True
    #: "auto" (full below :data:`zflora_compile.verify.AUTO_REGIONS_BYTES` of weights, regions
    #: above), "full" (both whole models in ONNX Runtime), "regions" (each rewritten region against
    #: the original region, one at a time) or "off"
    verify_mode: str = "auto"
    atol: float | None = None
    rtol: float | None = None
    max_rank_ratio: float = DEFAULT_MAX_RANK_RATIO
    seed: int = 0
    #: strip: constant per-column scales after projections (LayerScale or IA3, indistinguishable) are
    #: declared part of the base model and kept; without it strip refuses while there are any
    keep_scales: bool = False
    force: bool = False
    target_options: Any = None
    #: shapes the target builds for (prefill, past) and, with check_latency, the gate's settings
    latency: LatencyOptions = dataclasses.field(default_factory=LatencyOptions)
    check_latency: bool = False
    #: fuse: pad every fused group / lane block with zero lanes to this rank (None: the adapter's own
    #: ranks), so that any adapter up to it swaps in with identical shapes (docs/swap.md)
    max_rank: int | None = None
    #: fuse: keep the adapter-owned tensors of the fused layout (widened weights, low-rank constants,
    #: per-column scales) as graph inputs with their values as defaults, and write them as
    #: ``adapter.onnx_adapter`` (ONNX Runtime's adapter format) beside the model
    adapter_inputs: bool = False
    #: the memory this compile may use, in GiB (None: what the machine has available now); the
    #: estimated peak (:mod:`zflora_compile.memory`) must fit, else exit 2 before any work
    memory_limit_gib: float | None = None

    def __post_init__(self):
        if self.verify_mode not in VERIFY_MODES:
            raise InputError(f"unknown verification mode '{self.verify_mode}' (choose from {', '.join(VERIFY_MODES)})")
        if not self.verify:
            self.verify_mode = "off"
        elif self.verify_mode == "off":
            self.verify = False
        check_max_rank_ratio(self.max_rank_ratio)
        if self.max_rank is not None and (not isinstance(self.max_rank, int) or isinstance(self.max_rank, bool) or self.max_rank < 1):
            raise InputError(f"--max-rank must be an integer >= 1, got {self.max_rank}")
        if (self.max_rank is not None or self.adapter_inputs) and self.strategy != "fuse":
            raise InputError(f"--max-rank and --adapter-inputs apply to --strategy fuse, not {self.strategy} (a {self.strategy}d adapter has no lanes)")
        for flag, value in (("--atol", self.atol), ("--rtol", self.rtol)):
            # negative tolerances stay possible from Python (a test's way to force a mismatch);
            # the command line refuses them (cli.py)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise InputError(f"{flag} must be a finite number, got {value}")
        if self.memory_limit_gib is not None and not (isinstance(self.memory_limit_gib, (int, float)) and not isinstance(self.memory_limit_gib, bool) and math.isfinite(self.memory_limit_gib) and self.memory_limit_gib > 0):
            raise InputError(f"--memory-limit must be a number of GiB > 0, got {self.memory_limit_gib}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise InputError(f"--seed must be an integer >= 0, got {self.seed}")
        if not isinstance(self.latency, LatencyOptions):
            raise InputError(f"latency takes LatencyOptions, not {type(self.latency).__name__}")
        if self.strategy not in STRATEGIES:
            raise InputError(f"unknown strategy '{self.strategy}' (choose from {', '.join(STRATEGIES)})")
        options_type = target_class(self.target).Options
        if self.target_options is None:
            self.target_options = options_type()
        elif not isinstance(self.target_options, options_type):
            raise InputError(f"target '{self.target}' takes {options_type.__name__}, not {type(self.target_options).__name__}")

    def to_json(self) -> dict:
        """The options as JSON values (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def check_max_rank_ratio(value) -> None:
    """``--max-rank-ratio``: a fraction in (0, 1] (a rank is at most that share of min(in, out))."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= 1):
        raise InputError(f"--max-rank-ratio must be in (0, 1], got {value}")
