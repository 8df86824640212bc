"""Plotting for the course: one deterministic matplotlib setup and an atomic PNG writer.

Every figure minilora draws goes through `pyplot()` (Agg backend, matplotlib's defaults plus a light grid, so a
figure looks the same on any machine) and `save_png()` (no version string in the file, so the bytes depend only on
the picture; written atomically through minilora.io). matplotlib is imported on first use, never at import time.
"""
from __future__ import annotations

import io
from pathlib import Path

PNG_META = {"Software": None}          # no version string in the file: bytes depend only on the picture
DPI = 100


def pyplot():
    """matplotlib.pyplot on the Agg backend with minilora's style (defaults + light grid, no top/right spines)."""
    import matplotlib  # imported here: imported on use, so `minilora --help` stays fast
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    matplotlib.rcdefaults()
    plt.rcParams.update({"figure.dpi": DPI, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
                         "axes.spines.right": False, "svg.hashsalt": "minilora"})
    return plt


def save_png(fig, path) -> Path:
    """PNG bytes of the figure, written atomically (minilora.io); the figure is closed. Returns the path."""
    from minilora.io import atomic_write_bytes
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata=PNG_META)
    pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
