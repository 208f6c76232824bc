"""The rollout loop (:func:`run_rollouts`), behind ``sample``, stochastic beam search's draws and the hybrid's
tail: in lockstep, one token per active rollout from its node's policy support, the unfinished children
expanded in one (chunked) batch, the previous step's nodes released. Stratified descent (:class:`Strata`) and
the inverse-CDF draw over CSR supports (:func:`sample_csr`) live here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from canopy_rs.backends.output import expand_support
from canopy_rs.drivers.progress import ProgressBar
from canopy_rs.drivers.setup import Setup
from canopy_rs.errors import InvalidArgumentError


def sample_csr(offsets: np.ndarray, logprobs: np.ndarray, rows: np.ndarray, u: np.ndarray):
    """Inverse-CDF draw of one entry per (row, uniform) pair.

    Returns ``(entry, frac_lo, frac_p)``: the global entry index, and the chosen entry's sub-interval of
    [0, 1) (cumulative probability before it, and its probability) for stratified tracking. Cumulative sums
    are taken per row on a padded block (not one global cumsum) so that tiny probabilities late in a row are
    not lost to cancellation against the running total of earlier rows."""
    counts = np.diff(offsets)
    n = rows.shape[0]
    out = np.empty(n, dtype=np.int64)
    frac_lo = np.empty(n)
    frac_p = np.empty(n)
    if n == 0:
        return out, frac_lo, frac_p
    kmax = int(counts[rows].max())
    chunk = max(1, (1 << 22) // max(kmax, 1))
    j = np.arange(kmax)
    for a in range(0, n, chunk):
        r = rows[a : a + chunk]
        lo = offsets[r]
        k = counts[r]
        valid = j[None, :] < k[:, None]
        p = np.where(valid, np.exp(logprobs[np.where(valid, lo[:, None] + j[None, :], 0)]), 0.0)
        cum = np.cumsum(p, axis=1)
        tot = cum[:, -1]
        t = u[a : a + chunk] * tot
        pos = np.minimum((cum <= t[:, None]).sum(axis=1), k - 1)
        ar = np.arange(r.shape[0])
        out[a : a + chunk] = lo + pos
        frac_p[a : a + chunk] = p[ar, pos] / tot
        frac_lo[a : a + chunk] = (cum[ar, pos] - p[ar, pos]) / tot
    return out, frac_lo, frac_p


@dataclass
class Strata:
    """Stratified descent: rollout i walks the leaf CDF (children in support order) with the fixed point
    ``u[i]`` of its stratum ``[lo[i], hi[i])`` while its node's interval ``[node_lo, node_lo + node_w)``
    straddles a stratum boundary. Once the interval lies inside the stratum, the position of u within it is
    exactly uniform and independent of the path, so fresh uniforms take over (no precision is lost to
    rescaling over long rollouts)."""

    u: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    node_lo: np.ndarray
    node_w: np.ndarray

    @classmethod
    def equal(cls, u: np.ndarray, node_lo: Optional[np.ndarray] = None, node_w: Optional[np.ndarray] = None) -> "Strata":
        """``len(u)`` equal strata of [0, 1), rollouts starting at the given node intervals (default: the
        root's [0, 1))."""
        m = u.shape[0]
        return cls(u=u, lo=np.arange(m) / m, hi=np.arange(1, m + 1) / m,
                   node_lo=np.zeros(m) if node_lo is None else node_lo, node_w=np.ones(m) if node_w is None else node_w)

    def tracked(self, i: Any = slice(None)) -> np.ndarray:
        lo, w = self.node_lo[i], self.node_w[i]
        inside = (lo >= self.lo[i]) & (lo + w <= self.hi[i])
        # Below ~1e-12 the rescaled position has too few bits left; such paths (u within 1e-12 of a
        # stratum boundary) are practically never reached.
        return ~inside & (w > 1e-12)


def stratified_uniforms(n: int, rng: np.random.Generator) -> np.ndarray:
    """One uniform in each of the n equal strata of [0, 1)."""
    return (np.arange(n) + rng.random(n)) / n


@dataclass
class RolloutRun:
    """What :func:`run_rollouts` drew: padded per-step arrays (see :class:`canopy_rs.Rollouts`)."""

    tokens: np.ndarray
    entropies: np.ndarray
    logq: np.ndarray
    steps: np.ndarray
    eos: np.ndarray
    rows_expanded: int


def run_rollouts(
    s: Setup,
    *,
    start_ids: np.ndarray,
    start_parent_ids: np.ndarray,
    start_tokens: np.ndarray,
    start_depths: np.ndarray,
    start_prefixes: Sequence[Sequence[int]],
    assignment: np.ndarray,
    id_base: int,
    rng: np.random.Generator,
    share_prefixes: bool = True,
    release_after_start: Optional[np.ndarray] = None,
    strata: Optional[Strata] = None,
    progress: Optional[ProgressBar] = None,
) -> RolloutRun:
    """Runs ``len(assignment)`` rollouts; rollout ``i`` starts at (unexpanded) start node ``assignment[i]``.

    Start nodes are expanded first (each once, with their given ids); new nodes get ids ``id_base, ...``.
    Then, in lockstep: one token per active rollout from its node's support, the unfinished children
    expanded in one batch (chunked), the previous step's nodes released. Rollouts at the same node that draw
    the same token share the child (``share_prefixes``): fewer rows, the same tokens.
    ``release_after_start``: ids (e.g. the start nodes' parents) to release once the starts are expanded.
    ``strata``: stratified descent (see :class:`Strata`); None draws every token independently."""
    backend, policy, max_new_tokens = s.backend, s.policy, s.max_new_tokens
    m = int(assignment.shape[0])
    vocab = s.vocab_size
    eos_arr = np.asarray(sorted(set(s.eos_token_ids)), dtype=np.int64)
    start_depths = np.asarray(start_depths, dtype=np.int64)
    if np.any(start_depths >= max_new_tokens):
        raise InvalidArgumentError("start nodes must be internal (depth < max_new_tokens)")
    used = np.unique(assignment)
    s_ids = np.asarray(start_ids, dtype=np.int64)[used]
    # Row of each rollout in the current support batch.
    cur_row = np.searchsorted(used, assignment).astype(np.int64)
    depth = start_depths[assignment].copy()

    def start_prefix_fn(sl: slice) -> list[list[int]]:
        return [list(start_prefixes[i]) for i in used[sl]]

    support = expand_support(
        backend, policy, s_ids,
        np.asarray(start_parent_ids, dtype=np.int64)[used],
        np.asarray(start_tokens, dtype=np.int64)[used],
        start_depths[used], start_prefix_fn, s.batch_size,
    )
    rows_expanded = int(s_ids.shape[0])
    if release_after_start is not None and len(release_after_start):
        backend.release(np.asarray(release_after_start, dtype=np.int64))
    prev_ids = s_ids

    cap = 16
    tok_buf = np.full((m, cap), -1, dtype=np.int64)
    ent_buf = np.zeros((m, cap), dtype=np.float64)
    lq_buf = np.zeros((m, cap), dtype=np.float64)
    steps = np.zeros(m, dtype=np.int64)
    eos = np.zeros(m, dtype=bool)
    active = np.ones(m, dtype=bool)
    tracked = strata.tracked() if strata is not None else np.zeros(m, dtype=bool)
    next_id = int(id_base)
    step = 0
    while True:
        act = np.flatnonzero(active)
        if act.size == 0:
            break
        if step >= cap:  # grow the padded buffers geometrically
            tok_buf = np.concatenate([tok_buf, np.full((m, cap), -1, dtype=np.int64)], axis=1)
            ent_buf = np.concatenate([ent_buf, np.zeros((m, cap))], axis=1)
            lq_buf = np.concatenate([lq_buf, np.zeros((m, cap))], axis=1)
            cap *= 2
        rows = cur_row[act]
        # Always draw, so the random stream does not depend on which rollouts are tracked.
        u = rng.random(act.size)
        tr = tracked[act]
        if strata is not None and tr.any():
            i = act[tr]
            u[tr] = np.clip((strata.u[i] - strata.node_lo[i]) / strata.node_w[i], 0.0, np.nextafter(1.0, 0.0))
        e, f_lo, f_p = sample_csr(support.offsets, support.logprobs, rows, u)
        if strata is not None and tr.any():
            i = act[tr]
            strata.node_lo[i] += strata.node_w[i] * f_lo[tr]
            strata.node_w[i] *= f_p[tr]
            tracked[i] = strata.tracked(i)
        tok = support.tokens[e]
        tok_buf[act, step] = tok
        ent_buf[act, step] = support.entropy[rows]
        lq_buf[act, step] = support.logprobs[e]
        steps[act] += 1
        depth[act] += 1
        hit = np.isin(tok, eos_arr)
        eos[act[hit]] = True
        done = hit | (depth[act] >= max_new_tokens)
        active[act[done]] = False
        cont = act[~done]
        if progress is not None:
            progress.update(int(act.size))
        if cont.size == 0:
            break
        # Children: one node per distinct (current row, token) when sharing, else one per rollout.
        if share_prefixes:
            key = cur_row[cont] * vocab + tok_buf[cont, step]
            _, first, inv = np.unique(key, return_index=True, return_inverse=True)
            rep = cont[first]
        else:
            rep = cont
            inv = np.arange(cont.size)
        n_new = rep.size
        new_ids = np.arange(next_id, next_id + n_new, dtype=np.int64)
        next_id += n_new
        # Parent of a new node = the node its representative rollout currently sits on.
        parent_ids = prev_ids[cur_row[rep]]

        def prefix_fn(sl: slice, rep: np.ndarray = rep, upto: int = step + 1) -> list[list[int]]:
            return [list(start_prefixes[assignment[i]]) + tok_buf[i, :upto].tolist() for i in rep[sl]]

        support = expand_support(backend, policy, new_ids, parent_ids, tok_buf[rep, step].copy(), depth[rep].copy(),
                                 prefix_fn, s.batch_size)
        rows_expanded += n_new
        cur_row[cont] = inv
        backend.release(prev_ids)
        prev_ids = new_ids
        step += 1
    backend.release(prev_ids)
    width = int(steps.max()) if m else 0
    return RolloutRun(tok_buf[:, :width].copy(), ent_buf[:, :width].copy(), lq_buf[:, :width].copy(),
                      steps, eos, rows_expanded)
