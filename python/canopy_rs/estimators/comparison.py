"""The estimator comparison (`canopy_rs.compare`): every estimator, repeated, against the exact CE*_max of a small canopy.

:func:`compare` computes the exact value once (:func:`canopy_rs.exact`), then runs each estimator ``repeats``
times per budget and reports mean, bias, standard deviation, RMSE, coverage of the nominal interval, the
mean reported SE, and the cost: ``model_tokens`` (model tokens forwarded, the prompt excluded: the estimator's
own cost record, the unit of every result, :func:`canopy_rs.drivers.setup.model_tokens`), ``rows_evaluated``
(node expansions, the root included), ``model_calls`` and wall ``seconds``.

A budget is a target number of model tokens per estimate. It is turned into each
estimator's own size parameter with the exact E[N] (a harness convenience; the estimators do not see it):

* ``mc_rb`` / ``mc_surprisal``: ``num_rollouts = round(budget / E[N])`` (one run gives both), every rollout
  forwarding its own tokens - the cost model of the reference pipeline (vLLM rollouts, ~sum N_i tokens);
* ``mc_rb_shared`` / ``mc_surprisal_shared``: the same rollouts with identical generated prefixes forwarded
  once (:func:`canopy_rs.sample`'s default; a large saving only on tiny trees);
* ``mc_rb_stratified``: :func:`~canopy_rs.estimators.hybrid.estimate_stratified` with ``budget=budget``:
  stratified rollouts from the root, two per stratum, shared prefixes, drawn in rounds until the measured
  tokens reach the budget (paired-difference SE);
* ``mc_surprisal_stratified``: ``sample(stratified=True)`` with ``round(budget / E[N])`` rollouts, shared
  prefixes (so it spends far less than the budget; collapsed-strata SE, conservative);
* ``sbs`` / ``sbs_surprisal``: ``beam_size = round(budget / E[N])``;
* ``hybrid``: :func:`estimate_hybrid` with ``budget=budget`` and the recommended configuration
  (:data:`~canopy_rs.estimators.hybrid.RECOMMENDED`: depth groups, Neyman allocation after a pilot);
  ``hybrid_tree``: its original defaults (tree-ordered strata, proportional allocation);
  ``hybrid_multinomial``: i.i.d. frontier draws. Each splits the tokens between its exact head and its
  rollouts itself and spends them.

The model is wrapped in :class:`~canopy_rs.backends.cached.CachedModel` (``cache=True``): the exact run fills a
prefix -> support table and every estimator repeat is answered from it, while the cost each estimator reports
is still that of a fresh run. Valid because the model is deterministic: a repeat sees the same distributions
whether they are recomputed or looked up.

Realised costs differ from the target (shared prefixes are forwarded once), so tables and plots use the
*measured* mean cost, and :meth:`ComparisonResult.equal_cost_ratios` compares RMSEs at equal measured cost by
interpolating the reference estimator's log-log RMSE curve.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from canopy_rs.api import exact
from canopy_rs.backends.cached import CachedModel
from canopy_rs.drivers.progress import ProgressBar
from canopy_rs.drivers.setup import check_positive_int, model_tokens
from canopy_rs.results import to_plain
from canopy_rs.sampling import sample

from .beam import stochastic_beam_search
from .hybrid import RECOMMENDED, estimate_hybrid, estimate_stratified
from .montecarlo import estimate

__all__ = ["ComparisonResult", "compare", "upgrade_rows", "BUILTIN_ESTIMATORS"]

# name -> (family, attribute prefix on the family's result)
BUILTIN_ESTIMATORS = {
    "mc_rb": ("mc", "ce_star"),
    "mc_surprisal": ("mc", "ce_star_surprisal"),
    "mc_rb_shared": ("mc_shared", "ce_star"),
    "mc_surprisal_shared": ("mc_shared", "ce_star_surprisal"),
    "mc_rb_stratified": ("stratified", "ce_star"),
    "mc_surprisal_stratified": ("mc_stratified", "ce_star_surprisal"),
    "sbs": ("sbs", "ce_star"),
    "sbs_surprisal": ("sbs", "ce_star_surprisal"),
    "hybrid": ("hybrid", "ce_star"),
    "hybrid_multinomial": ("hybrid_multinomial", "ce_star"),
    "hybrid_tree": ("hybrid_tree", "ce_star"),
}

_COST_KEYS = ("model_calls", "model_tokens", "rows_evaluated", "tokens_forwarded", "seconds")


def _model_tokens(cost: dict) -> float:
    """An estimate's ``model_tokens``: its cost record's own value (every built-in estimator's, from
    :func:`canopy_rs.drivers.setup.cost`); a custom estimator's record without one is read with the same
    definition (:func:`canopy_rs.drivers.setup.model_tokens`)."""
    if "model_tokens" in cost:
        return float(cost["model_tokens"])
    if "tokens_forwarded" in cost or "rows_evaluated" in cost:
        return model_tokens(cost)
    return math.nan


def upgrade_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows (or runs) of a comparison written before the cost column was ``model_tokens``, in today's names.
    Such files call their cost ``tokens``: rows evaluated (node expansions, the root row included). Their
    ``model_tokens`` is their ``tokens_forwarded`` (every one of them ran through a backend reporting no prompt
    tokens: a :class:`~canopy_rs.backends.cached.CachedModel`, which then counted one token per evaluated row,
    root included, so the same number as ``tokens``, or an uncached callable), and ``tokens`` becomes
    ``rows_evaluated``.
    Current rows are returned unchanged."""
    out = []
    for r in rows:
        if "model_tokens" not in r and "tokens" in r:
            r = dict(r)
            old = r.pop("tokens")
            r["model_tokens"] = r.get("tokens_forwarded", old)
            r.setdefault("rows_evaluated", old)
        out.append(r)
    return out


