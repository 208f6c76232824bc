"""Text output shared by the commands: numbers, plain tables, the run header and the result tables."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

__all__ = ["num", "short", "format_table", "policy_line", "header", "exact_table", "multi_exact_table",
           "estimate_table", "multi_estimate_table"]


def short(s: str, n: int) -> str:
    """``s`` on one line, cut to ``n`` characters with an ellipsis."""
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 1] + "…"


def num(x: Any, digits: int = 4, signed: bool = False) -> str:
    """A number for a table cell: ``-`` for missing, ``nan``/``inf`` spelled out."""
    if x is None:
        return "-"
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: Optional[str] = None) -> str:
    """A plain text table; ``align`` is one char per column (l or r; default: first l, rest r)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in cells:
        for j, c in enumerate(r):
            widths[j] = max(widths[j], len(c))
    align = align or ("l" + "r" * (len(headers) - 1))

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)).rstrip()

    out = [line(list(headers)), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def policy_line(pol: Mapping[str, Any]) -> str:
    k = pol.get("top_k")
    return (f"temperature {pol['temperature']:g}, top-k {k if k else 'off'}, top-p {pol['top_p']:g}, "
            f"max_new_tokens {pol['max_new_tokens']}")


def header(model_name: str, chat: Optional[bool], policy: Mapping[str, Any], records: Sequence[Mapping]) -> str:
    """The lines above every result table: model, chat template, policy and (one prompt) the prompt."""
    lines = [f"model: {model_name}" + ("" if chat is None else f"  |  chat template: {'on' if chat else 'off'}"),
             f"policy: {policy_line(policy)}"]
    if len(records) == 1:
        lines.append(f"prompt: {short(records[0]['prompt'], 100)!r}")
    return "\n".join(lines)


def _exact_truncation_rate(ex: Mapping[str, Any]) -> Optional[float]:
    """The exact P(N >= T_max): the reference code's truncation flag also counts an EOS exactly at the cap,
    so it is the last entry of the length pmf (``truncation_prob`` is P(no EOS by the cap))."""
    pmf = ex.get("length_pmf") or []
    return float(pmf[-1]) if len(pmf) else None


EXACT_ROWS = [
    ("CE*_max (nats)", "ce_star"),
    ("  leaf form -sum pi log pi", "ce_star_leaves"),
    ("exp(CE*) effective leaves", None),
    ("H(N) length entropy", "length_entropy"),
    ("H(Y|N) content entropy", "content_entropy"),
    ("E[N]", "expected_length"),
    ("entropy rate E[r_N]", "entropy_rate"),
    ("GenPPL", "gen_ppl"),
    ("branching factor", "branching_factor"),
    ("rho(N, r_N)", "length_rate_corr"),
    ("Cov(N, r_N)", "length_rate_cov"),
    ("E[N]E[r_N] (length-driven)", "length_driven"),
    ("P(no EOS by the cap)", "truncation_prob"),
    ("truncation rate P(N >= T_max)", "truncation_rate"),
    ("internal nodes / leaves", None),
]


def exact_table(ex: Mapping[str, Any]) -> str:
    """One prompt's exact values, one per row."""
    ex = dict(ex, truncation_rate=_exact_truncation_rate(ex))
    rows = []
    for label, key in EXACT_ROWS:
        if key is not None:
            rows.append([label, num(ex.get(key), 6)])
        elif label.startswith("exp"):
            rows.append([label, num(math.exp(ex["ce_star"]), 2)])
        else:
            rows.append([label, f"{ex['num_internal_nodes']:,} / {ex['num_leaves']:,}"])
    rows.append(["model tokens (prompt excluded)", f"{int(ex.get('model_tokens', 0)):,}"])
    rows.append(["seconds", num(ex.get("seconds"), 2)])
    return format_table(["quantity", "exact"], rows)


def multi_exact_table(records: Sequence[Mapping], pooled: Mapping[str, Any]) -> str:
    """One row per prompt's exact values, and the pooled row."""
    rows = []
    for r in records:
        e = r["exact"]
        rows.append([r["index"], short(r["prompt"], 32), num(e["ce_star"]), num(e["expected_length"], 3),
                     num(e["entropy_rate"]), num(e["gen_ppl"], 3), num(e["branching_factor"], 3),
                     num(e["length_rate_corr"], 3), num(e["truncation_prob"], 3), f"{e['num_internal_nodes']:,}"])
    rows.append(["all", f"pooled ({len(records)} prompts)", num(pooled["ce_star"]), num(pooled["expected_length"], 3),
                 num(pooled["entropy_rate"]), num(pooled["gen_ppl"], 3), num(pooled["branching_factor"], 3),
                 num(pooled["length_rate_corr"], 3), num(pooled["truncation_prob"], 3), ""])
    return format_table(["#", "prompt", "CE*", "E[N]", "rate", "GenPPL", "BF", "rho", "P(trunc)", "nodes"], rows,
                        "llrrrrrrrr")


ESTIMATE_ROWS = [
    # label, estimate key, SE key, exact key
    ("CE*_max (nats), mean of sum h", "ce_star", "ce_star_se", "ce_star"),
    ("CE*_max, surprisal -log q", "ce_star_surprisal", "ce_star_surprisal_se", "ce_star"),
    ("E[N]", "expected_length", "expected_length_se", "expected_length"),
    ("entropy rate E[r_N]", "entropy_rate", "entropy_rate_se", "entropy_rate"),
    ("GenPPL", "gen_ppl", "gen_ppl_se", "gen_ppl"),
    ("branching factor", "branching_factor", "branching_factor_se", "branching_factor"),
    ("rho(N, r_N) Pearson", "length_rate_pearson", None, "length_rate_corr"),
    ("rho(N, r_N) Spearman", "length_rate_spearman", None, None),
    ("rho(N, r_N) Kendall tau-b", "length_rate_kendall", None, None),
    ("Cov(N, r_N)", "length_rate_cov", "length_rate_cov_se", "length_rate_cov"),
    ("P(no EOS by the cap)", "truncation_prob", "truncation_prob_se", "truncation_prob"),
    ("truncation rate P(N >= T_max)", "truncation_rate", "truncation_rate_se", "truncation_rate"),
]


def estimate_table(est: Mapping[str, Any], ex: Optional[Mapping[str, Any]] = None,
                   best: Optional[Mapping[str, Any]] = None) -> str:
    """One prompt's Monte Carlo estimates with SE and CI; with ``ex`` (the exact record) also the exact
    value, the error, z and whether the CI covers it; with ``best`` (``BestEstimate.to_dict()``) a CE* row
    for the estimator recommended at the same token budget, named."""
    est = dict(est)
    table = list(ESTIMATE_ROWS)
    if best is not None:
        est.update(best_ce_star=best["ce_star"], best_ce_star_se=best["ce_star_se"], best_ce_star_ci=best["ce_star_ci"])
        used = (best.get("cost") or {}).get("model_tokens")
        table.insert(2, (f"CE*_max, {best['estimator']} ({int(used):,} model tokens)" if used is not None else
                         f"CE*_max, {best['estimator']} (budget {best['budget']:,} model tokens)", "best_ce_star",
                         "best_ce_star_se", "ce_star"))
    p, m = est.get("truncation_prob"), est.get("num_rollouts")
    if p is not None and m:  # the SE of the sampled no-EOS fraction (binomial)
        est["truncation_prob_se"] = math.sqrt(max(float(p) * (1.0 - float(p)), 0.0) / float(m))
    if ex is not None:
        ex = dict(ex, truncation_rate=_exact_truncation_rate(ex))
    rows = []
    for label, k, se_k, ex_k in table:
        v = est.get(k)
        se = est.get(se_k) if se_k else None
        ci = est.get(k + "_ci")
        ci_s = f"[{num(ci[0], 4)}, {num(ci[1], 4)}]" if ci else "-"
        if ex is None:
            rows.append([label, num(v), num(se), ci_s])
            continue
        xv = ex.get(ex_k) if ex_k else None
        err = (float(v) - float(xv)) if (xv is not None and v is not None) else None
        z = err / float(se) if (err is not None and se not in (None, 0) and finite(se)) else None
        if ci and xv is not None:
            covered = "yes" if finite(ci[0]) and ci[0] <= xv <= ci[1] else "no"
        else:
            covered = "-"
        rows.append([label, num(xv), num(v), num(se), num(err, 4, signed=True), num(z, 2, signed=True), covered])
    if ex is None:
        return format_table(["quantity", "estimate", "SE", "95% CI"], rows)
    return format_table(["quantity", "exact", "MC estimate", "SE", "error", "z", "in CI"], rows)


def multi_estimate_table(records: Sequence[Mapping], pooled: Mapping[str, Any]) -> str:
    """One row per prompt's estimates, and the pooled row."""
    rows = []
    bests = [r.get("best") for r in records]
    names = sorted({b["estimator"] for b in bests if b})
    for r, b in zip(records, bests):
        e = r["estimate"]
        rows.append([r["index"], short(r["prompt"], 32), num(e["ce_star"]), num(e["ce_star_se"]),
                     num(b["ce_star"]) if b else "-", num(b["ce_star_se"]) if b else "-",
                     num(e["expected_length"], 3), num(e["gen_ppl"], 3), num(e["branching_factor"], 3),
                     num(e["length_rate_pearson"], 3), num(e["truncation_rate"], 3), e["num_rollouts"]])
    pb = [b["ce_star"] for b in bests if b]
    rows.append(["all", f"pooled ({len(records)} prompts)", num(pooled["ce_star"]), "",
                 num(sum(pb) / len(pb)) if len(pb) == len(records) else "-", "", num(pooled["expected_length"], 3),
                 num(pooled["gen_ppl"], 3), num(pooled["branching_factor"], 3), num(pooled["length_rate_pearson"], 3),
                 num(pooled["truncation_rate"], 3), ""])
    best_head = "CE* " + ("/".join(names) if names else "best")
    return format_table(["#", "prompt", "CE* (paper)", "SE", best_head, "SE", "E[N]", "GenPPL", "BF", "rho", "trunc",
                         "M"], rows, "llrrrrrrrrrr")
