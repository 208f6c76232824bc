"""Parquet tables through pyarrow (an optional dependency, imported here and only here)."""

from __future__ import annotations

from typing import Any, BinaryIO, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["table", "write", "read"]


def table(rows: Sequence[Mapping[str, Any]]) -> Any:
    """A pyarrow table of ``rows``: one column per key (in first-seen order), None where a row lacks it."""
    cols: dict[str, list] = {}
    for r in rows:
        for k in r:
            cols.setdefault(k, [])
    for r in rows:
        for k in cols:
            cols[k].append(r.get(k))
    return pa.table(cols)


def write(tbl: Any, f: BinaryIO) -> None:
    pq.write_table(tbl, f)


def read(path: Any) -> list[dict[str, Any]]:
    """The rows of a Parquet file, one dict per row."""
    return pq.read_table(path).to_pylist()
