"""The graph view and emitter over torch.fx (transitional wrapper; being rewritten)."""

from __future__ import annotations

import torch

from zflora_compile.passes.detect_fx import FxConstants, op_name

GEMM_OPS = ("linear", "mm", "addmm", "matmul", "bmm")

__all__ = ["FxConstants", "FxGraph", "GEMM_OPS", "op_name"]


class FxGraph:
    """A torch.fx GraphModule seen by the families; ``add_constant(name, tensor) -> Node`` adds a
    weight to the program (None: detection only)."""

    ir = "fx"

    def __init__(self, gm: torch.fx.GraphModule, constants: FxConstants, add_constant=None):
        self.gm = gm
        self.constants = constants
        self.add_constant = add_constant

    def gemm_count(self) -> int:
        return sum(1 for node in self.gm.graph.nodes if op_name(node) in GEMM_OPS)
