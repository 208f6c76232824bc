"""Estimator study: RMSE vs cost of every CE*_max estimator against the exact value.

Two canopies small enough for ``canopy_rs.exact``:

* ``callable``: ``random_logits_fn(vocab 8, scale 2, EOS id 0)``, depth 8 (960,800 internal nodes);
* ``transformers``: a random-init tiny Llama (vocab 16, 2 layers, hidden 32, initializer_range 0.3) through
  ``canopy_rs.TransformersModel``, top-k 4, depth 8 (skipped with a message if the backend or torch is
  missing).

For each, :func:`canopy_rs.estimators.study.compare` runs every estimator ``--repeats`` times at each budget
(target model tokens per estimate) and writes ``benches/results/estimators_<case>.{csv,json,png}``; a summary
(``estimators_summary.json`` and ``.md``) lists, per budget, the best estimator's RMSE relative to plain
Rao-Blackwellised Monte Carlo at equal measured model tokens (target: <= 0.5).

"Model tokens" = rows evaluated = node expansions (one new token through the model each with KV reuse).
Plain MC (``mc_rb``) forwards every rollout's own tokens, like the reference vLLM pipeline.

Usage::

    python benches/bench_estimators.py            # both cases (2-core CPU: ~2 minutes)
    python benches/bench_estimators.py --quick    # fewer repeats and budgets
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import canopy_rs
from canopy_rs.estimators.study import compare, random_logits_fn

RESULTS = Path(__file__).resolve().parent / "results"
ESTIMATORS = ["mc_rb", "mc_surprisal", "mc_rb_shared", "mc_rb_stratified", "sbs", "sbs_normalized", "hybrid",
              "hybrid_multinomial"]
REFERENCE = "mc_rb"


def callable_case():
    fn = random_logits_fn(8, seed=0, scale=2.0)
    return fn, dict(vocab_size=8, eos_token_ids=[0], max_new_tokens=8), "random callable: vocab 8, depth 8, scale 2"


def transformers_case():
    try:
        import torch
        import transformers

        from canopy_rs.backends.transformers import TransformersModel
    except ImportError as exc:  # the other backend may not be installed
        return None, None, f"skipped: the transformers backend is unavailable ({exc})"
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, eos_token_id=[2], bos_token_id=1,
        initializer_range=0.3,
    )
    cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(cfg).eval()
    backend = TransformersModel(model, prompt=[1, 5, 9, 3, 7])
    desc = f"tiny Llama via TransformersModel ({backend.strategy}): vocab 16, top-k 4, depth 8"
    return backend, dict(max_new_tokens=8, top_k=4), desc


def summarise(name, desc, study):
    ratios = study.equal_cost_ratios(REFERENCE)
    by_budget = {}
    for r in ratios:
        if r["estimator"] == REFERENCE:
            continue
        cur = by_budget.get(r["budget"])
        if cur is None or r["ratio"] < cur["ratio"]:
            by_budget[r["budget"]] = r
    best = [
        {"budget": b, "best": r["estimator"], "tokens": r["tokens"], "rmse": r["rmse"],
         "mc_rb_rmse_at_cost": r[f"{REFERENCE}_rmse_at_cost"], "ratio": r["ratio"]}
        for b, r in sorted(by_budget.items())
    ]
    return {"case": name, "description": desc, "exact": study.exact, "best_by_budget": best,
            "target_met_at_all_budgets": all(x["ratio"] <= 0.5 for x in best),
            "target_met_at_budgets": [x["budget"] for x in best if x["ratio"] <= 0.5]}


def markdown(summary, studies):
    out = ["# Estimator study (bench_estimators.py)", "",
           f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
           f"canopy_rs {canopy_rs.__version__}.", ""]
    for s in summary:
        out.append(f"## {s['case']}: {s['description']}")
        out.append("")
        if "skipped" in s:
            out += [s["skipped"], ""]
            continue
        st = studies[s["case"]]
        out.append(f"Exact CE*_max = {st.exact_ce_star:.6f} nats ({s['exact']['num_internal_nodes']} internal nodes, "
                   f"E[N] = {s['exact']['expected_length']:.3f}). {st.settings['repeats']} repeats per cell.")
        out.append("")
        out.append("```")
        out.append(st.format_table())
        out.append("```")
        out.append("")
        out.append("| budget | best estimator | tokens | RMSE | mc_rb RMSE at equal tokens | ratio |")
        out.append("|---:|---|---:|---:|---:|---:|")
        for b in s["best_by_budget"]:
            out.append(f"| {b['budget']} | {b['best']} | {b['tokens']:.0f} | {b['rmse']:.4f} | "
                       f"{b['mc_rb_rmse_at_cost']:.4f} | {b['ratio']:.3f} |")
        out.append("")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and budgets")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    budgets = [64, 256, 1024] if args.quick else [64, 256, 1024, 4096]
    repeats = args.repeats or (20 if args.quick else 100)
    args.out.mkdir(parents=True, exist_ok=True)

    summary, studies = [], {}
    for name, make, reps in (("callable", callable_case, repeats), ("transformers", transformers_case, repeats)):
        model, kw, desc = make()
        if model is None:
            print(f"[{name}] {desc}", file=sys.stderr)
            summary.append({"case": name, "description": "tiny transformers model", "skipped": desc})
            continue
        t0 = time.perf_counter()
        study = compare(model, estimators=ESTIMATORS, budgets=budgets, repeats=reps, seed=args.seed, **kw)
        secs = time.perf_counter() - t0
        studies[name] = study
        study.settings["wall_seconds"] = secs
        study.to_csv(args.out / f"estimators_{name}.csv")
        study.to_json(args.out / f"estimators_{name}.json")
        study.plot(args.out / f"estimators_{name}.png", title=f"{desc}\nexact CE* = {study.exact_ce_star:.4f} nats")
        s = summarise(name, desc, study)
        s["wall_seconds"] = secs
        summary.append(s)
        print(f"\n== {name}: {desc} ({secs:.1f} s)")
        print(study.format_table())
        for b in s["best_by_budget"]:
            print(f"  budget {b['budget']:>5}: best {b['best']:<18} RMSE {b['rmse']:.4f} vs mc_rb@{b['tokens']:.0f} "
                  f"tokens {b['mc_rb_rmse_at_cost']:.4f} -> ratio {b['ratio']:.3f}")
    (args.out / "estimators_summary.json").write_text(json.dumps(summary, indent=2, allow_nan=True))
    (args.out / "estimators_summary.md").write_text(markdown(summary, studies))
    print(f"\nwrote {args.out}/estimators_*.{{csv,json,png}} and estimators_summary.{{json,md}}")


if __name__ == "__main__":
    main()
