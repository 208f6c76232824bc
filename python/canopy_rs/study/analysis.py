"""From finished units to the study's tables: per prompt, pooled per (model, task), the paired bootstrap per
(family, task), the panel and the interaction model of docs/definitions.md#interaction-model.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from canopy_rs.estimators.bootstrap import DEFAULT_BOOTSTRAP_METRICS
from canopy_rs.estimators.bootstrap import SEMANTIC_BOOTSTRAP_METRICS as _BOOTSTRAP_SEMANTIC

from .config import StudyConfig

__all__ = [
    "BOOTSTRAP_METRICS",
    "SEMANTIC_BOOTSTRAP_METRICS",
    "prompt_rows",
    "pooled_rows",
    "bootstrap_tables",
    "panel_rows",
    "interaction_model",
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
    from canopy_rs.io import flatten

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
    from canopy_rs.estimators import pool

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
    from canopy_rs.estimators import paired_bootstrap

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


def _zscore(x: np.ndarray) -> Optional[np.ndarray]:
    sd = float(np.std(x, ddof=1)) if x.size > 1 else 0.0
    return None if not (sd > 0 and math.isfinite(sd)) else (x - x.mean()) / sd


_FT_TERM = "C(variant, Treatment('base'))[T.fine-tuned]"


def _fit(df: Any, formula: str) -> tuple[float, float, Any]:
    """(base slope beta, fine-tuned change eta, fitted result) of the MixedLM with a random intercept per
    prompt_uid (REML)."""
    import statsmodels.formula.api as smf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence / boundary warnings on small panels; reported via .converged
        fit = smf.mixedlm(formula, df, groups=df["prompt_uid"]).fit(reml=True)
    return float(fit.params["R_sc"]), float(fit.params[f"R_sc:{_FT_TERM}"]), fit


def interaction_model(cfg: StudyConfig, panel: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The interaction model (docs/definitions.md#interaction-model) with statsmodels' MixedLM:

        D ~ R_sc * variant + invN_sc * variant [+ C(task)] [+ C(family)],  random intercept per prompt_uid

    R_sc = z-scored R_bar, invN_sc = z-scored 1/N_bar (the reference code's length term; dropped when N_bar
    does not vary), base the reference variant; task / family terms only when there is more than one.
    Reports the base slope beta, the fine-tuned slope beta + eta and their ratio (beta + eta) / beta with a
    percentile CI from ``bootstrap.regression_replicates`` replicates that resample prompt_uids with
    replacement (each draw keeps all models' rows of that prompt, so both variants see the same prompts;
    a prompt drawn twice enters as two groups)."""
    import pandas as pd

    out: dict[str, Any] = {"model": "statsmodels MixedLM (REML), random intercept per prompt_uid",
                           "base_slope": math.nan, "finetuned_slope": math.nan, "eta": math.nan,
                           "eta_pvalue": math.nan, "ratio": math.nan, "ratio_ci": [math.nan, math.nan],
                           "ratio_se": math.nan, "num_replicates": 0, "num_finite_replicates": 0}
    df = pd.DataFrame(list(panel))
    if df.empty:
        out["skipped"] = "no finished units"
        return out
    df = df[np.isfinite(df["D"]) & np.isfinite(df["R_bar"]) & np.isfinite(df["N_bar"])].copy()
    out["num_rows"] = int(len(df))
    if df.empty:
        out["skipped"] = "no semantic diversity: the study has no encoder (encoder.path = \"none\")"
        return out
    if set(df["variant"]) != {"base", "fine-tuned"}:
        out["skipped"] = "the panel needs rows of both variants"
        return out
    r_sc = _zscore(df["R_bar"].to_numpy(float))
    if r_sc is None:
        out["skipped"] = "R_bar does not vary across the panel"
        return out
    df["R_sc"] = r_sc
    terms = [f"R_sc * C(variant, Treatment('base'))"]
    inv_n = _zscore(1.0 / df["N_bar"].to_numpy(float))
    if inv_n is not None:
        df["invN_sc"] = inv_n
        terms.append("invN_sc * C(variant, Treatment('base'))")
    if df["task"].nunique() > 1:
        terms.append("C(task)")
    if df["family"].nunique() > 1:
        terms.append("C(family)")
    out.update(num_prompts=int(df["prompt_uid"].nunique()),
               R_bar_mean=float(df["R_bar"].mean()), R_bar_sd=float(df["R_bar"].std(ddof=1)))
    formula = "D ~ " + " + ".join(terms)
    try:
        beta, eta, fit = _fit(df, formula)
    except Exception as e:  # singular designs on tiny panels: report, do not crash the study
        if inv_n is None:
            out.update(formula=formula, skipped=f"MixedLM fit failed: {type(e).__name__}: {e}")
            return out
        # A length term that barely varies (e.g. every rollout truncated at T_max) makes the design singular:
        # fit without it and say so.
        terms = [t for t in terms if not t.startswith("invN_sc")]
        df = df.drop(columns="invN_sc")
        out["note"] = f"the length term was dropped: with it the fit failed ({type(e).__name__}: {e})"
        formula = "D ~ " + " + ".join(terms)
        try:
            beta, eta, fit = _fit(df, formula)
        except Exception as e2:
            out.update(formula=formula, skipped=f"MixedLM fit failed: {type(e2).__name__}: {e2}")
            return out
    out["formula"] = formula
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (beta + eta) / beta if beta != 0 else math.nan
    out.update(
        base_slope=beta, finetuned_slope=beta + eta, eta=eta,
        eta_pvalue=float(fit.pvalues.get(f"R_sc:{_FT_TERM}", math.nan)), ratio=ratio,
        base_slope_se=float(fit.bse.get("R_sc", math.nan)), base_slope_pvalue=float(fit.pvalues.get("R_sc", math.nan)),
        converged=bool(getattr(fit, "converged", True)),
        group_variance=float(np.asarray(fit.cov_re)[0, 0]) if fit.cov_re is not None else math.nan,
        coefficients=[{"term": k, "estimate": float(fit.params[k]), "se": float(fit.bse.get(k, math.nan)),
                       "pvalue": float(fit.pvalues.get(k, math.nan))} for k in fit.fe_params.index],
    )
    # Prompt bootstrap of the ratio (refits; the z-scores are recomputed on each replicate's panel).
    b = cfg.bootstrap.regression_replicates
    if b > 0:
        rng = np.random.default_rng(cfg.bootstrap.seed)
        uids = np.asarray(sorted(df["prompt_uid"].unique()))
        groups = {u: df[df["prompt_uid"] == u] for u in uids}
        reps = np.full(b, math.nan)
        for i in range(b):
            draw = rng.integers(0, uids.size, size=uids.size)
            parts = []
            for j, k in enumerate(draw):
                g = groups[uids[k]].copy()
                g["prompt_uid"] = f"{uids[k]}#{j}"
                parts.append(g)
            rdf = pd.concat(parts, ignore_index=True)
            rs = _zscore(rdf["R_bar"].to_numpy(float))
            if rs is None or set(rdf["variant"]) != {"base", "fine-tuned"}:
                continue
            rdf["R_sc"] = rs
            if "invN_sc" in df:
                iv = _zscore(1.0 / rdf["N_bar"].to_numpy(float))
                if iv is None:
                    continue
                rdf["invN_sc"] = iv
            try:
                bb, ee, _ = _fit(rdf, formula)
            except Exception:
                continue
            if bb != 0 and math.isfinite(bb) and math.isfinite(ee):
                reps[i] = (bb + ee) / bb
        fin = reps[np.isfinite(reps)]
        alpha = (1.0 - cfg.bootstrap.confidence) / 2.0
        out.update(num_replicates=b, num_finite_replicates=int(fin.size))
        if fin.size >= 2:
            lo, hi = np.percentile(fin, [100 * alpha, 100 * (1 - alpha)])
            out.update(ratio_ci=[float(lo), float(hi)], ratio_se=float(np.std(fin, ddof=1)))
    return out
