"""Run folders (what ``canopy-rs`` and :func:`canopy_rs.run_study` write), their keys, resume, checkpoints,
locks, model records and tables: ``result.json``, per-prompt / per-rollout / per-node CSV (and Parquet when pyarrow is
importable), and per-prompt checkpoints so that an interrupted run resumes where it stopped.

Layout of an output directory::

    DIR/result.json        everything: the run's configuration, library and model versions, seeds, per-prompt
                           records (exact result / bracket / estimates) and pooled values
    DIR/prompts.csv        one row per prompt, scalar fields flattened (exact_*, bounds_*, mc_*, err_*)
    DIR/rollouts.csv       one row per sampled rollout (prompt, N, sum h, r_N, surprisal, flags, token ids)
    DIR/nodes.csv          one row per canopy node (with --nodes)
    DIR/*.parquet          the same tables, when pyarrow is installed
    DIR/runs/<key>/        per-prompt checkpoints: record.json (+ rollouts.csv, nodes.csv)
    DIR/.canopy-rs.lock    held while a run writes DIR
    DIR/.canopy-rs-files.json  the files the tool wrote in DIR: a rerun removes those it does not write
                           again (so no table or plot of another configuration stays beside result.json)

A prompt's ``key`` hashes the prompt text, its position and every setting that changes its numbers, so
rerunning into the same ``DIR`` skips prompts whose checkpoint matches and recomputes the others. Every file is written
atomically (a temporary file renamed over it), and a checkpoint's record lists the size and SHA-256 of its
tables: a damaged checkpoint is recomputed, never trusted.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from canopy_rs.errors import InvalidArgumentError
from canopy_rs.files import write_atomically
from canopy_rs.results import to_plain

__all__ = [
    "dumps",
    "prompt_key",
    "RunDir",
    "model_record",
    "write_csv",
    "rollout_rows",
    "node_rows",
    "flatten",
    "have_parquet",
]

RESULT_JSON = "result.json"
PROMPTS_CSV = "prompts.csv"
ROLLOUTS_CSV = "rollouts.csv"
NODES_CSV = "nodes.csv"


# --------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------


def dumps(v: Any, *, strict: bool = True, indent: Optional[int] = 2) -> str:
    return json.dumps(to_plain(v, strict=strict), indent=indent, allow_nan=not strict)


def _atomic_write(path: Path, text: str) -> None:
    data = text.encode("utf-8")
    write_atomically(path, lambda f: f.write(data))


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------

def prompt_key(prompt: str, config: Mapping[str, Any]) -> str:
    """A short stable hash of the prompt and the settings that determine its results."""
    blob = json.dumps({"prompt": prompt, "config": to_plain(config, strict=True)}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Scalar fields of a nested dict as ``prefix+key`` columns (arrays and lists are left out, except
    ``*_ci`` intervals, which become ``*_ci_lo`` / ``*_ci_hi``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, name + "_"))
        elif isinstance(v, (list, tuple, np.ndarray)):
            if k.endswith("_ci") and len(v) == 2:
                out[name + "_lo"], out[name + "_hi"] = v[0], v[1]
        elif isinstance(v, (str, int, float, bool, np.number)) or v is None:
            out[name] = v.item() if isinstance(v, np.generic) else v
    return out


def write_csv(path: Union[str, os.PathLike], rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None) -> None:
    """Rows to CSV (columns: the union in first-seen order unless given); floats at full precision."""
    if columns is None:
        seen: dict[str, None] = {}
        for r in rows:
            for k in r:
                seen.setdefault(k, None)
        columns = list(seen)
    import io as _io

    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_value(r.get(k)) for k in columns})
    _atomic_write(Path(path), buf.getvalue())


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_csv(path: Union[str, os.PathLike]) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def have_parquet() -> bool:
    """Whether Parquet tables can be written (pyarrow importable)."""
    try:
        from canopy_rs import parquet  # noqa: F401  (imports pyarrow)
    except Exception:
        return False
    return True


def write_parquet(path: Union[str, os.PathLike], rows: Sequence[Mapping[str, Any]]) -> bool:
    """Writes rows as Parquet when pyarrow is importable; returns whether it did."""
    if not have_parquet() or not rows:
        return False
    from canopy_rs import parquet

    table = parquet.table(rows)
    write_atomically(Path(path), lambda f: parquet.write(table, f))
    return True


def rollout_rows(rollouts: Any, prompt_index: int, tokenizer: Any = None) -> list[dict[str, Any]]:
    """One row per rollout of a :class:`canopy_rs.sampling.Rollouts`: N, sum of step entropies H, r_N = H/N,
    surprisal sum S, flags, and the token ids (space separated; ``text`` too when a tokenizer is given)."""
    lengths = np.asarray(rollouts.lengths)
    h = np.asarray(rollouts.step_entropy_sums)
    s = np.asarray(rollouts.surprisal_sums)
    eos = np.asarray(rollouts.eos)
    trunc = np.asarray(rollouts.truncated)
    toks = rollouts.token_lists()
    rows = []
    for i in range(len(lengths)):
        n = int(lengths[i])
        row = {
            "prompt_index": prompt_index,
            "rollout": i,
            "length": n,
            "entropy_sum": float(h[i]),
            "entropy_rate": float(h[i]) / max(n, 1),
            "surprisal_sum": float(s[i]),
            "eos": bool(eos[i]),
            "truncated": bool(trunc[i]),
            "tokens": " ".join(str(int(t)) for t in toks[i]),
        }
        if tokenizer is not None:
            try:
                row["text"] = tokenizer.decode(toks[i], skip_special_tokens=False)
            except Exception:
                pass
        rows.append(row)
    return rows


def node_rows(nodes: Mapping[str, np.ndarray], prompt_index: int) -> list[dict[str, Any]]:
    """One row per canopy node from ``CanopyResult.nodes`` (``parent, token, depth, log_reach, entropy,
    is_leaf``); ``node`` is the engine id, ``reach`` = exp(log_reach)."""
    cols = {k: np.asarray(v) for k, v in nodes.items()}
    n = len(next(iter(cols.values()))) if cols else 0
    ids = cols.get("id", np.arange(n))
    rows = []
    for i in range(n):
        row: dict[str, Any] = {"prompt_index": prompt_index, "node": int(ids[i])}
        for k, v in cols.items():
            if k == "id":
                continue
            x = v[i]
            row[k] = bool(x) if v.dtype == np.bool_ else (int(x) if np.issubdtype(v.dtype, np.integer) else float(x))
        if "log_reach" in row:
            row["reach"] = math.exp(row["log_reach"])
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# The output directory
# --------------------------------------------------------------------------------------------------


LOCK_FILE = ".canopy-rs.lock"
RECORD_JSON = "record.json"
# The manifest of the files this tool wrote in a run folder (see RunDir.owned).
OWNED_JSON = ".canopy-rs-files.json"


def _relative_inside(name: str) -> bool:
    """Whether ``name`` is a relative path that stays inside the folder (what a manifest may list)."""
    p = Path(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts


def file_digest(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of a file: what a checkpoint record stores to verify its tables."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _try_lock(fd: int) -> bool:
    """An exclusive, non-blocking lock on an open file; released when the descriptor is closed (also when
    the process dies)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def model_record(hf_model: Any, load_seconds: float) -> dict[str, Any]:
    """What a run records about a loaded transformers model: device, dtype, architecture, model type,
    parameter count and load time (read from the model object; no torch import here)."""
    p = next(hf_model.parameters())
    cfg = hf_model.config
    return {
        "device": str(p.device),
        "dtype": str(p.dtype).replace("torch.", ""),
        "architecture": (getattr(cfg, "architectures", None) or [type(hf_model).__name__])[0],
        "model_type": getattr(cfg, "model_type", None),
        "num_parameters": int(sum(x.numel() for x in hf_model.parameters())),
        "load_seconds": load_seconds,
        # A hub model's commit (transformers sets it for a cache snapshot): the exact weights of the result.
        "commit": getattr(cfg, "_commit_hash", None),
    }


