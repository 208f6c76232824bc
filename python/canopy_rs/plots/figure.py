"""The figure helpers every plot shares: a new :class:`matplotlib.figure.Figure` that pyplot never sees (no
global state, no backend switch, nothing shown), saving it as PNG and SVG, the palette."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

try:
    from matplotlib.figure import Figure
except ImportError as e:  # pragma: no cover
    raise ImportError('plots need matplotlib: pip install "canopy_rs[plot]"') from e

from canopy_rs.files import write_atomically

__all__ = ["new_figure", "new_axes", "save_figure"]

BLUE = "#3a6ea5"
ORANGE = "#e08a2c"
GREY = "#8c8c8c"
RED = "#c0392b"


def new_figure(figsize: tuple[float, float] = (6.4, 4.2), layout: Optional[str] = "constrained", **kw: Any) -> Figure:
    """A figure not registered with pyplot."""
    return Figure(figsize=figsize, layout=layout, **kw)


def new_axes(ax: Any = None, figsize: tuple[float, float] = (6.4, 4.2)) -> tuple[Any, Any]:
    """``(figure, axes)``: ``ax``'s own when given, else a new figure's single axes."""
    if ax is not None:
        return ax.figure, ax
    fig = new_figure(figsize)
    return fig, fig.add_subplot()


def save_figure(fig: Any, path: Union[str, os.PathLike], formats: Sequence[str] = ("png", "svg"), dpi: int = 150) -> list[Path]:
    """Writes ``path`` with each suffix in ``formats`` (``path``'s own suffix is replaced); returns the
    paths written. Each file is written atomically: drawn into a temporary file in the same folder, then
    renamed over the old one, so a reader sees the old figure or the new one, never a part."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for f in formats:
        q = p.with_suffix("." + f)
        write_atomically(q, lambda fh, f=f: fig.savefig(fh, dpi=dpi, format=f))
        out.append(q)
    return out


def fmt(x: float, digits: int = 3) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"
