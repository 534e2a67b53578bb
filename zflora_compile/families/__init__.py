"""The adapter families, in detection order (transitional dispatch; being rewritten)."""

from __future__ import annotations

from zflora_compile.graph.records import DEFAULT_MAX_RANK_RATIO, Detection


def detect(graph, *, max_rank_ratio: float = DEFAULT_MAX_RANK_RATIO) -> Detection:
    """Every adapter site of ``graph`` (an OnnxGraph or FxGraph), and what was left alone, why."""
    from zflora_compile.passes.detect_lanes import combine

    if graph.ir == "onnx":
        from zflora_compile.passes.detect_lanes import detect_lanes
        from zflora_compile.passes.detect_onnx import detect_lora

        lora = detect_lora(graph.model.graph, max_rank_ratio=max_rank_ratio)
        return combine(lora, detect_lanes(graph.model.graph, lora.sites, max_rank_ratio=max_rank_ratio))
    from zflora_compile.passes.detect_fx import detect_lora_fx
    from zflora_compile.passes.detect_lanes_fx import detect_lanes_fx

    lora = detect_lora_fx(graph.gm, graph.constants, max_rank_ratio=max_rank_ratio)
    return combine(lora, detect_lanes_fx(graph.gm, graph.constants, lora.sites, max_rank_ratio=max_rank_ratio))


def rewrite(graph, plan) -> None:
    """Apply ``plan`` to ``graph`` in place, then remove what became dead."""
    if graph.ir == "onnx":
        from zflora_compile.passes.rewrite_onnx import apply_plan

        apply_plan(graph.model, plan)
    else:
        from zflora_compile.passes.rewrite_fx import apply_plan_fx

        apply_plan_fx(graph.gm, plan, graph.add_constant)


def disable_adapters(graph, detection: Detection) -> None:
    """Every detected adapter's B replaced by zeros, the graph otherwise unchanged."""
    if graph.ir == "onnx":
        from zflora_compile.passes.rewrite_onnx import disable_adapters as disable

        disable(graph.model, detection.sites, detection.widened)
    else:
        from zflora_compile.passes.rewrite_fx import disable_adapters_fx

        disable_adapters_fx(graph.gm, detection.sites, graph.constants, graph.add_constant, detection.widened)
