"""A canopy's size, estimated before enumerating it: :func:`check_canopy_size` refuses, early, a canopy far
larger than a node limit (what ``canopy-rs exact`` runs before :func:`canopy_rs.exact`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from canopy_rs.errors import TreeTooLargeError
from canopy_rs.sampling import sample

__all__ = ["SizeEstimate", "check_canopy_size", "log_worst_case_nodes"]

# The size probe: this many rollouts of at most this many tokens.
PROBE_ROLLOUTS = 16
PROBE_DEPTH = 128
# Refuse when the estimated node count exceeds the limit this many times (a false refusal has probability
# <= 1/PROBE_MARGIN), or when the entropy's lower bound (mean - PROBE_Z standard errors) does.
PROBE_MARGIN = 20
PROBE_Z = 3.0


@dataclass(frozen=True)
class SizeEstimate:
    """What the probe saw: ``rollouts`` rollouts of the first ``depth`` tokens, the log of the estimated node
    count there, the mean summed entropy (nats) and the log of the lower bound on the leaves it implies."""

    rollouts: int
    depth: int
    log_nodes: float
    entropy: float
    log_leaves: float

    def describe(self) -> str:
        return (f"{self.rollouts} rollouts of the first {self.depth} tokens estimate "
                f"~10^{self.log_nodes / math.log(10):.1f} nodes")


def log_worst_case_nodes(support: int, max_new_tokens: int) -> float:
    """log of the most nodes (leaves included) a canopy can have when every node has ``support`` children:
    sum over depths d = 0..T of S^d."""
    if support <= 1:
        return math.log(max_new_tokens + 1)
    t = max_new_tokens
    # log((S^(T+1) - 1) / (S - 1)), computed without overflow.
    return (t + 1) * math.log(support) + math.log1p(-(support ** -(t + 1))) - math.log(support - 1)


def check_canopy_size(
    backend: Any,
    *,
    node_limit: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    batch_size: Optional[int] = None,
    progress: bool = False,
    status: Optional[Callable[[str], None]] = None,
) -> Optional[SizeEstimate]:
    """Refuses (:class:`~canopy_rs.errors.TreeTooLargeError`), early, a canopy that is far larger than
    ``node_limit`` nodes. Returns None when the policy cannot make a canopy beyond the limit at all (nothing is
    sampled), else what the probe saw. The probe samples a few rollouts of the canopy's first tokens (at most
    :data:`PROBE_DEPTH`) and gives two independent verdicts:

    * node count: each node u lies on a rollout with probability pi(u), so the sum of 1/pi over a rollout's
      nodes estimates the number of nodes without bias; by Markov's inequality the mean exceeds
      :data:`PROBE_MARGIN` times the true count with probability at most 1/PROBE_MARGIN;
    * entropy: the mean summed step entropy estimates CE* of the canopy cut at that depth, and exp(CE*) is
      at most its number of leaves, each a node of the full canopy (a lower confidence bound is used).

    ``progress=True`` shows the probe's rollouts on a tqdm bar; ``status(line)`` is told what it is about to
    do (it can take a while on a large model).
    """
    support = top_k or backend.vocab_size
    if log_worst_case_nodes(support, max_new_tokens) <= math.log(node_limit):
        return None
    depth = min(max_new_tokens, PROBE_DEPTH)
    if status is not None:
        status(f"size check: the policy allows more than {node_limit:,} nodes; {PROBE_ROLLOUTS} rollouts of the "
               f"first {depth} tokens estimate the canopy's size before enumerating it")
    ro = sample(backend, num_rollouts=PROBE_ROLLOUTS, seed=0, batch_size=batch_size, max_new_tokens=depth,
                temperature=temperature, top_k=top_k, top_p=top_p, progress=progress)
    steps = np.arange(ro.logq.shape[1])[None, :] < ro.lengths[:, None]
    log_inv_reach = np.where(steps, -np.cumsum(ro.logq, axis=1), -np.inf)
    per_rollout = np.logaddexp(0.0, np.logaddexp.reduce(log_inv_reach, axis=1))  # log(1 + sum 1/pi), the root too
    log_nodes = float(np.logaddexp.reduce(per_rollout) - math.log(len(per_rollout)))
    h = ro.entropies.sum(axis=1)
    log_leaves = float(h.mean() - PROBE_Z * h.std(ddof=1) / math.sqrt(len(h)))
    log10 = math.log(10)
    if log_nodes > math.log(PROBE_MARGIN * node_limit) or log_leaves > math.log(node_limit):
        raise TreeTooLargeError(
            f"{PROBE_ROLLOUTS} rollouts of its first {depth} tokens estimate ~10^{log_nodes / log10:.0f} nodes "
            f"there (entropy {h.mean():.1f} nats, so >= 10^{log_leaves / log10:.0f} leaves), far over the limit "
            f"of {node_limit:,}")
    return SizeEstimate(PROBE_ROLLOUTS, depth, log_nodes, float(h.mean()), log_leaves)
