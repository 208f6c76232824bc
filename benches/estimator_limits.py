"""How close can an exact head plus a sampled tail get on a canopy? The limit behind the bushy-canopy misses.

For every depth-8 canopy of ``bench_estimators.py`` costed as a model with a KV cache (one token per row below
the root; the random callable, which pays its prefix per row, is left out) this enumerates the canopy once and
computes, for every internal node u, the expected step-entropy sum of a rollout started at u (S_u), that sum's
variance (V_u) and the rollout's expected rows (L_u). For a best-first head of n nodes (n - 1 tokens) and
the frontier F it leaves, split into depth groups g (mass share M_g of the frontier mass m), the tail's
variance per rollout in a group splits into the spread of S between the group's frontier nodes (B_g) and
the spread of a rollout below its node (W_g). With B - n + 1 tokens left and Neyman allocation over the groups
(n_g proportional to M_g sigma_g / sqrt(c_g), c_g the group's mean L):

    Var(tail) = m^2 (sum_g M_g sigma_g sqrt(c_g))^2 / (B - n + 1),

and plain Monte Carlo's variance at B tokens is V_root (E[N] - 1) / B. The script reports, minimised over
the head size n, the RMSE ratio with sigma_g^2 = B_g + W_g (depth groups, nothing stratified inside them) and
with sigma_g^2 = W_g (the **stratification limit**: strata that removed every difference between frontier
nodes). Two idealisations, both in the estimator's favour or neutral at these sizes: rollouts are costed
without prefix sharing, and strata are not credited for reaching below a frontier node (they do only where a
node holds more than one stratum, rare at 1,024 tokens on 20,000-node canopies). It also reports how much of B_g a
regression on what the head knows of each frontier node (its token's probability, its parent's entropy)
explains at the depth-groups column's best head: the most a control variate built from them could remove.

    python benches/estimator_limits.py --table-cache /tmp/bench_tables   # ~2 min with the SmolLM2 tables

Writes ``benches/results/estimator_limits.{json,md}``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

import canopy_rs
from canopy_rs.backends.cached import CachedModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_estimators import POLICIES, PROMPTS, RESULTS, tiny_cases  # noqa: E402

BUDGET = 1024
HEAD_SIZES = (1, 25, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000)


class Canopy:
    """The enumerated canopy: per internal prefix its support, entropy h, S, V and L (see the module doc)."""

    def __init__(self, cm: CachedModel, kw: dict) -> None:
        canopy_rs.exact(cm, **kw)  # fills the table
        self.T = kw["max_new_tokens"]
        self.eos = set(np.atleast_1d(cm.eos_token_ids).tolist())
        key = (float(kw.get("temperature", 1.0)), kw.get("top_k"), float(kw.get("top_p", 1.0)))
        self.table = cm.tables[key]
        self.h, self.S, self.V, self.L = {}, {}, {}, {}
        self._walk(())

    def children(self, pre: tuple):
        tok, lp = self.table[pre]
        p = np.exp(lp)
        p = p / p.sum()
        kids = [(pre + (t,), float(q)) for t, q in zip(tok.tolist(), p)]
        return p, [(c, q, not (c[-1] in self.eos or len(c) >= self.T)) for c, q in kids]

    def _walk(self, pre: tuple) -> None:
        # Iterative post-order: depth-8 canopies are shallow, but the callables' tables are wide.
        stack = [(pre, False)]
        while stack:
            node, done = stack.pop()
            p, kids = self.children(node)
            if not done:
                stack.append((node, True))
                stack.extend((c, False) for c, _, internal in kids if internal)
                continue
            s = np.array([self.S[c] if internal else 0.0 for c, _, internal in kids])
            v = np.array([self.V[c] if internal else 0.0 for c, _, internal in kids])
            ln = np.array([self.L[c] if internal else 0.0 for c, _, internal in kids])
            m = float(p @ s)
            h = float(-(p * np.log(p)).sum())
            self.h[node] = h
            self.S[node] = h + m
            self.V[node] = float(p @ (v + (s - m) ** 2))
            self.L[node] = 1.0 + float(p @ ln)

    def head(self, n: int):
        """Best-first head of n nodes: (frontier prefixes, log pi, parent entropy, log edge probability)."""
        heap = [(0.0, ())]
        logpi = {(): 0.0}
        info = {}
        for _ in range(n):
            if not heap:
                break
            _, pre = heapq.heappop(heap)
            _, kids = self.children(pre)
            for c, q, internal in kids:
                if internal:
                    logpi[c] = logpi[pre] + math.log(q)
                    info[c] = (self.h[pre], math.log(q))
                    heapq.heappush(heap, (-logpi[c], c))
        front = [c for _, c in heap]
        return front, np.array([logpi[c] for c in front]), np.array([info[c] for c in front]).reshape(-1, 2)


def limits(cv: Canopy, budget: int) -> dict:
    root = ()
    en = cv.L[root]  # E[N] (steps of a rollout from the root)
    var_mc = cv.V[root] * (en - 1.0) / budget
    best = {"depth_groups": (math.inf, 0), "stratification_limit": (math.inf, 0)}
    cv_share = {}
    for n in HEAD_SIZES:
        if n - 1 >= budget:
            break
        front, logpi, feats = cv.head(n)
        if not front:
            return {"exact_within_budget": True, "ce_star": cv.S[root], "internal_nodes": len(cv.S)}
        pi = np.exp(logpi)
        m = float(pi.sum())
        dep = np.array([len(c) for c in front])
        S = np.array([cv.S[c] for c in front])
        V = np.array([cv.V[c] for c in front])
        L = np.array([cv.L[c] for c in front])
        terms = {"depth_groups": 0.0, "stratification_limit": 0.0}
        between_tot = resid_tot = 0.0
        for d in np.unique(dep):
            k = dep == d
            w = pi[k] / pi[k].sum()
            mg = float(pi[k].sum()) / m
            mu = float(w @ S[k])
            between = float(w @ (S[k] - mu) ** 2)
            within = float(w @ V[k])
            c = float(w @ L[k])
            terms["depth_groups"] += mg * math.sqrt((between + within) * c)
            terms["stratification_limit"] += mg * math.sqrt(within * c)
            if k.sum() > 3:  # a weighted regression of S on what the head knows of each frontier node
                x = np.column_stack([np.ones(k.sum()), feats[k, 0], feats[k, 1], np.exp(feats[k, 1])])
                sw = np.sqrt(w)
                beta = np.linalg.lstsq(x * sw[:, None], S[k] * sw, rcond=None)[0]
                resid = float(w @ (S[k] - x @ beta) ** 2)
            else:
                resid = between
            between_tot += mg * between
            resid_tot += mg * resid
        left = budget - (n - 1)
        for key, t in terms.items():
            ratio = math.sqrt(m * m * t * t / left / var_mc)
            if ratio < best[key][0]:
                best[key] = (ratio, n)
        cv_share[n] = 1.0 - resid_tot / between_tot if between_tot > 0 else math.nan
    return {"expected_length": en, "ce_star": cv.S[root], "internal_nodes": len(cv.S),
            **{f"{k}_ratio": v[0] for k, v in best.items()}, **{f"{k}_head": v[1] for k, v in best.items()},
            "control_variate_share": cv_share[best["depth_groups"][1]]}


def measured_ratio(case: str) -> float:
    path = RESULTS / "estimators_summary.json"
    if not path.exists():
        return math.nan
    for st in json.loads(path.read_text()):
        if st["case"] == case:
            for r in st["ratios"]:
                if r["estimator"] == "hybrid" and r["budget"] == BUDGET:
                    return float(r["ratio"])
    return math.nan


def cases(args):
    for name, _desc, model, kw, depth in tiny_cases():
        if name == "callable":
            continue  # pays its prefix per row: the cost model here is one token per row
        kw = dict(kw)
        yield name, CachedModel(model, kw.pop("vocab_size", None), kw.pop("eos_token_ids", None)), kw
    if args.no_smollm2:
        return
    from canopy_rs.backends.transformers import TransformersModel
    from canopy_rs.hf_models import load_model

    hf, tok = load_model(quiet=True)
    for pname, prompt in PROMPTS:
        cm = CachedModel(TransformersModel(hf, tok, prompt=prompt, chat=True))
        if args.table_cache is not None and (args.table_cache / f"{pname}.pkl").exists():
            cm.load_tables(args.table_cache / f"{pname}.pkl")
        for pol_name, pol in POLICIES:
            yield f"smollm2_{pname}_{pol_name}_d8", cm, dict(max_new_tokens=8, **pol)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table-cache", type=Path, default=None, help="bench_estimators.py's SmolLM2 tables")
    ap.add_argument("--no-smollm2", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = []
    for name, cm, kw in cases(args):
        r = {"case": name, **limits(Canopy(cm, kw), BUDGET), "measured_hybrid_ratio": measured_ratio(name)}
        rows.append(r)
        print(json.dumps(r), flush=True)
    md = [f"# Limits of an exact head plus a sampled tail at {BUDGET:,} tokens (estimator_limits.py)", "",
          "RMSE as a multiple of plain MC's at the same tokens; the best head size in brackets.", "",
          "| canopy | CE* | internal nodes | depth groups, Neyman | stratification limit | measured (recommended hybrid) "
          "| between-node variance a control variate could remove (at the depth-groups head) |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("exact_within_budget"):
            md.append(f"| {r['case']} | {r['ce_star']:.3f} | {r['internal_nodes']:,} | exact | exact | "
                      f"{r['measured_hybrid_ratio']:.3g} | - |")
            continue
        md.append(f"| {r['case']} | {r['ce_star']:.3f} | {r['internal_nodes']:,} | {r['depth_groups_ratio']:.3g} "
                  f"({r['depth_groups_head']}) | {r['stratification_limit_ratio']:.3g} ({r['stratification_limit_head']}) "
                  f"| {r['measured_hybrid_ratio']:.3g} | {100 * r['control_variate_share']:.0f}% |")
    md += ["", f"{time.perf_counter() - t0:.0f} s."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "estimator_limits.json").write_text(json.dumps(rows, indent=2))
    (args.out / "estimator_limits.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
