"""Loading transformers models (torch and transformers, imported here at the top): the device and dtype,
loading from local files without progress noise, and :func:`load_model`. Where the files come from (the
embedded SmolLM2, a checkpoint folder, a gguf file, a hub id's cached or downloaded snapshot) is
:mod:`canopy_rs.models`'s business; transformers itself only ever reads local files.

    from canopy_rs.hf_models import load_model       # also canopy_rs.load_model
    hf_model, tokenizer = load_model()                 # the embedded SmolLM2
    hf_model, tokenizer = load_model("org/name", revision="v1.0")   # a hub id (cache first)
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Iterator, Optional, Union

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

try:  # the gguf de-quantisation loop, whose plain tqdm ignores disable_progress_bar()
    import transformers.modeling_gguf_pytorch_utils as _gguf_mod
except Exception:  # pragma: no cover - other transformers layouts
    _gguf_mod = None

from canopy_rs.errors import InvalidArgumentError  # noqa: E402
from canopy_rs.models import DTYPES, ModelSpec, has_module, remote_code_class, resolve_model  # noqa: E402

__all__ = ["load_model", "pick_device", "check_device", "hub_offline", "torch_dtype", "torch_threads", "check_remote_code"]


def pick_device(device: Optional[str] = None) -> str:
    """``device`` as given (checked by :func:`check_device`), else ``"cuda"`` when available, else ``"cpu"``."""
    if device:
        return check_device(device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> str:
    """``device`` when torch can use it here; else :class:`InvalidArgumentError` saying why (checked before a
    model is loaded, so a missing GPU is reported at once)."""
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


def torch_dtype(dtype: Optional[str], device: str) -> Any:
    """The torch dtype (or transformers' ``"auto"``) that ``dtype`` (one of :data:`~canopy_rs.models.DTYPES`)
    means on ``device``."""
    if dtype is None or dtype == "auto":
        # float32 on CPU; elsewhere the checkpoint's own dtype (transformers' "auto": a bf16 checkpoint stays
        # bf16, a gguf file is de-quantised to float32).
        return torch.float32 if torch.device(device).type == "cpu" else "auto"
    if not isinstance(dtype, str):
        return dtype
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside the block and restored after it: a CPU reduction
    split over another number of threads sums in another order, so the study fixes it per unit and gets the
    same digits in any process (a Ray actor starts with one thread, a local run with one per core)."""
    old = torch.get_num_threads()
    if old != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


@contextlib.contextmanager
def hub_offline(quiet: bool) -> Iterator[None]:
    """No network, and (when ``quiet``) none of transformers' own progress bars or info logs."""
    bar_was_on = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    # The gguf de-quantisation loop uses a plain tqdm that ignores disable_progress_bar().
    gguf_mod: Any = None
    gguf_tqdm: Any = None
    if quiet:
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        gguf_mod = _gguf_mod
        gguf_tqdm = getattr(gguf_mod, "tqdm", None)
        if gguf_tqdm is not None:
            gguf_mod.tqdm = functools.partial(gguf_tqdm, disable=True)
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
    model: Union[str, os.PathLike, ModelSpec, None] = None,
    gguf: Union[str, os.PathLike, None] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    quiet: bool = True,
    *,
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
    offline: Optional[bool] = None,
) -> tuple[Any, Any]:
    """Load ``(hf_model, tokenizer)`` (see :func:`resolve_model` for what ``model``/``gguf`` may be; neither
    means the embedded SmolLM2-135M-Instruct; ``model`` may also be a :class:`~canopy_rs.models.ModelSpec`
    already resolved).

    A hub id (``org/name``) at ``revision`` (branch, tag or commit) comes from the Hugging Face cache, else is
    downloaded unless ``offline`` (default: ``HF_HUB_OFFLINE``); transformers then reads local files only.
    ``trust_remote_code`` (off by default) allows a model whose code ships with it; without it such a model is
    refused. ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:1"``... (default: cuda when available). ``dtype``:
    ``"auto"`` (float32 on CPU, else the checkpoint's dtype; gguf files load as float32), ``"float32"``,
    ``"float16"`` or ``"bfloat16"``.
    The model is returned in eval mode on ``device``; a hub model's ``config._commit_hash`` names its commit.
    ``quiet`` hides transformers' loading bars (a hub download still shows its progress bar on stderr; resolve
    the model first with ``resolve_model(..., progress=False)`` and pass the spec to download without it).
    """
    spec = model if isinstance(model, ModelSpec) else resolve_model(model, gguf, revision=revision, offline=offline)
    check_remote_code(spec, trust_remote_code)
    dev = pick_device(device)
    tdtype = torch_dtype(dtype, dev)
    kw: dict[str, Any] = {"local_files_only": True}
    if trust_remote_code:
        kw["trust_remote_code"] = True
    if spec.gguf_file is not None:
        kw["gguf_file"] = spec.gguf_file
        if not has_module("gguf"):
            raise ImportError(
                "loading a gguf model needs the `gguf` package: pip install gguf (or the canopy_rs[demo] extra)"
            )
    with hub_offline(quiet):
        tokenizer = AutoTokenizer.from_pretrained(spec.path, **kw)
        hf_model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=tdtype, **kw)
    commit = spec.extra.get("commit")  # a hub id's, or a cache snapshot folder's
    if commit and not getattr(hf_model.config, "_commit_hash", None):
        hf_model.config._commit_hash = commit
    hf_model.to(dev)  # type: ignore[arg-type]
    hf_model.eval()
    return hf_model, tokenizer


def check_remote_code(spec: ModelSpec, trust_remote_code: bool) -> None:
    """Refuses (naming the flag) a model whose architecture exists only as code shipped with the model,
    unless ``trust_remote_code``. A config that maps to remote code but names a ``model_type`` transformers
    implements itself loads with transformers' own code, as transformers does."""
    if trust_remote_code:
        return
    found = remote_code_class(spec.path)
    if found is None:
        return
    ref, model_type = found
    if model_type in CONFIG_MAPPING_NAMES:
        return
    raise InvalidArgumentError(
        f"{spec.name} needs code that ships with the model ({ref}; model_type {model_type!r} is not one "
        f"transformers implements); running it executes that code: pass --trust-remote-code "
        "(trust_remote_code=True in Python) if you trust its source"
    )