# The tables a checkpoint may hold (the only names its record's checksums may list).
CHECKPOINT_TABLES = (ROLLOUTS_CSV, NODES_CSV)
# The fields every CLI per-prompt record has, with their types (what a resumed record must hold).
RECORD_SCHEMA: dict[str, Any] = {"key": str, "index": int, "id": str, "prompt": str}


def _checksums_shape(digests: Mapping[str, Any]) -> Optional[str]:
    """Why a record's ``checksums`` is malformed (None when it is well formed): each entry names a
    checkpoint table and holds ``{"bytes": int, "sha256": str}``."""
    for name, want in digests.items():
        if name not in CHECKPOINT_TABLES:
            return f"checksums names {name!r}, not one of {', '.join(CHECKPOINT_TABLES)}"
        if (not isinstance(want, dict) or not isinstance(want.get("bytes"), int) or isinstance(want.get("bytes"), bool)
                or not isinstance(want.get("sha256"), str)):
            return f"checksums[{name!r}] is {want!r}, not {{'bytes': int, 'sha256': str}}"
    return None


def _record_shape(rec: Mapping[str, Any], key: str, schema: Optional[Mapping[str, Any]], where: str = "") -> Optional[str]:
    """Why a record does not fit ``schema`` (None when it does): each field maps to a type, a tuple of
    types, or a nested schema (a dict: the field must be an object holding those fields)."""
    for name, kind in (schema or {}).items():
        v = rec.get(name)
        label = f"{where}{name}"
        if isinstance(kind, Mapping):
            if not isinstance(v, dict):
                return f"{label!r} is {'missing' if name not in rec else type(v).__name__}, not an object"
            why = _record_shape(v, key, kind, label + ".")
            if why:
                return why
            continue
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if name not in rec or not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
            names = "/".join("null" if k is type(None) else k.__name__ for k in kinds)
            return f"{label!r} is {'missing' if name not in rec else type(v).__name__}, not {names}"
    if not where and schema and "key" in schema and rec.get("key") != key:
        return f"its key {rec.get('key')!r} is not the folder's {key!r}"
    return None


