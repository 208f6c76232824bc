"""The study's figures and its report (``report.md`` and the same content as ``report.html``)."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from canopy_rs.text import format_number

__all__ = ["make_figures", "build_report", "render_markdown", "render_html"]

Block = tuple  # ("h", level, text) | ("p", text) | ("table", headers, rows) | ("img", relpath, caption)




def _ci(s: Mapping[str, Any], digits: int = 3) -> str:
    return f"{format_number(s.get('value'), digits)} [{format_number(s.get('ci_low'), digits)}, {format_number(s.get('ci_high'), digits)}]"


class _Notes:
    """Numbered footnotes: ``mark(text)`` gives the cell suffix ``[n]`` (one number per distinct text)."""

    def __init__(self) -> None:
        self.items: dict[str, int] = {}

    def mark(self, text: str) -> str:
        return f" [{self.items.setdefault(text, len(self.items) + 1)}]"

    def cell(self, x: Any, why: Any, digits: int = 3) -> str:
        """``format_number(x)``, with a footnote naming the cause when it is NaN (``why``: text or a callable)."""
        s = format_number(x, digits)
        if s == "nan":
            s += self.mark(why() if callable(why) else why)
        return s


def _f(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _zero_se(se: Any, value: Any) -> bool:
    """An SE of 0 (up to rounding relative to the value): no spread, so no interval."""
    s, v = _f(se), _f(value)
    return math.isfinite(s) and abs(s) <= 1e-12 * max(1.0, abs(v) if math.isfinite(v) else 1.0)


def _constancy(rollouts: Sequence[Mapping[str, Any]], t_max: int) -> dict[tuple[str, str], dict[str, bool]]:
    """Per (model, task): whether N, r_N and d are constant within every prompt, every N is T_max, and d is
    missing (no encoder): what makes the correlations undefined."""
    by: dict[tuple[str, str, str], list] = {}
    for r in rollouts:
        by.setdefault((r["model"], r["task"], r["prompt_id"]), []).append(r)
    out: dict[tuple[str, str], dict[str, bool]] = {}
    for (m, t, _), rows in by.items():
        n = np.array([_f(r.get("length")) for r in rows])
        rate = np.array([_f(r.get("entropy_rate")) for r in rows])
        d = np.array([_f(r.get("diversity")) for r in rows])
        cur = out.setdefault((m, t), {"n_const": True, "n_tmax": True, "r_const": True, "d_const": True,
                                      "d_nan": True})
        cur["n_const"] &= bool(np.ptp(n) == 0) if n.size else True
        cur["n_tmax"] &= bool(np.all(n == t_max))
        cur["r_const"] &= bool(np.ptp(rate) == 0) if rate.size else True
        dn = ~np.isfinite(d)
        cur["d_nan"] &= bool(dn.all())
        cur["d_const"] &= bool(dn.all() or np.ptp(d[~dn]) == 0)
    return out


def _nan_cause(metric: str, model: str, task: str, const: Mapping[tuple, Mapping[str, bool]], t_max: int) -> str:
    """Why ``metric`` is NaN for (model, task), read from its rollouts."""
    c = const.get((model, task))
    where = f"{model} / {task}"
    generic = (f"{_METRIC_LABELS.get(metric, metric)} is undefined for {where}: no prompt of it gives a finite "
               "value")
    if c is None:
        return f"{where}: no finished unit"
    n_why = (f"N is constant within every prompt of {where}"
             + (f" (every rollout reaches T_max = {t_max} and is truncated)" if c["n_tmax"] else ""))
    if metric.startswith("length_rate"):
        if c["n_const"]:
            return n_why + ", so ρ(N, r_N) is undefined (a correlation with a constant)"
        if c["r_const"]:
            return f"r_N is constant within every prompt of {where}, so ρ(N, r_N) is undefined"
        return generic
    if metric in ("semantic_diversity", "vendi_score") or metric.startswith(("length_diversity", "rate_diversity")):
        if c["d_nan"]:
            return "no semantic metrics: the study has no encoder (encoder.path = \"none\")"
    if metric.startswith("length_diversity"):
        if c["n_const"]:
            return n_why + ", so corr(N, d) is undefined (a correlation with a constant)"
        if c["d_const"]:
            return f"every rollout of a prompt of {where} has the same diversity d, so corr(N, d) is undefined"
    if metric.startswith("rate_diversity"):
        if c["r_const"]:
            return f"r_N is constant within every prompt of {where}, so corr(r_N, d) is undefined"
        if c["d_const"]:
            return f"every rollout of a prompt of {where} has the same diversity d, so corr(r_N, d) is undefined"
    return generic


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


def _source(m: Any) -> str:
    """Where a model came from, as its config names it (a hub id with its revision, a gguf file inside it)."""
    if m.path is None:
        return f"package {m.package}"
    rev = f" @ {m.revision}" if m.revision else ""
    return f"{m.path}{rev}" + (f", gguf {m.gguf}" if m.gguf else "") + (", remote code" if m.trust_remote_code else "")


def build_report(cfg: Any, summary: Mapping[str, Any], pooled: Sequence[Mapping[str, Any]],
                 boot: Sequence[Mapping[str, Any]], reg: Mapping[str, Any], prompts: Sequence[Mapping[str, Any]],
                 figs: Mapping[str, str], rollouts: Sequence[Mapping[str, Any]] = (),
                 boot_summaries: Sequence[Mapping[str, Any]] = ()) -> list[Block]:
    """The report as blocks (:func:`render_markdown`, :func:`render_html`). Every NaN cell carries a
    footnote naming its cause (read from ``rollouts`` where it lies in the data); a bootstrap interval from
    fewer than two prompts or with SE 0 is shown as undefined, not as an interval."""
    notes = _Notes()
    t_max = cfg.sampling.max_new_tokens
    const = _constancy(rollouts, t_max)
    b: list[Block] = [("h", 1, f"Study: {cfg.name}")]
    if cfg.notes:
        b.append(("p", f"**Note:** {cfg.notes}"))
    s = cfg.sampling
    pol = f"temperature {s.temperature}, top-k {s.top_k or 'off'}, top-p {s.top_p}"
    b.append(("p", f"{summary['units_done']} of {summary['units_total']} units (model × prompt) finished "
                   f"({summary['units_resumed']} resumed from earlier runs), executor {summary['executor']}, "
                   f"wall time {summary['wall_seconds']:.0f} s. M = {s.num_rollouts} rollouts per prompt, "
                   f"T_max = {s.max_new_tokens}, {pol}, seed {cfg.seed}; encoder: {cfg.encoder or 'none'}; "
                   f"torch with {summary.get('torch_threads', 1)} thread(s) per unit."))
    b.append(("table", ["model", "family", "variant", "source", "chat"],
              [[m.name, m.family, m.variant, _source(m), str(m.use_chat)] for m in cfg.models]))
    b.append(("table", ["task", "prompts", "source"], [[t.name, str(len(t.prompts)), t.source] for t in cfg.tasks]))

    b.append(("h", 2, "Pooled per (model, task)"))
    b.append(("p", "Unweighted means over prompts, exp after averaging (GenPPL, BF, VS), correlations pooled by "
                   "Fisher z (Pearson, Spearman) or pair counts (Kendall), as canopy_rs.pool."))
    b.append(("table", ["model", "task"] + [h for h, _ in _POOLED_COLS],
              [[r["model"], r["task"]] + [notes.cell(r.get(k), lambda k=k, r=r: _nan_cause(k, r["model"], r["task"], const, t_max))
                                          for _, k in _POOLED_COLS] for r in pooled]))

    b.append(("h", 2, "Base vs fine-tuned: paired prompt bootstrap"))
    b.append(("p", f"canopy_rs.paired_bootstrap per (family, task): the same resampled prompts for both variants, "
                   f"{cfg.bootstrap.num_replicates} replicates, seed {cfg.bootstrap.seed}; value [95% percentile CI] "
                   "and SE of delta = fine-tuned − base; % delta for positive-scale metrics."))
    n_prompts = {(x["family"], x["task"]): len(x.get("prompt_ids", ())) for x in boot_summaries}
    for fam_task in _group(boot):
        fam, task = fam_task[0]["family"], fam_task[0]["task"]
        bm, fm = fam_task[0]["base"], fam_task[0]["finetuned"]
        n = n_prompts.get((fam, task))
        by: dict[str, dict[str, Mapping[str, Any]]] = {}
        for r in fam_task:
            by.setdefault(r["metric"], {})[r["side"]] = r
        rows = []
        for metric, sides in by.items():
            def why(model: Optional[str] = None, metric: str = metric) -> str:
                for m in ([model] if model else [bm, fm]):
                    c = _nan_cause(metric, m, task, const, t_max)
                    if "no prompt of it gives" not in c or model:
                        return c
                return _nan_cause(metric, bm, task, const, t_max)

            def defined(model: str, metric: str = metric) -> Optional[int]:
                """How many of the cell's prompts give ``metric`` a finite value (None: not in the rows)."""
                rows = [r for r in prompts if r["model"] == model and r["task"] == task]
                if not any(metric in r for r in rows):
                    return None
                return sum(1 for r in rows if math.isfinite(_f(r.get(metric))))

            def interval(x: Mapping[str, Any], model: Optional[str] = None, digits: int = 3,
                         metric: str = metric) -> str:
                v = notes.cell(x.get("value"), lambda: why(model), digits)
                if not math.isfinite(_f(x.get("value"))):
                    return v
                if n is not None and n < 2:
                    return v + " [undefined]" + notes.mark(
                        f"{fam} / {task} has {n} paired prompt: a bootstrap over fewer than two prompts resamples the "
                        "same prompt every time, so it gives no interval")
                for m in [model] if model else [bm, fm]:
                    k = defined(m)
                    if k is not None and k < 2 and n is not None:
                        return v + " [undefined]" + notes.mark(
                            f"{_METRIC_LABELS.get(metric, metric)} is defined for only {k} of the {n} prompts of "
                            f"{m} / {task} (undefined in the others): the bootstrap resamples that "
                            "one value, so it gives no interval")
                if _zero_se(x.get("se"), x.get("value")):
                    return v + " [undefined]" + notes.mark(
                        "SE 0: every bootstrap replicate gives the same value, so the percentile interval has width 0 "
                        "and is no confidence interval")
                lo, hi = x.get("ci_low"), x.get("ci_high")
                cause = "the bootstrap replicates give no finite value"
                return f"{v} [{notes.cell(lo, cause, digits)}, {notes.cell(hi, cause, digits)}]"

            pct = sides.get("percent_delta")
            se = sides["delta"].get("se")
            se_txt = notes.cell(se, lambda: why())
            if n is not None and n < 2 and math.isfinite(_f(se)):
                se_txt += notes.mark(f"{fam} / {task} has {n} paired prompt: its bootstrap SE is 0 by construction "
                                     "(up to rounding), not a measured 0")
            rows.append([_METRIC_LABELS.get(metric, metric), interval(sides["base"], bm), interval(sides["finetuned"], fm),
                         interval(sides["delta"]), se_txt,
                         "–" if pct is None else interval(pct, None, 1)])
        b.append(("h", 3, f"{fam} / {task} ({fam_task[0]['base']} → {fam_task[0]['finetuned']})"))
        b.append(("table", ["metric", "base", "fine-tuned", "delta", "SE(delta)", "% delta"], rows))

    b.append(("h", 2, "Does fine-tuning turn entropy rate into semantic diversity?"))
    for d in reg.get("dropped_terms") or ():
        b.append(("p", f"**Dropped before fitting:** `{d['term']}`: {d['why']}."))
    if reg.get("skipped"):
        b.append(("p", f"Interaction model not fitted: {reg['skipped']}."))
    else:
        lo, hi = reg.get("ratio_ci", [math.nan, math.nan])
        conv = reg.get("converged", True)
        b.append(("p", f"{reg['model']}: `{reg['formula']}` on {reg['num_rows']} panel rows "
                       f"({reg['num_prompts']} prompts); design of full rank; the fit "
                       f"{'converged' if conv else '**did not converge** (read its numbers as unreliable)'}."))
        rp = reg.get("replicates") or {}
        nb = reg.get("num_replicates", 0)
        used = rp.get("converged", reg.get("num_finite_replicates", 0))
        ci_why = (f"fewer than two of the {nb} prompt-bootstrap refits converged" if nb else
                  "no prompt-bootstrap refits (bootstrap.regression_replicates = 0)")
        ratio_why = "the base slope β is 0"
        se_why = ("statsmodels gives no standard error here: the likelihood's Hessian is singular at the estimate "
                  "(e.g. the prompt variance at its boundary 0)")
        b.append(("table", ["base slope β (SE)", "fine-tuned slope β + η (SE)", "ratio (β + η)/β",
                            "95% CI (prompt bootstrap)", "refits in the CI", "p(η = 0)"],
                  [[f"{format_number(reg['base_slope'])} ({notes.cell(reg.get('base_slope_se'), se_why)})",
                    f"{format_number(reg['finetuned_slope'])} ({notes.cell(reg.get('finetuned_slope_se'), se_why)})",
                    notes.cell(reg["ratio"], ratio_why, 2),
                    f"[{notes.cell(lo, ci_why, 2)}, {notes.cell(hi, ci_why, 2)}]", f"{used}/{nb}",
                    notes.cell(reg["eta_pvalue"], se_why)]]))
        if nb:
            def reasons(d: Mapping[str, int]) -> str:
                return "; ".join(f"{k} ×{v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]))

            parts = [f"{rp.get('converged', 0)} converged (these alone make the CI and SE of the ratio)",
                     f"{rp.get('not_converged', 0)} did not converge (left out)",
                     f"{rp.get('failed', 0)} failed" + (f" ({reasons(rp['failed_reasons'])})" if rp.get("failed_reasons") else ""),
                     f"{rp.get('skipped', 0)} skipped" + (f" ({reasons(rp['skipped_reasons'])})" if rp.get("skipped_reasons") else "")]
            b.append(("p", f"Prompt-bootstrap refits ({nb}, the main fit's formula on each resampled panel): "
                           + ", ".join(parts) + "."))
        coefs = reg.get("coefficients") or []
        if coefs:
            b.append(("table", ["term", "estimate", "SE", "p"],
                      [[c["term"], format_number(c["estimate"]), notes.cell(c["se"], se_why), notes.cell(c["pvalue"], se_why)]
                       for c in coefs]))
        b.append(("p", "Slopes are in D per standard deviation of R̄ (R_sc). The paper reports the ratio "
                       "≈ 3 in a beta GLMM on the same terms; this is the linear mixed-model form."))
        if reg.get("note"):
            b.append(("p", f"Note: {reg['note']}."))
        se = reg.get("base_slope_se", math.nan)
        if not (math.isfinite(se) and abs(reg["base_slope"]) > 2 * se):
            b.append(("p", f"**Caution:** the base slope ({format_number(reg['base_slope'])} ± {format_number(se)} SE) is not clearly "
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
                       "prompts whose exact CE* lies in the sampled 95% CI, among the prompts whose sampled CE* has "
                       "an interval)."))
        rows = []
        no_enc = "no semantic metrics: the study has no encoder (encoder.path = \"none\")"
        for m in cfg.models:
            for t in cfg.tasks:
                rr = [r for r in ex_rows if r["model"] == m.name and r["task"] == t.name]
                if not rr:
                    continue
                zero_se = [_zero_se(r.get("exact_sampled_ce_star_se"), r.get("exact_sampled_ce_star")) for r in rr]
                with_ci = [r for r, z in zip(rr, zero_se) if r.get("exact_sampled_ce_star_ci_lo") is not None
                           and not z and math.isfinite(_f(r.get("exact_sampled_ce_star_se")))]
                zero = sum(zero_se)
                inside = [_f(r["exact_sampled_ce_star_ci_lo"]) <= _f(r["exact_ce_star"]) <= _f(r["exact_sampled_ce_star_ci_hi"])
                          for r in with_ci]
                in_ci = f"{sum(inside)}/{len(inside)}"
                if zero:
                    in_ci += f" ({zero} with SE 0)" + notes.mark(
                        "SE 0: all M rollouts of the prompt took the same path at the exact policy, so the sampled "
                        "CE* has no spread and no interval; such prompts are left out of the 'in CI' count")
                cause = (no_enc if cfg.encoder is None and getattr(cfg, "encoder_object", None) is None else
                         "undefined in every prompt of this cell")
                rows.append([m.name, t.name, str(len(rr)), notes.cell(_mean(rr, "exact_ce_star"), cause),
                             notes.cell(_mean(rr, "exact_sampled_ce_star"), cause),
                             notes.cell(_mean(rr, "exact_semantic_diversity"), cause),
                             notes.cell(_mean(rr, "exact_sampled_semantic_diversity"), cause),
                             notes.cell(_mean(rr, "exact_vendi_score"), cause),
                             notes.cell(_mean(rr, "exact_sampled_vendi_score"), cause), in_ci])
        b.append(("table", ["model", "task", "prompts", "CE* exact", "CE* sampled", "D* exact", "D sampled",
                            "VS* exact", "VS sampled", "in CI"], rows))
        if "exact_vs_sampled" in figs:
            b.append(("img", figs["exact_vs_sampled"], "exact vs sampled per prompt"))
    if notes.items:
        b.append(("h", 2, "Notes"))
        b.append(("p", "NaN marks a statistic that is undefined for the data, not 0; each note names the cause."))
        for text, i in notes.items.items():
            b.append(("p", f"[{i}] {text}."))
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


def _data_uri(base: Optional[Path], rel: str) -> str:
    """The figure as a data URI (base64 PNG or SVG), so that report.html is one self-contained file; the
    relative path when the file cannot be read."""
    if base is None:
        return rel
    p = base / rel
    try:
        data = p.read_bytes()
    except OSError:
        return rel
    mime = "image/svg+xml" if p.suffix.lower() == ".svg" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def render_html(blocks: Sequence[Block], title: str, base: Optional[Path] = None) -> str:
    """The report as one HTML file; with ``base`` (the folder the figures' paths are relative to) every
    figure is embedded as a base64 data URI, so the file stands alone."""
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
            body.append(f'<figure><img src="{html.escape(_data_uri(base, blk[1]))}" alt="{html.escape(blk[2])}">'
                        f"<figcaption>{html.escape(blk[2])}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}figcaption{color:#555;font-size:13px}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