# ------------------------------------------------------------------------------------------------
# Study
# ------------------------------------------------------------------------------------------------


@dataclass
class ComparisonResult:
    """Rows (one per estimator and budget) plus the exact reference. Cost columns: ``model_tokens`` (the cost
    unit: model tokens forwarded, the prompt excluded), ``rows_evaluated``, ``tokens_forwarded`` (prompt
    included), ``model_calls``, ``seconds``; each the mean over the row's repeats."""

    exact_ce_star: float
    exact: dict
    rows: list[dict[str, Any]]
    runs: list[dict[str, Any]] = field(default_factory=list, repr=False)
    settings: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Rows read back from a file written before the cost column was named model_tokens (upgrade_rows).
        self.rows = upgrade_rows(self.rows)
        self.runs = upgrade_rows(self.runs)

    def estimators(self) -> list[str]:
        return list(dict.fromkeys(r["estimator"] for r in self.rows))

    def to_csv(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fields = list(self.rows[0].keys()) if self.rows else []
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            for r in self.rows:
                w.writerow(r)
        return path

    def to_dict(self) -> dict[str, Any]:
        return {
            "exact_ce_star": self.exact_ce_star,
            "exact": self.exact,
            "settings": self.settings,
            "rows": self.rows,
            "equal_cost_ratios": self.equal_cost_ratios(),
        }

    def to_json(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(to_plain(self.to_dict()), indent=2, allow_nan=True))
        return path

    def _curve(self, name: str, cost_key: str = "model_tokens"):
        rows = [r for r in self.rows if r["estimator"] == name and r["rmse"] > 0 and r[cost_key] > 0]
        rows.sort(key=lambda r: r[cost_key])
        return np.array([r[cost_key] for r in rows], dtype=float), np.array([r["rmse"] for r in rows], dtype=float)

    def equal_cost_ratios(self, reference: str = "mc_rb", cost_key: str = "model_tokens") -> list[dict[str, Any]]:
        """For each row: its RMSE divided by the reference's RMSE at the same measured cost. The reference
        curve is a least-squares line in log-log space (Monte Carlo: slope near -1/2), so costs just outside
        its measured range are extrapolated along it."""
        x, y = self._curve(reference, cost_key)
        out: list[dict[str, Any]] = []
        if x.shape[0] < 2:
            return out
        slope, icept = np.polyfit(np.log(x), np.log(y), 1)
        for r in self.rows:
            c = r[cost_key]
            ref = math.exp(icept + slope * math.log(c)) if c > 0 else math.nan
            out.append({
                "estimator": r["estimator"],
                "budget": r["budget"],
                cost_key: c,
                "rmse": r["rmse"],
                f"{reference}_rmse_at_cost": ref,
                "ratio": r["rmse"] / ref if ref > 0 else math.nan,
            })
        return out

    def format_table(self) -> str:
        cols = [("estimator", "{:<18}"), ("budget", "{:>7}"), ("model_tokens", "{:>12.1f}"), ("model_calls", "{:>7.1f}"),
                ("seconds", "{:>8.4f}"), ("mean", "{:>9.4f}"), ("bias", "{:>+9.4f}"), ("sd", "{:>8.4f}"),
                ("rmse", "{:>8.4f}"), ("mean_se", "{:>8.4f}"), ("coverage", "{:>6.3f}")]
        ratio = {(r["estimator"], r["budget"]): r["ratio"] for r in self.equal_cost_ratios()}
        head = " ".join(f"{c:>{len(f.format(0 if c != 'estimator' else ''))}}" if c != "estimator" else f"{c:<18}"
                        for c, f in cols) + "  rmse/mc_rb@cost"
        lines = [f"exact CE*_max = {self.exact_ce_star:.6f} nats", head]
        for r in self.rows:
            cells = []
            for c, f in cols:
                val = r[c]
                cells.append(f.format(val))
            rr = ratio.get((r["estimator"], r["budget"]), math.nan)
            lines.append(" ".join(cells) + f"  {rr:>8.3f}")
        return "\n".join(lines)

    def plot(self, path: Union[str, Path], *, title: Optional[str] = None, cost_key: str = "model_tokens") -> Path:
        """Log-log RMSE vs measured cost, one line per estimator; PNG or SVG by the file suffix
        (:func:`canopy_rs.plots.estimators.plot_rmse_vs_cost`)."""
        from canopy_rs.plots.estimators import plot_rmse_vs_cost  # imports matplotlib: only when drawing

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = plot_rmse_vs_cost(self.rows, exact_ce_star=self.exact_ce_star, cost_key=cost_key, title=title)
        fig.savefig(path, dpi=130)
        return path


def _seed_for(seed: int, family: int, budget: int, repeat: int) -> int:
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, family, budget, repeat])
    return int(ss.generate_state(1, dtype=np.uint64)[0])


