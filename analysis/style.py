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


def note_figure(title: str, text: str) -> Figure:
    """A small figure that only says why there is nothing to draw."""
    fig, axes = new_figure(figsize=(7.5, 1.6))
    ax = axes[0, 0]
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    ax.set_title(title)
    return fig
