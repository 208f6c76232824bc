"""Numbers as text: the one formatter of the study's report tables and its figures' labels."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["format_number"]


def format_number(x: Any, digits: int = 3) -> str:
    """A table-style number: None as a dash, NaN as nan, strings as they are, tiny or huge numbers in g format,
    the rest with ``digits`` decimals."""
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(v):
        return "nan"
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
        return f"{v:.{digits}g}"
    return f"{v:.{digits}f}"
