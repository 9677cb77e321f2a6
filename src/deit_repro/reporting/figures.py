"""The paper's figures redrawn from the metrics of a run: Figure 1 (top-1 vs measured
throughput, the plot of Table 5) and Figure 3 (top-1 vs training epochs, with and without
distillation).

Plotting only: the numbers arrive as plain sequences from the table modules
(:mod:`deit_repro.reporting.table_models`, :mod:`deit_repro.reporting.table_distillation`),
which also write them as tables. The PNG bytes are a function of those numbers alone: the Agg
canvas is used directly (no pyplot global state, no backend switch), the style is matplotlib's
default whatever the user's matplotlibrc says, the size and DPI are fixed, and the PNG carries no
Software/date metadata, so a rerun on the same metrics and matplotlib version writes the same file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Sequence

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

#: pixel size = SIZE * DPI; fixed so that the bytes are too
SIZE = (6.4, 4.2)
DPI = 100


@dataclass(frozen=True)
class Point:
    """One model in Figure 1: top-1 (mean, sample std over seeds) at a measured throughput."""

    label: str
    family: str  # "convnet" | "transformer": marker and colour, as in the paper
    images_per_s: float
    top1: float
    top1_std: float = 0.0
    series: str = ""  # points of one series are joined by a line (a model at two resolutions)
    sources: tuple[str, ...] = ()  # where images_per_s and top1 were read


@dataclass(frozen=True)
class Curve:
    """One line of Figure 3: per evaluated epoch the mean over seeds and the min/max band."""

    label: str
    epochs: tuple[int, ...]
    mean: tuple[float, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    sources: tuple[tuple[str, ...], ...] = ()  # per epoch, where its mean was read


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    # metadata None drops the "Software: matplotlib version ..." text chunk; Agg's PNG writer has
    # no timestamp, so the bytes depend only on the drawing.
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _figure() -> Figure:
    return Figure(figsize=SIZE, dpi=DPI, layout="constrained")


def figure1(points: Sequence[Point], *, title: str) -> bytes:
    """Top-1 against images/s (log scale), the paper's Figure 1 / Table 5 plot, as PNG bytes."""
    with matplotlib.rc_context(matplotlib.rcParamsDefault):
        fig = _figure()
        ax = fig.add_subplot()
        style = {"convnet": ("s", "tab:blue"), "transformer": ("o", "tab:red")}
        for series in sorted({p.series for p in points if p.series}):
            pts = sorted((p for p in points if p.series == series), key=lambda p: p.images_per_s)
            ax.plot(
                [p.images_per_s for p in pts],
                [p.top1 for p in pts],
                "-",
                color=style.get(pts[0].family, ("o", "gray"))[1],
                alpha=0.6,
                zorder=1,
            )
        for p in points:
            marker, color = style.get(p.family, ("o", "gray"))
            ax.errorbar(
                [p.images_per_s],
                [p.top1],
                yerr=[p.top1_std],
                fmt=marker,
                color=color,
                capsize=3,
                markersize=7,
                zorder=2,
            )
            ax.annotate(
                p.label,
                (p.images_per_s, p.top1),
                textcoords="offset points",
                xytext=(6, 5),
                fontsize=8,
            )
        ax.set_xscale("log")
        ax.set_xlabel("measured throughput (images/s, log scale)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        xs = [p.images_per_s for p in points]
        if xs:  # room for the labels on the right
            ax.set_xlim(min(xs) / 1.5, max(xs) * 4)
        return _png(fig)


def figure3(curves: Sequence[Curve], *, title: str) -> bytes:
    """Top-1 against the training budget, mean over seeds with a min/max band (paper Figure 3),
    as PNG bytes."""
    with matplotlib.rc_context(matplotlib.rcParamsDefault):
        fig = _figure()
        ax = fig.add_subplot()
        colors = ("tab:gray", "tab:red", "tab:blue", "tab:green")
        for curve, color in zip(curves, colors):
            ax.fill_between(
                curve.epochs, curve.low, curve.high, color=color, alpha=0.2, linewidth=0
            )
            ax.plot(curve.epochs, curve.mean, "o-", color=color, label=curve.label)
        ax.set_xlabel("training epochs (one run per budget, each its whole schedule)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        epochs = sorted({e for c in curves for e in c.epochs})
        if epochs:
            ax.set_xticks(epochs)
        if curves:
            ax.legend(loc="lower right", fontsize=8)
        return _png(fig)
