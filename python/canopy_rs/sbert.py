"""Sentence-transformers encoders for :func:`canopy_rs.embed` (sentence-transformers, imported here at the
top): a local encoder folder loaded once per (folder, device), offline and without progress noise."""

from __future__ import annotations

import functools
import os
from typing import Any, Optional

try:
    from sentence_transformers import SentenceTransformer
except ImportError as e:
    raise ImportError(
        "encoder folders are loaded with sentence-transformers: pip install 'canopy_rs[semantic]'"
    ) from e

from canopy_rs.hf_models import hub_offline, pick_device

__all__ = ["load_encoder"]


def load_encoder(path: str, device: Optional[str] = None) -> Any:
    """The sentence-transformers model in the folder ``path`` on ``device`` (checked: a missing GPU is an
    error naming it; default: cuda when available), cached per (absolute path, device)."""
    return _load(os.path.abspath(path), pick_device(device))


@functools.lru_cache(maxsize=4)
def _load(path: str, device: str) -> Any:
    # A local folder only (local_files_only: nothing is fetched from a hub, and the process's HF_HUB_OFFLINE is
    # left as it was, so a hub model named later may still be downloaded); no loading bars.
    with hub_offline(quiet=True):
        return SentenceTransformer(path, device=device, local_files_only=True)
