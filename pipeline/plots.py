"""Figures for reports: matplotlib on the Agg backend (no display, lazily imported), written atomically as PNG.

fig, ax = figure(figsize=(6, 4))
ax.plot(...)
save_png(fig, path)
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from pipeline.io import write_bytes


def figure(**subplots: Any) -> tuple[Any, Any]:
    """(figure, axes) from `plt.subplots(**subplots)` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(**subplots)


def save_png(fig: Any, path: str | Path, dpi: int = 110) -> None:
    """Lay out, write `fig` to `path` atomically (parents created), close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    write_bytes(path, buf.getvalue())
