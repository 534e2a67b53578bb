"""``latency.png``: base / unfused / fused median latency per phase, whiskers from min to max."""

from __future__ import annotations

from pathlib import Path

COLORS = {"base": "#4c72b0", "unfused": "#c44e52", "fused": "#55a868"}


def latency_chart(latency: dict, path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = latency["phases"]
    figure, axes = plt.subplots(1, len(phases), figsize=(4.2 * len(phases), 4), squeeze=False)
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
    verdict = "passed" if latency["passed"] else "FAILED"
    figure.suptitle(title or f"zcompile latency gate on {latency['target']}: {verdict} (max overhead {latency['max_overhead_pct']:g}%)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
