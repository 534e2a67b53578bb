"""The planner: one list of typed rewrites for a detection and a strategy, for any IR.

Each family module plans its own sites (the algebra of each rewrite is in its docstring:
:mod:`zflora_compile.families.lora`, :mod:`zflora_compile.families.widening`). A rewrite knows
its weights as :class:`~zflora_compile.graph.records.LazyArray` (computed on demand, in fp32,
cast back to the weight's dtype), its ``to_json()`` and how to ``emit`` itself through an
emitter; a rewriter is one loop over the list (:func:`zflora_compile.families.rewrite`).
"""

from __future__ import annotations

import dataclasses

from zflora_compile.errors import InputError, PlanError
from zflora_compile.families import PLANNERS
from zflora_compile.graph.records import Detection

STRATEGIES = ("fuse", "merge", "strip")
#: the plan JSON's sections, in order (each rewrite type names its own)
SECTIONS = ("fused_groups", "merged_sites", "stripped_sites", "widened", "stripped_reads", "unfused_sites")

__all__ = ["STRATEGIES", "Plan", "PlanError", "plan"]


@dataclasses.dataclass
class Plan:
    strategy: str
    rewrites: list = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rewrites)

    def __iter__(self):
        return iter(self.rewrites)

    def to_json(self) -> dict:
        out = {"strategy": self.strategy, **{section: [] for section in SECTIONS}}
        for step in self.rewrites:
            out.setdefault(step.section, []).append(step.to_json())
        return out


def plan(detection: Detection, strategy: str) -> Plan:
    """Decide the rewrite of every site of ``detection`` for ``strategy`` (one of :data:`STRATEGIES`)."""
    if strategy not in STRATEGIES:
        raise InputError(f"unknown strategy '{strategy}' (choose from {', '.join(STRATEGIES)})")
    by_kind: dict[type, list] = {}
    for site in detection.all_sites:
        by_kind.setdefault(type(site), []).append(site)
    result = Plan(strategy)
    for kind, module in PLANNERS.items():
        result.rewrites += module.plan(by_kind.get(kind, []), strategy)
    return result
