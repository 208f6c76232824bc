"""An independent brute-force canopy enumerator in plain Python (math + lists, no numpy, no canopy_rs).

It re-derives every exact quantity from docs/definitions.md by listing all leaves, so the Rust engine is
checked against something that shares none of its code.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

TOP_P_SLACK = 1e-12
RATE_VAR_ZERO = 1e-24


def policy(logits: Sequence[float], temperature: float, top_k: Optional[int], top_p: float) -> dict[int, float]:
    """token -> log q, the policy of docs/definitions.md: temperature -> top-k (ties kept) -> top-p -> renormalise."""
    finite = [(i, float(x)) for i, x in enumerate(logits) if x != -math.inf]
    if top_k is not None and top_k < len(finite):
        threshold = sorted((x for _, x in finite), reverse=True)[top_k - 1]
        finite = [(i, x) for i, x in finite if x >= threshold]
    z = [(i, x / temperature) for i, x in finite]
    if top_p < 1.0 and len(z) > 1:
        m = max(v for _, v in z)
        total = math.fsum(math.exp(v - m) for _, v in z)
        ranked = sorted(z, key=lambda t: (-t[1], t[0]))
        kept, cum = [], 0.0
        for i, v in ranked:
            kept.append((i, v))
            cum += math.exp(v - m) / total
            if cum >= top_p * (1 - TOP_P_SLACK):
                break
        z = sorted(kept)
    m = max(v for _, v in z)
    log_norm = m + math.log(math.fsum(math.exp(v - m) for _, v in z))
    out = {}
    for i, v in z:
        lp = v - log_norm
        if math.exp(lp) > 0.0:
            out[i] = lp
    return out


@dataclass
class Leaf:
    log_reach: float
    length: int
    path_entropy: float
    eos: bool
    tokens: tuple[int, ...] = ()


def enumerate_canopy(
    logits_fn: Callable[[list[int]], Sequence[float]],
    eos: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
) -> tuple[list[Leaf], float, int]:
    """Depth-first over prefixes: (leaves, sum over internal nodes of pi*h, number of internal nodes)."""
    leaves: list[Leaf] = []
    chain: list[float] = []
    internal = 0
    stack = [([], 0.0, 0.0)]
    while stack:
        prefix, log_reach, path_h = stack.pop()
        internal += 1
        q = policy(logits_fn(prefix), temperature, top_k, top_p)
        h = math.fsum(-math.exp(lp) * lp for lp in q.values())
        chain.append(math.exp(log_reach) * h)
        for tok, lp in q.items():
            child = prefix + [tok]
            if tok in eos or len(child) == max_new_tokens:
                leaves.append(Leaf(log_reach + lp, len(child), path_h + h, tok in eos, tuple(child)))
            else:
                stack.append((child, log_reach + lp, path_h + h))
    return leaves, math.fsum(chain), internal


def population_values(leaves: list[Leaf], chain: float, max_new_tokens: int) -> dict[str, float]:
    """Every field of the exact result, from the leaf list, by two-pass formulas."""
    p = [math.exp(l.log_reach) for l in leaves]
    mass = math.fsum(p)
    n = [float(l.length) for l in leaves]
    r = [l.path_entropy / l.length for l in leaves]
    en = math.fsum(pi * ni for pi, ni in zip(p, n)) / mass
    er = math.fsum(pi * ri for pi, ri in zip(p, r)) / mass
    vn = math.fsum(pi * (ni - en) ** 2 for pi, ni in zip(p, n)) / mass
    vr = math.fsum(pi * (ri - er) ** 2 for pi, ri in zip(p, r)) / mass
    cov = math.fsum(pi * (ni - en) * (ri - er) for pi, ni, ri in zip(p, n, r)) / mass
    # A constant has zero variance exactly (the two-pass mean can be off by an ulp).
    if len(set(n)) == 1:
        vn = cov = 0.0
    if len(set(r)) == 1:
        vr = cov = 0.0
    pmf = [0.0] * (max_new_tokens + 1)
    for pi, l in zip(p, leaves):
        pmf[l.length] += pi
    h_n = math.fsum(-x * math.log(x) for x in pmf if x > 0)
    corr = cov / math.sqrt(vn * vr) if vn > 0 and vr > RATE_VAR_ZERO * max(1.0, er * er) else math.nan
    return {
        "ce_star": chain,
        "ce_star_leaves": -math.fsum(pi * l.log_reach for pi, l in zip(p, leaves) if pi > 0),
        "total_mass": mass,
        "length_entropy": h_n,
        "content_entropy": chain - h_n,
        "expected_length": en,
        "entropy_rate": er,
        "length_var": vn,
        "rate_var": vr,
        "length_rate_cov": cov,
        "length_rate_corr": corr,
        "gen_ppl": math.exp(chain / en),
        "branching_factor": math.exp(er),
        "truncation_prob": math.fsum(pi for pi, l in zip(p, leaves) if not l.eos),
        "length_pmf": pmf,
        "num_leaves": len(leaves),
    }


class RandomModel:
    """A deterministic random next-token model keyed by the prefix. ``levels`` small makes ties common;
    ``mask_prob`` puts -inf entries in (never a whole row)."""

    def __init__(self, vocab_size: int, seed: int, levels: int = 0, mask_prob: float = 0.0, scale: float = 2.0):
        self.vocab_size, self.seed, self.levels, self.mask_prob, self.scale = vocab_size, seed, levels, mask_prob, scale

    def row(self, prefix: Sequence[int]) -> list[float]:
        rng = random.Random(hash((self.seed, tuple(prefix))))
        if self.levels:
            row = [self.scale * rng.randrange(self.levels) / self.levels for _ in range(self.vocab_size)]
        else:
            row = [rng.gauss(0.0, self.scale) for _ in range(self.vocab_size)]
        if self.mask_prob:
            keep = rng.randrange(self.vocab_size)
            row = [x if i == keep or rng.random() >= self.mask_prob else -math.inf for i, x in enumerate(row)]
        return row

    def __call__(self, prefixes: list[list[int]]):
        import numpy as np

        return np.array([self.row(p) for p in prefixes], dtype=np.float64)


def iid_model(q_eos: float, k: int):
    """EOS (id 0) with probability q_eos, else uniform over k other tokens, at every step."""
    import numpy as np

    row = np.array([math.log(q_eos)] + [math.log((1 - q_eos) / k)] * k)
    return lambda prefixes: np.tile(row, (len(prefixes), 1))
