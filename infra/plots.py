"""Curves as PNG: the one line-plot helper for training (loss, lr, logit scale), zero-shot accuracy
during training, and any other per-step series. Headless (Agg), safe in workers and tasks."""

from __future__ import annotations

import io
import math
from typing import Mapping, Sequence

Series = Mapping[str, Sequence[float | None]]  # line name -> one value per x (None: no point there)


def curves_png(x: Sequence[float], panels: Mapping[str, Series], *, title: str, xlabel: str = "step",
               reference: Mapping[str, float | Mapping[str, float]] | None = None,
               log_y: Sequence[str] = ()) -> bytes:
    """Stacked panels sharing the x axis, one per ``panels`` entry (its lines labelled when more than
    one); ``reference[panel]`` draws dashed horizontal lines (a value labelled "chance", or labels to
    values: ``{"chance": 0.06, "3 x chance": 0.19}``); panels named in ``log_y`` use a log scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global figure state
    from matplotlib.figure import Figure

    names = list(panels)
    fig = Figure(figsize=(8.0, 1.0 + 2.2 * len(names)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(names), 1, sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        for label, values in panels[name].items():
            points = [(xi, v) for xi, v in zip(x, values) if v is not None and math.isfinite(v)]
            if points:
                ax.plot(*zip(*points), label=label, linewidth=1.4, marker="o" if len(points) < 30 else None,
                        markersize=3)
        lines = (reference or {}).get(name)
        if lines is not None:
            lines = lines if isinstance(lines, Mapping) else {f"chance {lines:.3g}": lines}
            for (label, value), style in zip(lines.items(), ("--", ":", "-.")):
                ax.axhline(value, color="black" if style == "--" else "grey", linestyle=style, linewidth=1,
                           label=label)
        if name in log_y:
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10, loc="left")  # a title, not a y label: long names would overlap
        ax.grid(True, alpha=0.3)
        if len(panels[name]) > 1 or lines is not None:
            ax.legend(fontsize=8, loc="best")
    axes[-1, 0].set_xlabel(xlabel)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