def _outcome(res: Any, prefix: str) -> tuple[float, float, float, float]:
    value = float(getattr(res, prefix))
    se = float(getattr(res, prefix + "_se", math.nan))
    ci = getattr(res, prefix + "_ci", None)
    lo, hi = (float(ci[0]), float(ci[1])) if ci is not None else (math.nan, math.nan)
    return value, se, lo, hi


def compare(
    model: Any,
    *,
    estimators: Sequence[Union[str, tuple[str, Callable[..., Any]]]] = ("mc_rb", "mc_surprisal", "sbs", "hybrid"),
    budgets: Sequence[int],
    repeats: int,
    seed: int = 0,
    max_new_tokens: int,
    vocab_size: Optional[int] = None,
    eos_token_ids: Optional[Sequence[int]] = None,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    batch_size: Optional[int] = None,
    confidence: float = 0.95,
    exact_result: Any = None,
    cache: bool = True,
    max_nodes: int = 10_000_000,
    progress: bool = False,
) -> ComparisonResult:
    """Run every estimator ``repeats`` times per budget (target model tokens per estimate) on ``model`` and
    judge it against the exact CE*_max. Estimators are built-in names (:data:`BUILTIN_ESTIMATORS`) or
    ``(name, fn)`` with ``fn(model, budget=..., seed=..., expected_length=..., **model_and_policy_args)``
    returning an object with ``ce_star``, ``ce_star_se``, optionally ``ce_star_ci``, and a ``cost`` dict.
    Pass ``exact_result`` to reuse an exact run (the cache then fills during the first repeats), or a
    :class:`~canopy_rs.CanopyBounds` for canopies too large to enumerate: errors are then measured from the
    bracket's midpoint and each row says whether the bracket is narrow enough to judge it (``judged``).
    ``cache=False`` recomputes every repeat."""
    repeats = check_positive_int("repeats", repeats)
    if len(budgets) == 0:
        raise ValueError("budgets must hold at least one budget")
    budgets = [check_positive_int("budgets", b) for b in budgets]
    if len(estimators) == 0:
        raise ValueError("estimators must name at least one estimator")
    specs: list[tuple[str, str, str, Optional[Callable]]] = []  # (name, family, prefix, fn)
    for e in estimators:
        if isinstance(e, str):
            if e not in BUILTIN_ESTIMATORS:
                raise ValueError(f"unknown estimator {e!r}; choose from {sorted(BUILTIN_ESTIMATORS)} or pass (name, fn)")
            fam, prefix = BUILTIN_ESTIMATORS[e]
            specs.append((e, fam, prefix, None))
        elif isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str) and callable(e[1]):
            specs.append((e[0], "custom:" + e[0], "ce_star", e[1]))
        else:
            raise ValueError(f"estimators entries must be names or (name, callable) pairs, got {e!r}")

    kw: dict[str, Any] = dict(vocab_size=vocab_size, eos_token_ids=eos_token_ids, max_new_tokens=max_new_tokens,
              temperature=temperature, top_k=top_k, top_p=top_p, batch_size=batch_size)
    if cache:
        if not isinstance(model, CachedModel):
            model = CachedModel(model, vocab_size, eos_token_ids)
        kw["vocab_size"] = kw["eos_token_ids"] = None
    t0 = time.perf_counter()
    ex = exact_result if exact_result is not None else exact(model, max_nodes=max_nodes, **kw)
    exact_seconds = time.perf_counter() - t0 if exact_result is None else math.nan
    # A certified bracket (canopy_rs.bounded) instead of the exact value: errors are judged against its
    # midpoint, and a row is only "judged" when the bracket is narrow next to the estimator's spread.
    bracket = (float(ex.ce_star_lower), float(ex.ce_star_upper)) if hasattr(ex, "ce_star_lower") else None
    if bracket is not None:
        truth = 0.5 * (bracket[0] + bracket[1])
        e_n = 0.5 * (float(ex.expected_length_lower) + float(ex.expected_length_upper))
    else:
        truth = float(ex.ce_star)
        e_n = float(ex.expected_length)
    half_width = 0.0 if bracket is None else 0.5 * (bracket[1] - bracket[0])

    def run_family(fam: str, fn: Optional[Callable], budget: int, s: int) -> tuple[Any, dict]:
        n_roll = max(2, int(round(budget / e_n)))
        if fam in ("mc", "mc_shared", "mc_stratified"):
            ro = sample(model, num_rollouts=n_roll, seed=s, share_prefixes=fam != "mc",
                        stratified=fam == "mc_stratified", **kw)
            return estimate(ro, confidence=confidence), ro.cost
        if fam == "sbs":
            sb = stochastic_beam_search(model, beam_size=n_roll, seed=s, confidence=confidence, **kw)
            return sb, sb.cost
        if fam == "stratified":
            st = estimate_stratified(model, budget=budget, seed=s, confidence=confidence, **kw)
            return st, st.cost
        if fam in ("hybrid", "hybrid_multinomial", "hybrid_tree"):
            opts: dict[str, Any] = (dict(RECOMMENDED) if fam == "hybrid" else
                                    {"frontier_sampling": "multinomial"} if fam == "hybrid_multinomial" else {})
            hy = estimate_hybrid(model, budget=budget, seed=s, confidence=confidence, **opts, **kw)
            return hy, hy.cost
        assert fn is not None, fam
        r = fn(model, budget=budget, seed=s, expected_length=e_n, **kw)
        return r, dict(getattr(r, "cost", {}) or {})

    families = list(dict.fromkeys(f for _, f, _, _ in specs))
    fam_fn = {f: fn for _, f, _, fn in specs}
    total = len(families) * len(budgets) * repeats
    bar = ProgressBar(progress, desc="compare", unit="run", total=total)
    runs: list[dict[str, Any]] = []
    for bi, budget in enumerate(budgets):
        for fi, fam in enumerate(families):
            for rep in range(repeats):
                s = _seed_for(seed, fi, bi, rep)
                t1 = time.perf_counter()
                res, cost = run_family(fam, fam_fn[fam], budget, s)
                secs = time.perf_counter() - t1
                for name, f2, prefix, _ in specs:
                    if f2 != fam:
                        continue
                    value, se, lo, hi = _outcome(res, prefix)
                    runs.append({
                        "estimator": name, "budget": budget, "repeat": rep, "seed": s,
                        "value": value, "se": se, "ci_low": lo, "ci_high": hi,
                        "model_calls": float(cost.get("model_calls", math.nan)),
                        "model_tokens": _model_tokens(cost),
                        "rows_evaluated": float(cost.get("rows_evaluated", cost.get("nodes_expanded", math.nan))),
                        "tokens_forwarded": float(cost.get("tokens_forwarded", math.nan)),
                        "seconds": secs,
                    })
                bar.update(1)
    bar.close()

    rows = []
    tol = 1e-9 * (1.0 + abs(truth))
    for name, _, _, _ in specs:
        for budget in budgets:
            rr = [r for r in runs if r["estimator"] == name and r["budget"] == budget]
            vals = np.array([r["value"] for r in rr])
            ses = np.array([r["se"] for r in rr])
            los = np.array([r["ci_low"] for r in rr])
            his = np.array([r["ci_high"] for r in rr])
            err = vals - truth
            covered = (los - tol <= truth) & (truth <= his + tol)
            sd = float(vals.std(ddof=1)) if len(rr) > 1 else math.nan
            rows.append({
                "estimator": name,
                "budget": budget,
                "repeats": len(rr),
                "exact": truth,
                "mean": float(vals.mean()),
                "bias": float(err.mean()),
                "sd": sd,
                "rmse": float(math.sqrt(np.mean(err * err))),
                "mean_se": float(math.sqrt(np.nanmean(ses * ses))) if np.isfinite(ses).any() else math.nan,
                "coverage": float(np.mean(covered)),
                "model_calls": float(np.mean([r["model_calls"] for r in rr])),
                "model_tokens": float(np.mean([r["model_tokens"] for r in rr])),
                "rows_evaluated": float(np.mean([r["rows_evaluated"] for r in rr])),
                "tokens_forwarded": float(np.mean([r["tokens_forwarded"] for r in rr])),
                "seconds": float(np.mean([r["seconds"] for r in rr])),
                # Exact reference, or a bracket at most a quarter of the estimator's SD from its midpoint.
                "judged": bool(half_width <= 0.25 * sd) if bracket is not None else True,
            })
    exact_info = {
        "ce_star": truth,
        "expected_length": e_n,
        "num_internal_nodes": int(getattr(ex, "num_internal_nodes", 0)),
        "num_leaves": int(getattr(ex, "num_leaves", 0)),
        "model_calls": int(getattr(ex, "model_calls", 0)),
        "rows_evaluated": int(getattr(ex, "rows_evaluated", 0)),
        "seconds": exact_seconds,
        "ce_star_lower": truth if bracket is None else bracket[0],
        "ce_star_upper": truth if bracket is None else bracket[1],
    }
    settings = {
        "budgets": list(budgets), "repeats": repeats, "seed": seed, "confidence": confidence,
        "cache": cache, "max_new_tokens": max_new_tokens, "temperature": temperature,
        "top_k": top_k, "top_p": top_p, "estimators": [s[0] for s in specs],
    }
    return ComparisonResult(truth, exact_info, rows, runs, settings)
