"""The compile report: typed sections, one builder for the ONNX and torch.fx pipelines.

:meth:`Report.to_json` gives the document ``report.json`` holds (and ``--json`` prints),
described by ``report_schema.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

from zflora_compile._version import __version__
from zflora_compile.errors import LatencyGateError, VerificationError, ZcompileError
from zflora_compile.graph.records import Detection

SCHEMA_VERSION = "1.7"
NO_VERIFY = {"passed": None, "skipped": "--no-verify"}


@dataclasses.dataclass
class GraphStats:
    """Node counts of a graph: ONNX op types, or ATen op names for torch.fx."""

    op_counts: dict[str, int]
    gemm_count: int

    def to_json(self) -> dict:
        return {"nodes": sum(self.op_counts.values()), "op_counts": self.op_counts, "gemm_count": self.gemm_count}


@dataclasses.dataclass
class InputInfo:
    """What was compiled: ``ir`` is "onnx" or "fx"; ``path`` is None for an in-memory model."""

    ir: str = "onnx"
    path: str | None = None
    sha256: str | None = None
    external_data: bool | None = None
    opset: int | None = None
    graph: GraphStats | None = None
    #: onnx.checker on the input file: "onnx.checker... passed" or "fails onnx.checker: ..."
    checker: str | None = None

    def to_json(self) -> dict:
        out: dict[str, Any] = {"path": self.path, "ir": self.ir}
        if self.sha256 is not None:
            out["sha256"] = self.sha256
        if self.checker is not None:
            out["checker"] = self.checker
        if self.external_data is not None:
            out["external_data"] = self.external_data
        if self.graph is not None:
            if self.ir == "onnx":
                out["opset"] = self.opset
            out.update(self.graph.to_json())
        return out


@dataclasses.dataclass
class OutputInfo:
    """The rewritten graph, and for a file compile the files written, the checker, the directory."""

    graph: GraphStats
    files: list[str] = dataclasses.field(default_factory=list)
    checker: str | None = None
    dir: str | None = None

    def to_json(self) -> dict:
        out: dict[str, Any] = self.graph.to_json()
        if self.files:
            out["files"] = self.files
        if self.checker is not None:
            out["checker"] = self.checker
        if self.dir is not None:
            out["dir"] = self.dir
        return out


def groups_json(detection: Detection) -> list[dict]:
    """LoRA sites grouped by the tensor they read (one fused GEMM per group)."""
    groups: dict[str, list] = {}
    for site in detection.sites:
        groups.setdefault(site.group, []).append(site)
    return [
        {"group": key, "input": members[0].input_name, "sites": [s.site_id for s in members], "labels": [s.label for s in members]}
        for key, members in groups.items()
    ]


def accounting_line(detection: Detection) -> str:
    """``adapter-shaped branches: 14 found, 14 recognised; per-column scales: 1 found, 0 recognised``
    (empty when the graph has neither)."""
    tally = detection.accounting
    parts = []
    if tally.branches_found:
        parts.append(f"adapter-shaped branches: {tally.branches_found} found, {tally.branches_recognised} recognised")
    if tally.scales_found:
        parts.append(f"per-column scales: {tally.scales_found} found, {tally.scales_recognised} recognised")
    return "; ".join(parts)


def file_digest(*paths: Path) -> str:
    """sha256 of the files' bytes, in order."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass
