"""Figures for result files, drawn with matplotlib's Agg canvas directly: no pyplot, no GUI
and no global backend switch, so they work in a worker process, a headless server or
inside Slicer; written whole (temporary file, then rename)."""

from __future__ import annotations

from pathlib import Path

from ..files import atomic_path


def agg_figure(width: float, height: float, dpi: int = 120, layout: str | None = "constrained"):
    """A matplotlib ``Figure`` of ``width`` x ``height`` inches on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` as a PNG at the figure's resolution, whole or not at all."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi)
    return path
