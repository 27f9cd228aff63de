"""Matplotlib for writing files: the one setup the comparison reports and the benchmark harness share."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend: files only, no display on CI or servers."""
    # imported on first use: half a second that only the reports need, and the backend goes before pyplot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path, dpi: int, colors: int | None = None) -> None:
    """Write `fig` as a PNG and close it; `colors` quantises it to a palette of that many colours."""
    plt = pyplot()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    if colors:
        from PIL import Image  # only for palette-quantised plots

        with Image.open(path) as im:
            small = im.convert("RGB").quantize(colors=colors)
        small.save(path, optimize=True)
