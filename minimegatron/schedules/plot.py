"""Draw slots — simulated by ``simulate`` or recorded by ``run_schedule`` — as a Gantt chart."""
from __future__ import annotations

from typing import Sequence

from minimegatron.schedules.simulate import Slot, bubble_fraction

__all__ = ["plot_schedule", "COLORS"]

COLORS = {"F": "#4C72B0", "B": "#55A868", "W": "#DD8452"}


def plot_schedule(slots: Sequence[Slot], ax=None, title: str | None = None, unit: float = 1.0,
                  xlabel: str = "time"):
    """One row per stage, a box per unit: ``F3`` (``F3.1`` for chunk 1: later chunks paler), idle
    white. ``unit`` divides the times (1e-3 for recorded seconds in ms). Returns the axes."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if not slots:
        raise ValueError("no slots to draw: simulate an order or run one with run_schedule first")
    t0 = min(x.start for x in slots)
    stages = sorted({x.stage for x in slots})
    chunks = 1 + max(x.chunk for x in slots)
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 0.5 * len(stages) + 1.2))
    for x in slots:
        y = len(stages) - 1 - stages.index(x.stage)
        left, width = (x.start - t0) / unit, x.duration / unit
        ax.barh(y, width, left=left, height=0.8, color=COLORS.get(x.kind, "gray"),
                alpha=1.0 - 0.45 * x.chunk / max(chunks - 1, 1), edgecolor="white", linewidth=0.5)
        label = f"{x.kind}{x.micro_batch}" + (f".{x.chunk}" if chunks > 1 else "")
        ax.text(left + width / 2, y, label, ha="center", va="center", fontsize=6, color="white")
    ax.set_yticks(range(len(stages)), [f"stage {s}" for s in reversed(stages)])
    ax.set_xlabel(xlabel)
    kinds = [k for k in COLORS if any(x.kind == k for x in slots)]
    ax.legend(handles=[Patch(color=COLORS[k], label=k) for k in kinds], loc="lower center",
              bbox_to_anchor=(0.5, 1.0), ncol=len(kinds), fontsize=7, frameon=False)
    ax.set_title(title or f"bubble {bubble_fraction(slots):.1%}", pad=16, fontsize=10)
    return ax
