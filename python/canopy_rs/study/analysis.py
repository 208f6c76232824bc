"""From finished units to the study's tables: per prompt, pooled per (model, task), the paired bootstrap per
(family, task), the panel and the interaction model of docs/definitions.md#interaction-model.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from canopy_rs.estimators import paired_bootstrap, pool
from canopy_rs.estimators.bootstrap import DEFAULT_BOOTSTRAP_METRICS
from canopy_rs.estimators.bootstrap import SEMANTIC_BOOTSTRAP_METRICS as _BOOTSTRAP_SEMANTIC
from canopy_rs.runs import flatten

from .config import StudyConfig

__all__ = [
    "BOOTSTRAP_METRICS",
    "SEMANTIC_BOOTSTRAP_METRICS",
    "prompt_rows",
    "pooled_rows",
    "bootstrap_tables",
    "panel_rows",
]

# The paper's base-vs-fine-tuned table: the bootstrap's defaults (CE*, GenPPL, BF, rho(N, r_N) all three)
# without Cov(N, r_N) ...
BOOTSTRAP_METRICS = tuple(m for m in DEFAULT_BOOTSTRAP_METRICS if m != "length_rate_cov")
# ... and, with an encoder, D, VS, corr(N, d) and corr(r_N, d) (Pearson, as the paper reports them).
SEMANTIC_BOOTSTRAP_METRICS = tuple(m for m in _BOOTSTRAP_SEMANTIC if not m.endswith(("_spearman", "_kendall")))

_ID = ("model", "family", "variant", "task", "prompt_id")


def prompt_rows(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, task, prompt): the estimate's scalar fields, and ``exact_*`` / ``exact_sampled_*``
    where exact values were computed."""
    rows = []
    for r in records:
        row: dict[str, Any] = {k: r[k] for k in _ID}
        row.update(key=r["key"], seed=r["seed"], prompt_tokens=r.get("prompt_tokens"), seconds=r.get("seconds"))
        row.update(flatten({k: v for k, v in r["estimate"].items() if k != "cost"}))
        for part in ("exact", "exact_sampled"):
            if isinstance(r.get(part), Mapping):
                row.update(flatten({k: v for k, v in r[part].items() if k not in ("cost", "info")}, part + "_"))
        rows.append(row)
    return rows


def _cells(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    cells: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in records:
        cells.setdefault((r["model"], r["task"]), []).append(r)
    return cells


def pooled_rows(cfg: StudyConfig, records: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], dict]:
    """Pooled metrics per (model, task) (``canopy_rs.pool`` of the prompts' estimates) as rows, and the
    running entropy-rate trajectories ``{(model, task): (positions, rate, active)}`` for the figures."""
    rows, traj = [], {}
    cells = _cells(records)
    for m in cfg.models:
        for t in cfg.tasks:
            recs = cells.get((m.name, t.name))
            if not recs:
                continue
            p = pool([r["estimate"] for r in recs])
            d = p.to_dict()
            traj[(m.name, t.name)] = (p.trajectory_positions, p.trajectory_rate, p.trajectory_active)
            row: dict[str, Any] = {"model": m.name, "family": m.family, "variant": m.variant, "task": t.name}
            row.update({k: v for k, v in d.items() if not isinstance(v, (list, tuple, np.ndarray))})
            rows.append(row)
    return rows, traj


def _paired(cfg: StudyConfig, records: Sequence[Mapping[str, Any]]):
    """Per (family, task): the prompt ids finished for both variants (config order) and their estimates."""
    by = {(r["model"], r["task"], r["prompt_id"]): r for r in records}
    for fam, pair in cfg.families().items():
        base, ft = pair["base"], pair["fine-tuned"]
        for t in cfg.tasks:
            ids = [p["id"] for p in t.prompts if (base.name, t.name, p["id"]) in by and (ft.name, t.name, p["id"]) in by]
            yield fam, t.name, base, ft, ids, [by[(base.name, t.name, i)] for i in ids], [by[(ft.name, t.name, i)] for i in ids]


def bootstrap_tables(cfg: StudyConfig, records: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The paired prompt bootstrap (``canopy_rs.paired_bootstrap``) per (family, task): flat rows
    (family, task, metric, side, value, se, ci_low, ci_high) and one JSON-ready summary per pair."""
    metrics = BOOTSTRAP_METRICS + (SEMANTIC_BOOTSTRAP_METRICS if _has_semantics(cfg) else ())
    b = cfg.bootstrap
    rows, summaries = [], []
    for fam, task, base, ft, ids, rb, rf in _paired(cfg, records):
        if not ids:
            continue
        res = paired_bootstrap([r["estimate"] for r in rb], [r["estimate"] for r in rf], metrics=metrics,
                               num_replicates=b.num_replicates, seed=b.seed, confidence=b.confidence)
        for row in res.rows():
            rows.append({"family": fam, "task": task, "base": base.name, "finetuned": ft.name, **row})
        summaries.append({"family": fam, "task": task, "base": base.name, "finetuned": ft.name,
                          "prompt_ids": ids, **res.to_dict()})
    return rows, summaries


def _has_semantics(cfg: StudyConfig) -> bool:
    return cfg.encoder is not None or cfg.encoder_object is not None


def panel_rows(cfg: StudyConfig, records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The panel (docs/definitions.md): one row per (model, task, prompt) with D, R_bar = mean r_N, N_bar = mean N
    (and VS, CE*), ``prompt_uid = task/prompt_id`` shared by all models."""
    rows = []
    for r in records:
        e = r["estimate"]
        rows.append({
            **{k: r[k] for k in _ID},
            "prompt_uid": f"{r['task']}/{r['prompt_id']}",
            "D": _f(e.get("semantic_diversity")),
            "R_bar": _f(e.get("entropy_rate")),
            "N_bar": _f(e.get("expected_length")),
            "VS": _f(e.get("vendi_score")),
            "ce_star": _f(e.get("ce_star")),
        })
    return rows


def _f(v: Any) -> float:
    return math.nan if v is None else float(v)
