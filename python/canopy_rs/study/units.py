"""Units of work: one model x one prompt.

A unit samples M rollouts, embeds their generated texts, estimates the per-prompt metrics (and, when the
config asks for exact values, computes the exact canopy at a small depth / top-k plus M rollouts at that same
policy). Its result is a record plus per-rollout rows, checkpointed under ``OUT/runs/<key>/`` by the driver.

The key hashes everything that changes a unit's numbers (the model's files, chat, dtype and device, the
prompt, both policies, M, the seed, the encoder), so a rerun skips finished units and a changed setting
recomputes instead of reusing stale results.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from canopy_rs.api import exact
from canopy_rs.errors import ModelNotFoundError, StudyConfigError
from canopy_rs.estimators import estimate
from canopy_rs.runs import model_record, prompt_key
from canopy_rs.sampling import sample
from canopy_rs.semantic import embed, exact_semantics, rollout_diversity, rollout_texts

from .config import StudyConfig

__all__ = ["Unit", "make_units", "UnitRunner", "UNIT_THREADS"]

# torch's CPU thread count while a unit runs, in every executor (restored after the unit): a reduction split
# over another number of threads sums in another order and changes the 5th-6th digit, so a fixed count keeps
# local and Ray runs bit-identical. It is part of the resume key.
UNIT_THREADS = 1


@dataclass(frozen=True)
class Unit:
    model: str
    task: str
    prompt_id: str
    prompt: str
    seed: int
    key: str

    def label(self) -> str:
        return f"{self.model} / {self.task} / {self.prompt_id}"


def unit_seed(seed: int, task: str, prompt_id: str) -> int:
    """The rollout seed of a prompt: the same for every model (paired designs share random numbers) and
    independent of the prompt's position in the file."""
    h = hashlib.sha256(f"{seed}/{task}/{prompt_id}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "little") >> 1


def _key_settings(cfg: StudyConfig, fingerprints: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per model, the settings a unit's numbers depend on (everything except the prompt and its seed)."""
    common = {
        "sampling": {**cfg.sampling.policy(), "num_rollouts": cfg.sampling.num_rollouts},
        "exact": None if cfg.exact is None else {**cfg.exact.policy(cfg.sampling), "max_nodes": cfg.exact.max_nodes},
        "encoder": cfg.encoder,
        "torch_threads": UNIT_THREADS,
    }
    out = {}
    for m in cfg.models:
        out[m.name] = {
            **common,
            "model": {"name": m.name, "weights": fingerprints[m.name], "chat": m.use_chat, "dtype": m.dtype,
                      "device": m.device or "auto",
                      # the model's own code instead of transformers' can change the numbers (absent when off)
                      **({"trust_remote_code": True} if m.trust_remote_code else {})},
        }
    return out


def _fingerprint(cfg: StudyConfig, i: int) -> dict[str, Any]:
    """``models[i]``'s fingerprint; a hub model that is not cached (and may not be fetched) is refused naming
    its key, since the unit keys need the commit its revision resolves to."""
    m = cfg.models[i]
    try:
        return m.fingerprint()
    except ModelNotFoundError as e:
        raise ModelNotFoundError(f"models[{i}] ({m.name}).{'path and .gguf' if m.gguf else 'path'}: {e}") from None


def make_units(cfg: StudyConfig) -> list[Unit]:
    """Every (model, prompt) unit of the study, models in config order, then tasks, then prompts."""
    fingerprints = {m.name: _fingerprint(cfg, i) for i, m in enumerate(cfg.models)}
    settings = _key_settings(cfg, fingerprints)
    units = []
    for m in cfg.models:
        for t in cfg.tasks:
            for p in t.prompts:
                seed = unit_seed(cfg.seed, t.name, p["id"])
                key = prompt_key(p["prompt"], {**settings[m.name], "task": t.name, "prompt_id": p["id"], "seed": seed})
                units.append(Unit(model=m.name, task=t.name, prompt_id=p["id"], prompt=p["prompt"], seed=seed, key=key))
    return units


class UnitRunner:
    """Runs units in one process, keeping the current model and the encoder loaded between units (the
    local executor uses one; each Ray worker holds one)."""

    def __init__(self, cfg: StudyConfig) -> None:
        self.cfg = cfg
        self._name: Optional[str] = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._first_backend: Any = None  # the loaded model's first backend: later prompts reuse its strategy
        self._info: dict[str, Any] = {}
        self.load_seconds = 0.0
        # About 50 points of the running entropy rate, whatever T_max is.
        self._bin_step = max(1, cfg.sampling.max_new_tokens // 50)

    # --- the model --------------------------------------------------------------------------------
    def load(self, name: str) -> Optional[float]:
        """Loads the model ``name`` unless it is the one held; the seconds it took, or None when it was held."""
        if self._name == name:
            return None
        from canopy_rs.hf_models import load_model  # imports torch and transformers: only to load

        self._model = self._tokenizer = self._first_backend = None  # drop the previous model before the next
        entry = self.cfg.model(name)
        path, gguf = entry.location()
        spec = entry.spec()  # the same files, with a hub id's commit, which load_model records on the model
        t = time.perf_counter()
        self._model, self._tokenizer = load_model(spec, device=entry.device, dtype=entry.dtype, quiet=True,
                                                  trust_remote_code=entry.trust_remote_code)
        self.load_seconds = time.perf_counter() - t
        self._info = {"name": name, "path": path, "gguf": gguf, "chat": entry.use_chat,
                      **model_record(self._model, self.load_seconds)}
        self._name = name
        return self.load_seconds

    def model_info(self) -> dict[str, Any]:
        return dict(self._info)

    def _backend(self, unit: Unit) -> Any:
        from canopy_rs.backends.transformers import TransformersModel

        entry = self.cfg.model(unit.model)
        if entry.use_chat and not getattr(self._tokenizer, "chat_template", None):
            raise StudyConfigError(
                f"models[{entry.name}].chat is true but its tokenizer has no chat template; set chat = false"
            )
        first = self._first_backend
        if first is not None:  # the strategy and its self-check hold for the model: reused for every prompt
            return first.with_prompt(unit.prompt, chat=entry.use_chat)
        with warnings.catch_warnings():
            # The per-row fallback on sliding-window models is expected here and would repeat per prompt.
            warnings.filterwarnings("ignore", message=".*per-row caches instead of tree attention.*")
            first = TransformersModel(self._model, self._tokenizer, prompt=unit.prompt, chat=entry.use_chat,
                                      context_length=entry.context_length)
        self._first_backend = first
        return first

    # --- embeddings -------------------------------------------------------------------------------
    def _embed(self, texts: list[str]) -> Optional[np.ndarray]:
        if self.cfg.encoder is None and self.cfg.encoder_object is None:
            return None
        enc = self.cfg.encoder_object
        if enc is None and self.cfg.encoder != "default":
            enc = self.cfg.encoder
        return embed(texts, enc, batch_size=self.cfg.encoder_batch_size, progress=False)

    # --- one unit ---------------------------------------------------------------------------------
    def run(self, unit: Unit) -> dict[str, Any]:
        """``{"record": ..., "rollouts": [rows], "load_seconds": s}`` for one unit (``load_seconds``: the time
        this call spent loading the unit's model, None when it was already loaded; the record's ``seconds``
        counts the unit alone). torch runs with :data:`UNIT_THREADS` threads inside the unit."""
        loaded = self.load(unit.model)
        from canopy_rs.hf_models import torch_threads  # imports torch: loaded with the model above

        with torch_threads(UNIT_THREADS):
            out = self._run(unit)
        out["load_seconds"] = loaded
        return out

    def _run(self, unit: Unit) -> dict[str, Any]:
        t0 = time.perf_counter()
        entry = self.cfg.model(unit.model)
        backend = self._backend(unit)
        s = self.cfg.sampling
        ro = sample(backend, num_rollouts=s.num_rollouts, seed=unit.seed, batch_size=s.batch_size, **s.policy())
        texts = rollout_texts(ro, self._tokenizer)
        E = self._embed(texts)
        est = estimate(ro, embeddings=E, bin_step=self._bin_step)
        d = rollout_diversity(E) if E is not None else np.full(ro.num_rollouts, math.nan)
        rows = []
        toks = ro.token_lists()
        for i in range(ro.num_rollouts):
            n = int(ro.lengths[i])
            rows.append({
                "model": entry.name, "family": entry.family, "variant": entry.variant, "task": unit.task,
                "prompt_id": unit.prompt_id, "rollout": i, "length": n,
                "entropy_sum": float(ro.step_entropy_sums[i]), "entropy_rate": float(ro.entropy_rates[i]),
                "surprisal_sum": float(ro.surprisal_sums[i]), "eos": bool(ro.eos[i]),
                "truncated": bool(ro.truncated[i]), "diversity": float(d[i]), "text": texts[i],
                "tokens": " ".join(str(int(x)) for x in toks[i]),
            })
        record: dict[str, Any] = {
            "key": unit.key, "model": entry.name, "family": entry.family, "variant": entry.variant,
            "task": unit.task, "prompt_id": unit.prompt_id, "prompt": unit.prompt, "seed": unit.seed,
            "prompt_tokens": len(getattr(backend, "prompt_ids", []) or []),
            "estimate": est.to_dict(), "rollout_cost": dict(ro.cost),
        }
        if self.cfg.exact is not None:
            record.update(self._exact(unit, backend))
        record["seconds"] = time.perf_counter() - t0
        record["model_info"] = self.model_info()
        return {"record": record, "rollouts": rows}

    def _exact(self, unit: Unit, backend: Any) -> dict[str, Any]:
        """The exact canopy at the exact policy, and M rollouts at that same policy for the comparison."""
        assert self.cfg.exact is not None
        pol = self.cfg.exact.policy(self.cfg.sampling)
        want_leaves = self.cfg.encoder is not None or self.cfg.encoder_object is not None
        t = time.perf_counter()
        res = exact(backend, max_nodes=self.cfg.exact.max_nodes, return_leaves=want_leaves, **pol)
        ex = res.to_dict()
        for big in ("leaf_tokens", "leaf_probs", "leaf_lengths", "leaf_rates", "nodes"):
            ex.pop(big, None)
        if want_leaves:
            sem = exact_semantics(res, self._embed(rollout_texts(res, self._tokenizer))).to_dict()
            sem.pop("leaf_diversity", None)
            ex.update(sem)
        ex["seconds"] = time.perf_counter() - t
        ro = sample(backend, num_rollouts=self.cfg.sampling.num_rollouts, seed=unit.seed,
                    batch_size=self.cfg.sampling.batch_size, **pol)
        E = self._embed(rollout_texts(ro, self._tokenizer))
        return {"exact": ex, "exact_policy": pol, "exact_sampled": estimate(ro, embeddings=E).to_dict()}
