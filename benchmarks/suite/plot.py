"""The figure of the strategy suite: test accuracy against wall time per run, one colour per
strategy, one marker per label fraction, the published figures and the time target as lines.

Owns: the drawing. Must not: compute statistics (it is handed the points) or write markdown.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.suite.spec import ANCHORS, TARGET_MINUTES

# A point: (wall minutes per run, mean test accuracy %, its sd over seeds (0 for one seed), label fraction).
Point = tuple[float, float, float, float]


def accuracy_vs_time(points: dict[str, list[Point]], path: Path) -> None:
    """Draw ``points`` ({strategy: its points}, in legend order) into the PNG ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    markers = {0.01: "o", 0.1: "s", 1.0: "^"}
    # tab10 without its grey (kept for the references), then darker extras: no two strategies share a colour
    colors = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7] + ["black", "navy", "darkgreen", "maroon"]
    for i, (strategy, pts) in enumerate(points.items()):
        color = colors[i % len(colors)]
        pts = sorted(pts, key=lambda p: p[3])
        if len(pts) > 1:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, lw=0.8, alpha=0.5)
        for j, (t, a, sd, f) in enumerate(pts):
            ax.errorbar(t, a, yerr=sd, color=color, marker=markers.get(f, "x"), ms=6, capsize=2,
                        label=strategy if j == 0 else None)
    for (name, acc), va in zip(ANCHORS[:1] + ANCHORS[3:], ("bottom", "top", "bottom")):
        ax.axhline(acc, color="0.6", ls=":", lw=0.8)
        ax.annotate(f"{name.split(',')[0]}: {acc}% (published)", (0.01, acc), xycoords=("axes fraction", "data"),
                    fontsize=7, color="0.4", va=va)
    ax.axvline(TARGET_MINUTES, color="0.6", ls="--", lw=0.8)
    ax.annotate(f"{TARGET_MINUTES:g} min", (TARGET_MINUTES, 0.02), xycoords=("data", "axes fraction"),
                fontsize=7, color="0.4", ha="right")
    ax.set_xscale("log")
    ax.set_ylim(top=98.5)  # room for the highest reference line's label
    ax.set_xlabel("wall time per run, minutes (fit + test, 2 CPU cores, log scale)")
    ax.set_ylabel("test accuracy, %")
    ax.set_title("Fashion-MNIST, EfficientNet-Lite0: o = 1% labels, s = 10%, ^ = 100% (bars: sd over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))  # outside: never hides a point
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
