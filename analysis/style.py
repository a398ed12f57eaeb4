"""Deterministic matplotlib: the Agg backend, fixed fonts and sizes, no dates in files.

Saving goes through `save_figure`, which strips the PNG/PDF metadata that would make
two runs differ (creation dates, software versions) and fixes the SVG hash salt.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no display; also the only backend whose output we test

from matplotlib import colormaps  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

DPI = 100
LOGIT_UNIT = "centred logits"
RC = {
    "figure.figsize": (7.5, 4.8),
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "svg.hashsalt": "selfrepair",
    "pdf.compression": 6,
}
# Metadata keys set to None are left out of the file: no dates, no version strings.
METADATA = {
    "png": {"Software": None},
    "pdf": {"Creator": None, "Producer": None, "CreationDate": None, "ModDate": None},
    "svg": {"Creator": None, "Date": None},
}
MODEL_COLOURS = colormaps["tab10"].colors


def new_figure(nrows: int = 1, ncols: int = 1, figsize=None, **kwargs):
    """A figure (not registered with pyplot) and a 2-D array of its axes.

    Call inside `rc()` so the project's fonts and sizes apply to every artist.
    """
    fig = Figure(figsize=figsize or RC["figure.figsize"], layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def rc():
    """The project's rc settings as a context manager (plotting and saving run inside)."""
    return matplotlib.rc_context(RC)


def caption(fig: Figure, text: str) -> None:
    """Keep the figure's caption on it (the report prints it under the image)."""
    fig.selfrepair_caption = text


def attach(fig: Figure, df) -> Figure:
    """Keep the frame a figure drew on it, so tests can compare it with the query."""
    fig.selfrepair_data = df
    return fig


def figure_bytes(fig: Figure, fmt: str) -> bytes:
    """The figure encoded as `png`, `pdf` or `svg`, byte-identical across runs."""
    buf = io.BytesIO()
    with rc():
        fig.savefig(buf, format=fmt, metadata=METADATA[fmt])
    return buf.getvalue()


SHARE_LIMITS = (-100.0, 200.0)  # percent: a layer whose DE is near 0 gives shares far outside this


def keep_readable(ax, limits=SHARE_LIMITS) -> str:
    """Cap a share axis at `limits` when the data run past them, and mark what lies beyond.

    A ratio of means explodes where the mean DE is near 0 (layer 0 often): one such point
    would squeeze every other to a flat line. Points and line vertices outside are drawn
    on the edge as triangles. Returns a caption sentence ("" when nothing was capped).
    """
    import numpy as np

    lo, hi = limits
    beyond = 0
    for artist in [*ax.lines, *ax.collections]:
        if hasattr(artist, "get_offsets") and len(artist.get_offsets()):
            xy = np.asarray(artist.get_offsets(), dtype=float)
        elif hasattr(artist, "get_xydata"):
            xy = np.asarray(artist.get_xydata(), dtype=float)
        else:
            continue
        if xy.ndim != 2 or not len(xy) or np.allclose(xy[:, 1], xy[0, 1]) and len(xy) == 2:
            continue  # reference lines (axhline)
        y = xy[:, 1]
        out_hi, out_lo = y > hi, y < lo
        beyond += int(out_hi.sum() + out_lo.sum())
        colour = artist.get_color() if hasattr(artist, "get_xydata") else artist.get_facecolor()[0]
        ax.scatter(xy[out_hi, 0], np.full(out_hi.sum(), hi), marker="^", s=28, color=colour, clip_on=False, zorder=5)
        ax.scatter(xy[out_lo, 0], np.full(out_lo.sum(), lo), marker="v", s=28, color=colour, clip_on=False, zorder=5)
    if not beyond:
        return ""
    ax.set_ylim(lo, hi)
    return (f" {beyond} value(s) beyond {lo:g}%…{hi:g}% (a mean DE near 0) are drawn as triangles on the "
            "axis edge; the query has their exact values.")
