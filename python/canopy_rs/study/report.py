"""The study's figures and its report (``report.md`` and the same content as ``report.html``)."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["make_figures", "build_report", "render_markdown", "render_html"]

Block = tuple  # ("h", level, text) | ("p", text) | ("table", headers, rows) | ("img", relpath, caption)


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(v):
        return "nan"
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
        return f"{v:.{digits}g}"
    return f"{v:.{digits}f}"


def _ci(s: Mapping[str, Any], digits: int = 3) -> str:
    return f"{_fmt(s.get('value'), digits)} [{_fmt(s.get('ci_low'), digits)}, {_fmt(s.get('ci_high'), digits)}]"


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def make_figures(out: Path, cfg: Any, pooled: Sequence[Mapping[str, Any]], traj: Mapping[tuple, tuple],
                 rollouts: Sequence[Mapping[str, Any]], panel: Sequence[Mapping[str, Any]],
                 reg: Mapping[str, Any], prompts: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """All figures (PNG + SVG under ``out/figures``; :mod:`canopy_rs.plots.study`); returns name -> relative
    PNG path."""
    from canopy_rs.plots.study import study_figures  # imports matplotlib: only when the figures are drawn

    return study_figures(out / "figures", models=[m.name for m in cfg.models], tasks=[t.name for t in cfg.tasks],
                         max_new_tokens=cfg.sampling.max_new_tokens, pooled=pooled, trajectories=traj,
                         rollouts=rollouts, panel=panel, regression=reg, prompts=prompts)


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------

_POOLED_COLS = [
    ("CE*", "ce_star"), ("E[N]", "expected_length"), ("E[r_N]", "entropy_rate"), ("GenPPL", "gen_ppl"),
    ("BF", "branching_factor"), ("ρ P", "length_rate_pearson"), ("ρ S", "length_rate_spearman"),
    ("ρ K", "length_rate_kendall"), ("D", "semantic_diversity"), ("VS", "vendi_score"),
    ("corr(N,d)", "length_diversity_pearson"), ("corr(r,d)", "rate_diversity_pearson"), ("trunc", "truncation_rate"),
]
_METRIC_LABELS = {
    "ce_star": "CE*_max", "gen_ppl": "GenPPL", "branching_factor": "BF", "length_rate_pearson": "ρ(N, r_N) Pearson",
    "length_rate_spearman": "ρ(N, r_N) Spearman", "length_rate_kendall": "ρ(N, r_N) Kendall τ-b",
    "semantic_diversity": "D", "vendi_score": "VS", "length_diversity_pearson": "corr(N, d)",
    "rate_diversity_pearson": "corr(r_N, d)",
}


def build_report(cfg: Any, summary: Mapping[str, Any], pooled: Sequence[Mapping[str, Any]],
                 boot: Sequence[Mapping[str, Any]], reg: Mapping[str, Any], prompts: Sequence[Mapping[str, Any]],
                 figs: Mapping[str, str]) -> list[Block]:
    b: list[Block] = [("h", 1, f"Study: {cfg.name}")]
    if cfg.notes:
        b.append(("p", f"**Note:** {cfg.notes}"))
    s = cfg.sampling
    pol = f"temperature {s.temperature}, top-k {s.top_k or 'off'}, top-p {s.top_p}"
    b.append(("p", f"{summary['units_done']} of {summary['units_total']} units (model × prompt) finished "
                   f"({summary['units_resumed']} resumed from earlier runs), executor {summary['executor']}, "
                   f"wall time {summary['wall_seconds']:.0f} s. M = {s.num_rollouts} rollouts per prompt, "
                   f"T_max = {s.max_new_tokens}, {pol}, seed {cfg.seed}; encoder: {cfg.encoder or 'none'}."))
    b.append(("table", ["model", "family", "variant", "source", "chat"],
              [[m.name, m.family, m.variant, m.path or f"package {m.package}", str(m.use_chat)] for m in cfg.models]))
    b.append(("table", ["task", "prompts", "source"], [[t.name, str(len(t.prompts)), t.source] for t in cfg.tasks]))

    b.append(("h", 2, "Pooled per (model, task)"))
    b.append(("p", "Unweighted means over prompts, exp after averaging (GenPPL, BF, VS), correlations pooled by "
                   "Fisher z (Pearson, Spearman) or pair counts (Kendall), as canopy_rs.pool."))
    b.append(("table", ["model", "task"] + [h for h, _ in _POOLED_COLS],
              [[r["model"], r["task"]] + [_fmt(r.get(k)) for _, k in _POOLED_COLS] for r in pooled]))

    b.append(("h", 2, "Base vs fine-tuned: paired prompt bootstrap"))
    b.append(("p", f"canopy_rs.paired_bootstrap per (family, task): the same resampled prompts for both variants, "
                   f"{cfg.bootstrap.num_replicates} replicates, seed {cfg.bootstrap.seed}; value [95% percentile CI] "
                   "and SE of delta = fine-tuned − base; % delta for positive-scale metrics."))
    for fam_task in _group(boot):
        fam, task = fam_task[0]["family"], fam_task[0]["task"]
        by: dict[str, dict[str, Mapping[str, Any]]] = {}
        for r in fam_task:
            by.setdefault(r["metric"], {})[r["side"]] = r
        rows = []
        for metric, sides in by.items():
            pct = sides.get("percent_delta")
            rows.append([_METRIC_LABELS.get(metric, metric), _ci(sides["base"]), _ci(sides["finetuned"]),
                         _ci(sides["delta"]), _fmt(sides["delta"].get("se")),
                         "–" if pct is None else _ci(pct, 1)])
        b.append(("h", 3, f"{fam} / {task} ({fam_task[0]['base']} → {fam_task[0]['finetuned']})"))
        b.append(("table", ["metric", "base", "fine-tuned", "delta", "SE(delta)", "% delta"], rows))

    b.append(("h", 2, "Does fine-tuning turn entropy rate into semantic diversity?"))
    if reg.get("skipped"):
        b.append(("p", f"Interaction model not fitted: {reg['skipped']}."))
    else:
        lo, hi = reg.get("ratio_ci", [math.nan, math.nan])
        b.append(("p", f"{reg['model']}: `{reg['formula']}` on {reg['num_rows']} panel rows "
                       f"({reg['num_prompts']} prompts){'' if reg.get('converged', True) else ' (did not converge)'}."))
        b.append(("table", ["base slope β", "fine-tuned slope β + η", "ratio (β + η)/β", "95% CI (prompt bootstrap)",
                            "replicates", "p(η = 0)"],
                  [[_fmt(reg["base_slope"]), _fmt(reg["finetuned_slope"]), _fmt(reg["ratio"], 2),
                    f"[{_fmt(lo, 2)}, {_fmt(hi, 2)}]", f"{reg['num_finite_replicates']}/{reg['num_replicates']}",
                    _fmt(reg["eta_pvalue"])]]))
        b.append(("p", "Slopes are in D per standard deviation of R̄ (R_sc). The paper reports the ratio "
                       "≈ 3 in a beta GLMM on the same terms; this is the linear mixed-model form."))
        if reg.get("note"):
            b.append(("p", f"Note: {reg['note']}."))
        se = reg.get("base_slope_se", math.nan)
        if not (math.isfinite(se) and abs(reg["base_slope"]) > 2 * se):
            b.append(("p", f"**Caution:** the base slope ({_fmt(reg['base_slope'])} ± {_fmt(se)} SE) is not clearly "
                           "different from 0, so the ratio is unstable and its interval unreliable; read the two "
                           "slopes and p(η = 0) instead."))
    if "diversity_vs_rate" in figs:
        b.append(("img", figs["diversity_vs_rate"], "D vs R̄ per prompt with both fitted slopes"))

    b.append(("h", 2, "Figures"))
    for name, cap in (("decomposition", "CE* = E[N]·E[r_N] + Cov per model and task"),
                      ("entropy_rate", "running entropy rate with the number of active rollouts"),
                      ("lengths", "length distributions")):
        if name in figs:
            b.append(("img", figs[name], cap))

    ex_rows = [r for r in prompts if r.get("exact_ce_star") is not None]
    if ex_rows:
        b.append(("h", 2, "Exact vs sampled"))
        e = cfg.exact
        b.append(("p", f"Exact canopies at max_new_tokens {e.max_new_tokens}, top-k {e.top_k or 'off'}, and "
                       f"M = {s.num_rollouts} rollouts at that same policy (mean over prompts; 'in CI': share of "
                       "prompts whose exact CE* lies in the sampled 95% CI)."))
        rows = []
        for m in cfg.models:
            for t in cfg.tasks:
                rr = [r for r in ex_rows if r["model"] == m.name and r["task"] == t.name]
                if not rr:
                    continue
                inside = [float(r["exact_sampled_ce_star_ci_lo"]) <= float(r["exact_ce_star"]) <= float(r["exact_sampled_ce_star_ci_hi"])
                          for r in rr if r.get("exact_sampled_ce_star_ci_lo") is not None]
                rows.append([m.name, t.name, str(len(rr)), _fmt(_mean(rr, "exact_ce_star")),
                             _fmt(_mean(rr, "exact_sampled_ce_star")), _fmt(_mean(rr, "exact_semantic_diversity")),
                             _fmt(_mean(rr, "exact_sampled_semantic_diversity")),
                             _fmt(_mean(rr, "exact_vendi_score")), _fmt(_mean(rr, "exact_sampled_vendi_score")),
                             f"{sum(inside)}/{len(inside)}"])
        b.append(("table", ["model", "task", "prompts", "CE* exact", "CE* sampled", "D* exact", "D sampled",
                            "VS* exact", "VS sampled", "in CI"], rows))
        if "exact_vs_sampled" in figs:
            b.append(("img", figs["exact_vs_sampled"], "exact vs sampled per prompt"))
    b.append(("p", "Files: rollouts, prompts, pooled, bootstrap, panel and regression tables (CSV and Parquet), "
                   "study.json with everything, figures/ (PNG and SVG), runs/<key>/ per-unit checkpoints."))
    return b


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _mean(rows: Sequence[Mapping[str, Any]], k: str) -> float:
    v = np.array([_num(r.get(k)) for r in rows])
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


def _group(rows: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    out: dict[tuple, list] = {}
    for r in rows:
        out.setdefault((r["family"], r["task"]), []).append(r)
    return list(out.values())


def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for blk in blocks:
        kind = blk[0]
        if kind == "h":
            out.append("#" * blk[1] + " " + blk[2])
        elif kind == "p":
            out.append(blk[1])
        elif kind == "table":
            headers, rows = blk[1], blk[2]
            out.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
            out.append("|" + "|".join("---" for _ in headers) + "|")
            out.extend("| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows)
        elif kind == "img":
            out.append(f"![{blk[2]}]({blk[1]})")
        out.append("")
    return "\n".join(out)


def _inline(s: str) -> str:
    """The two inline forms the report uses: **bold** and `code`."""
    t = html.escape(s)
    parts = t.split("**")
    t = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = t.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(blocks: Sequence[Block], title: str) -> str:
    body: list[str] = []
    for blk in blocks:
        kind = blk[0]
        if kind == "h":
            body.append(f"<h{blk[1]}>{html.escape(blk[2])}</h{blk[1]}>")
        elif kind == "p":
            body.append(f"<p>{_inline(blk[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in blk[1])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in blk[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            body.append(f'<figure><img src="{html.escape(blk[1])}" alt="{html.escape(blk[2])}">'
                        f"<figcaption>{html.escape(blk[2])}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}figcaption{color:#555;font-size:13px}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
