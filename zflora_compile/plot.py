"""``latency.png``: per phase, base / unfused / fused median latency (whiskers from min to max)
and below it the per-round fused/base ratios, their median, 95% interval and the threshold."""

from __future__ import annotations

from pathlib import Path

COLORS = {"base": "#4c72b0", "unfused": "#c44e52", "fused": "#55a868"}


def latency_chart(latency: dict, path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = latency["phases"]
    paired = any("ratios" in p for p in phases.values())
    rows = 2 if paired else 1
    figure, axes = plt.subplots(rows, len(phases), figsize=(4.2 * len(phases), 4 * rows), squeeze=False)
    for axis, (name, phase) in zip(axes[0], phases.items()):
        variants = [v for v in ("base", "unfused", "fused") if v in phase["variants"]]
        stats = [phase["variants"][v] for v in variants]
        medians = [s["median_ms"] for s in stats]
        whiskers = [[m - s["min_ms"] for m, s in zip(medians, stats)], [s["max_ms"] - m for m, s in zip(medians, stats)]]
        axis.bar(variants, medians, yerr=whiskers, capsize=6, color=[COLORS[v] for v in variants])
        for index, (median, stat) in enumerate(zip(medians, stats)):
            axis.annotate(f"{median:.3g} ms\n×{stat['ratio_to_base']:.3f}", (index, median), ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
        axis.set_title(f"{name} ({phase['seq']} tok, past {phase['past']}): fused {phase['overhead_pct']:+.1f}%", fontsize=9)
        axis.set_ylabel("median latency, ms (whiskers: min-max)")
    if paired:
        for axis, phase in zip(axes[1], phases.values()):
            _ratio_panel(axis, phase, latency)
    verdict = {"pass": "passed", "regression": "FAILED", "inconclusive": "INCONCLUSIVE"}[latency.get("verdict", "pass" if latency["passed"] else "regression")]
    figure.suptitle(title or f"zcompile latency gate on {latency['target']}: {verdict} (max overhead {latency['max_overhead_pct']:g}%)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _ratio_panel(axis, phase: dict, latency: dict) -> None:
    """The per-round fused/base ratios (in round order, jittered strip; the marker says the load
    order of the round's load), their median, the 95% interval (shaded) and the threshold
    (1 + max overhead); the A/A ratios beside them with --gate-calibrate."""
    import numpy as np

    threshold = latency.get("threshold_ratio", 1 + latency["max_overhead_pct"] / 100)
    groups = [("fused/base", phase, COLORS["fused"])]
    if phase.get("calibration"):
        groups.append(("A/A base/base", phase["calibration"], "#888888"))
    for index, (label, data, color) in enumerate(groups):
        ratios = np.asarray(data["ratios"], dtype=float)
        jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(ratios))
        loads = data.get("loads") or [{"load": 0, "rounds": len(ratios)}]
        order = np.repeat([item["load"] % 2 for item in loads], [item["rounds"] for item in loads])  # rounds of a load are contiguous
        for parity, marker in ((0, "o"), (1, "^")):  # circles: loads in the given order; triangles: reversed
            picked = order == parity
            if picked.any():
                axis.scatter(index + jitter[picked], ratios[picked], s=10, alpha=0.6, color=color, marker=marker)
        low, high = data["ratio_interval"]
        axis.fill_between([index - 0.3, index + 0.3], low, high, color=color, alpha=0.25)
        axis.hlines(data["ratio_median"], index - 0.3, index + 0.3, color=color, linewidth=2)
        axis.annotate(f"{data['ratio_median']:.3f}\n[{low:.3f}, {high:.3f}]", (index + 0.32, data["ratio_median"]), fontsize=7, va="center")
    everything = np.concatenate([np.asarray(data["ratios"], dtype=float) for _, data, _ in groups])
    bounds = [b for _, data, _ in groups for b in data["ratio_interval"]]
    low_edge = min(np.quantile(everything, 0.05), *bounds, 1.0, threshold)
    high_edge = max(np.quantile(everything, 0.95), *bounds, 1.0, threshold)
    margin = 0.08 * (high_edge - low_edge) or 0.01
    axis.set_ylim(low_edge - margin, high_edge + margin)  # a few spikes must not flatten the interval
    outside = int(np.sum((everything < low_edge - margin) | (everything > high_edge + margin)))
    if outside:
        axis.annotate(f"{outside} round(s) off the scale", (0.02, 0.02), xycoords="axes fraction", fontsize=7)
    axis.axhline(threshold, color="#c44e52", linestyle="--", linewidth=1, label=f"threshold {threshold:.3f}")
    axis.set_xticks(range(len(groups)), [g[0] for g in groups])
    axis.set_xlim(-0.6, len(groups) - 0.1)
    axis.set_ylabel("per-round ratio (band: 95% interval of the median)")
    loads = len(phase.get("loads") or [None])
    axis.set_title(f"verdict {phase['verdict']} after {phase['rounds']} rounds in {loads} load(s) (o / ^: load order)", fontsize=9)
    axis.legend(fontsize=7, loc="best")