class RunDir:
    """An output directory with per-prompt checkpoints (see the module docstring).

    Opening it creates the directory if needed and takes a lock (``.canopy-rs.lock``) for the life of the
    object, so two runs never write the same directory: the second raises :class:`InvalidArgumentError`
    saying which process holds it. :meth:`close` releases the lock; after a failed run it also removes the
    directories this run created that are still empty."""

    def __init__(self, path: Union[str, os.PathLike]) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise InvalidArgumentError(f"output directory {self.path}: exists and is not a directory; "
                                       "name a directory (it is created when missing)")
        self._created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd: Optional[int] = None
        try:
            self._lock()
        except BaseException:
            self.close(ok=False)
            raise

    def _lock(self) -> None:
        lock = self.path / LOCK_FILE
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
            if not _try_lock(fd):
                try:
                    holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
                finally:
                    os.close(fd)
                raise InvalidArgumentError(
                    f"output directory {self.path} is in use by another canopy-rs run ({holder}); wait for it "
                    "to finish or choose another directory"
                )
            try:  # the previous holder may have removed the file between our open and our lock
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {platform.node()}, since {time.strftime('%H:%M:%S')}".encode())
        self._lock_fd = fd

    def close(self, ok: bool = True) -> None:
        """Releases the lock; after a failed run (``ok=False``) removes the empty directories it left."""
        if self._lock_fd is not None:
            try:
                os.unlink(self.path / LOCK_FILE)
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None
        if ok:
            return
        for root, _dirs, _files in os.walk(self.path, topdown=False):
            if Path(root) == self.path and not self._created:
                continue
            try:
                os.rmdir(root)  # only succeeds when empty: finished checkpoints stay for a resume
            except OSError:
                pass

    @classmethod
    def reader(cls, path: Union[str, os.PathLike]) -> "RunDir":
        """The directory for reading checkpoints only (:meth:`load`, :meth:`finished`): no lock is taken and
        nothing is created (``canopy-rs study CONFIG --plan`` reads a folder a running study may hold)."""
        self = cls.__new__(cls)
        self.path = Path(path)
        self._created = False
        self._lock_fd = None
        return self

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(ok=exc_type is None)

    def _run(self, key: str) -> Path:
        return self.path / "runs" / key

    def load(self, key: str, schema: Optional[Mapping[str, Any]] = None) -> tuple[Optional[dict[str, Any]], Optional[str]]:
        """``(record, None)`` for a finished prompt whose checkpoint verifies, ``(None, None)`` when there is
        none, and ``(None, why)`` when one exists but is damaged (unreadable, incomplete, of the wrong shape,
        or a table whose size or SHA-256 differs from what the record says): the caller recomputes it.
        ``schema`` maps the fields the caller needs to their type(s) (:data:`RECORD_SCHEMA` for the CLI's
        records): a record lacking one, or holding another type, is damaged too; a ``key`` field must be
        ``key``."""
        d = self._run(key)
        p = d / RECORD_JSON
        if not p.exists():
            return None, None
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            return None, f"{RECORD_JSON} unreadable ({e})"
        if not isinstance(rec, dict) or rec.get("complete") is not True:
            return None, f"{RECORD_JSON} incomplete"
        digests = rec.pop("checksums", None)
        if not isinstance(digests, dict):
            return None, f"{RECORD_JSON} has no checksums (written by an older canopy-rs)"
        why = _checksums_shape(digests) or _record_shape(rec, key, schema)
        if why:
            return None, f"{RECORD_JSON} has the wrong shape ({why})"
        for name, want in digests.items():
            f = d / name
            if not f.is_file():
                return None, f"{name} is missing"
            got = file_digest(f)
            if got != want:
                return None, (f"{name} has {got['bytes']} bytes" + (" and another SHA-256" if got["bytes"] ==
                              want["bytes"] else "") + f", the record says {want['bytes']}")
        rec.pop("complete")
        return rec, None

    def finished(self, key: str, *, fresh: bool = False, damaged: Optional[Callable[[str], None]] = None,
                 schema: Optional[Mapping[str, Any]] = None) -> Optional[dict[str, Any]]:
        """Resume: the record of ``key`` when its checkpoint verifies (None when ``fresh``, when there is none,
        or when it is damaged: then ``damaged(why)`` is told and the caller recomputes it). ``schema``: as
        for :meth:`load`."""
        if fresh:
            return None
        rec, why = self.load(key, schema)
        if why and damaged is not None:
            damaged(why)
        return rec

    def save(
        self,
        key: str,
        record: Mapping[str, Any],
        rollouts: Optional[Sequence[Mapping[str, Any]]] = None,
        nodes: Optional[Sequence[Mapping[str, Any]]] = None,
    ) -> None:
        """Checkpoints one prompt. Each file is written atomically and the record last, with the size and
        SHA-256 of each table, so a prompt counts as done only once all its files are complete and
        :meth:`load` can tell a damaged table from a good one."""
        d = self._run(key)
        d.mkdir(parents=True, exist_ok=True)
        digests = {}
        for name, rows in ((ROLLOUTS_CSV, rollouts), (NODES_CSV, nodes)):
            if rows is not None:
                write_csv(d / name, rows)
                digests[name] = file_digest(d / name)
        rec = dict(record, complete=True, checksums=digests)
        # NaN kept as NaN here (Python's json reads it back): pooling needs the floats.
        _atomic_write(d / RECORD_JSON, dumps(rec, strict=False))

    def rows(self, key: str, table: str) -> list[dict[str, Any]]:
        p = self._run(key) / table
        return read_csv(p) if p.is_file() else []

    def write_result(self, result: Mapping[str, Any]) -> Path:
        return self.write_json(RESULT_JSON, result)

    # --- the files a run owns here ---------------------------------------------------------------------
    def owned(self) -> list[str]:
        """The files (paths relative to the folder) that runs of this tool wrote here: the manifest
        (``.canopy-rs-files.json``), else the ``files`` list of a ``result.json`` written before there was
        one. Only these are ever removed; anything else in the folder is the user's."""
        for name in (OWNED_JSON, RESULT_JSON):
            try:
                d = json.loads((self.path / name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            files = d.get("files") if isinstance(d, dict) else None
            if isinstance(files, list):
                return [f for f in files if isinstance(f, str) and _relative_inside(f)]
        return []

    def own(self, names: Sequence[str]) -> None:
        """Records ``names`` (relative paths) as the files this tool owns here (the manifest, written
        atomically before and after the files themselves, so that a later run can remove what this one
        wrote and the next one does not)."""
        self.write_json(OWNED_JSON, {"files": sorted(set(names))})

    def remove_owned(self, names: Sequence[str], keep: Sequence[str] = ()) -> list[str]:
        """Removes the plain files among ``names`` (relative paths this tool owns here) that are not in
        ``keep``; returns the names removed."""
        keep_set = set(keep) | {OWNED_JSON}
        removed = []
        for name in sorted(set(names)):
            f = self.path / name
            if name in keep_set or not _relative_inside(name) or f.is_symlink() or not f.is_file():
                continue
            f.unlink()
            removed.append(name)
        return removed

    def clear(self) -> list[str]:
        """``--fresh``: removes what the tool owns here: the files earlier runs wrote (``result.json`` and
        the manifest included) and the per-prompt checkpoints under ``runs/``. Returns what it removed
        (a checkpoint as ``runs/<key>/``)."""
        removed = self.remove_owned(self.owned() + [RESULT_JSON])
        runs = self.path / "runs"
        if runs.is_dir() and not runs.is_symlink():
            for d in sorted(runs.iterdir()):
                if not d.is_dir() or d.is_symlink():
                    continue
                for f in d.iterdir():
                    if f.name in (RECORD_JSON, *CHECKPOINT_TABLES) or f.name.endswith(".tmp"):
                        f.unlink()
                try:
                    d.rmdir()
                    removed.append(f"runs/{d.name}/")
                except OSError:
                    pass  # something of the user's inside: kept
            try:
                runs.rmdir()
            except OSError:
                pass
        try:
            (self.path / OWNED_JSON).unlink()
        except FileNotFoundError:
            pass
        return removed

    def write_json(self, name: str, obj: Any) -> Path:
        """``name`` in the directory, strict JSON (NaN as null), written atomically."""
        p = self.path / name
        _atomic_write(p, dumps(obj, strict=True) + "\n")
        return p

    def write_text(self, name: str, text: str) -> Path:
        p = self.path / name
        _atomic_write(p, text)
        return p

    def write_table(self, name: str, rows: Sequence[Mapping[str, Any]], parquet: bool = True) -> list[Path]:
        """``name.csv`` (and ``name.parquet`` when pyarrow is importable)."""
        out = [self.path / f"{name}.csv"]
        write_csv(out[0], rows)
        if parquet and rows and write_parquet(self.path / f"{name}.parquet", _typed(rows)):
            out.append(self.path / f"{name}.parquet")
        return out


def _parse_column(values: list[Any]) -> list[Any]:
    """One column's CSV strings as bools, ints or floats when every entry parses as that type ("" is a
    missing value); otherwise every entry as a string, so that a column never mixes types (Parquet
    refuses that: a hex key or a prompt id that happens to look like a number must stay text)."""
    strs = [v for v in values if isinstance(v, str) and v != ""]
    if not strs:
        return [None if v == "" else v for v in values]
    for kind in ("bool", "int", "float"):
        try:
            if kind == "bool":
                if any(v not in ("True", "False") for v in strs):
                    continue
                conv: Any = lambda v: v == "True"  # noqa: E731
            else:
                conv = int if kind == "int" else float
                for v in strs:
                    conv(v)
        except ValueError:
            continue
        return [None if v == "" else (conv(v) if isinstance(v, str) else v) for v in values]
    return [None if v is None else str(v) for v in values]


def _typed(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """CSV round-tripped rows (strings) back to bools/numbers for Parquet, column by column; free-text
    columns (tokens, text, prompt, id) stay text."""
    cols: dict[str, None] = {}
    for r in rows:
        for k in r:
            cols.setdefault(k, None)
    out: list[dict[str, Any]] = [dict() for _ in rows]
    for k in cols:
        values = [r.get(k) for r in rows]
        if k in ("tokens", "text", "prompt", "id"):
            parsed = [None if v is None else str(v) for v in values]
        else:
            parsed = _parse_column(values)
        for t, r, v in zip(out, rows, parsed):
            if k in r:
                t[k] = v
    return out