class Report:
    """Filled in step by step; ``status``, ``exit_code`` and ``message`` say how it ended."""

    options: dict
    input: InputInfo
    status: str = "error"
    exit_code: int = 2
    message: str = ""
    detection: Detection | None = None
    #: the planner's plan (anything with ``to_json()``)
    plan: Any = None
    output: OutputInfo | None = None
    verification: dict | None = None
    target: dict | None = None
    latency: dict | None = None
    #: the estimated peak memory per step against what was available (zflora_compile.memory)
    memory: dict | None = None
    timings_s: dict[str, float] = dataclasses.field(default_factory=dict)
    #: strip of a model this tool compiled: what its lanes' removal took out (groups, widened sites)
    removed: dict | None = None
    started: float = dataclasses.field(default_factory=time.perf_counter, repr=False)

    def succeed(self) -> None:
        self.status, self.exit_code, self.message = "ok", 0, self.summary()

    def summary(self) -> str:
        sites = len(self.detection.all_sites) if self.detection is not None else 0
        tally = accounting_line(self.detection) if self.detection is not None else ""
        if self.removed:
            what = f"{len(self.removed.get('groups', []))} fused group(s), {len(self.removed.get('widened', []))} widened projection(s)"
            text = f"removed the adapter lanes zflora-compile compiled in ({what}) and {sites} further adapter site(s): GEMMs {self.input.graph.gemm_count} -> {self.output.graph.gemm_count}"
            return f"{text} ({tally})" if tally else text
        if not sites:
            return "no adapter sites found; model " + ("written unchanged" if self.input.path else "unchanged") + (f" ({tally})" if tally else "")
        text = f"{sites} adapter site(s), strategy {self.plan.strategy}: GEMMs {self.input.graph.gemm_count} -> {self.output.graph.gemm_count}"
        return f"{text} ({tally})" if tally else text

    def record_gate(self, latency: dict, failure: str | None, inconclusive: str | None = None) -> None:
        """The latency gate's section; ``failure`` (a message: a regression) makes the compile fail
        with exit 1, ``inconclusive`` (a message: an interval straddles the threshold) with exit 4."""
        self.latency = latency
        if failure is not None:
            self.status, self.exit_code, self.message = "latency_gate_failed", 1, failure
        elif inconclusive is not None:
            self.status, self.exit_code, self.message = "latency_gate_inconclusive", 4, inconclusive
        else:
            self.message += f"; latency gate passed (worst fused overhead {latency['worst_overhead_pct']:+.1f}% <= {latency['max_overhead_pct']:g}%, every 95% interval at or below it)"

    def fail(self, error: ZcompileError) -> None:
        """Record ``error``; a failed latency gate keeps the report it already wrote."""
        if isinstance(error, LatencyGateError):
            return
        self.exit_code = error.exit_code
        self.status = "verification_failed" if isinstance(error, VerificationError) else "error"
        self.message = str(error)
        self.stop_clock()

    def fail_other(self, error: BaseException) -> None:
        """Record an interruption (exit 128 + signal) or an internal error (exit 3, a bug)."""
        from zflora_compile.errors import Interrupted, first_line

        if isinstance(error, Interrupted):
            self.exit_code, self.message = error.exit_code, f"{error}: nothing was written"
        elif isinstance(error, KeyboardInterrupt):
            self.exit_code, self.message = 130, "interrupted (SIGINT): nothing was written"
        else:
            self.exit_code, self.message = 3, f"internal error: {type(error).__name__}: {first_line(error)}"
        self.status = "error"
        self.stop_clock()

    def stop_clock(self) -> None:
        self.timings_s["total"] = round(time.perf_counter() - self.started, 4)

    def to_json(self) -> dict:
        out: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "zflora-compile", "version": __version__},
            "input": self.input.to_json(),
            "options": self.options,
            "status": self.status,
            "exit_code": self.exit_code,
            "message": self.message,
        }
        if self.detection is not None:
            out["sites"] = [s.to_json() for s in self.detection.all_sites]
            out["rejected"] = [r.to_json() for r in self.detection.rejections]
            out["unrecognized"] = [u.to_json() for u in self.detection.unrecognized]
            out["accounting"] = self.detection.accounting.to_json()
            out["groups"] = groups_json(self.detection)
        if self.plan is not None:
            out["plan"] = self.plan.to_json()
        if self.removed:
            out["removed_compiled"] = self.removed
        sections = {"output": self.output.to_json() if self.output else None, "verification": self.verification, "target": self.target, "latency": self.latency, "memory": self.memory}
        out.update({name: section for name, section in sections.items() if section is not None})
        if self.timings_s:
            out["timings_s"] = dict(self.timings_s)
        return out


def strict(value):
    """``value`` with every non-finite float written as a string ("NaN", "Infinity", "-Infinity"),
    so the document is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    if hasattr(value, "item") and hasattr(value, "dtype"):  # a numpy scalar
        return strict(value.item())
    return value


def report_text(report: dict) -> str:
    """The report as strict JSON text (``allow_nan=False``; non-finite numbers as strings), one
    trailing newline: what ``report.json``, ``--report`` and ``--json`` hold."""
    return json.dumps(strict(report), indent=2, allow_nan=False) + "\n"
