"""Result records: the exact canopy (:class:`CanopyResult`) and a certified bracket (:class:`CanopyBounds`).

Both are frozen and carry the bracket fields (``ce_star_lower``, ``ce_star_upper``, ``is_exact``,
``explored_mass``, ``num_expanded``), so code that reads a bracket works on either.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np

from canopy_rs import stats
from canopy_rs.errors import InvalidArgumentError


def to_plain(v: Any, *, strict: bool = False) -> Any:
    """JSON-ready values, recursively: objects with ``to_dict`` and dataclasses to dicts, arrays and tuples to
    lists, numpy scalars to Python numbers, paths to strings, mapping keys to strings. NaN and +-inf stay
    floats, or become ``None`` with ``strict`` (valid JSON for every reader). The one JSON conversion: every
    result's ``to_dict`` and every output file go through it."""
    if isinstance(v, np.ndarray):
        v = v.tolist()
        if not strict:
            return v
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float):
        return None if strict and not math.isfinite(v) else v
    if isinstance(v, (str, int, bool)) or v is None:
        return v
    if hasattr(v, "to_dict") and callable(v.to_dict) and not isinstance(v, type):
        return to_plain(v.to_dict(), strict=strict)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return to_plain(dataclasses.asdict(v), strict=strict)
    if isinstance(v, Mapping):
        return {str(k): to_plain(x, strict=strict) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_plain(x, strict=strict) for x in v]
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    return v


@dataclass(frozen=True)
class RunInfo:
    """How a result was computed: the policy, the model's EOS ids, cost counters, wall time."""

    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float
    top_k: Optional[int]
    top_p: float
    order: str
    model_calls: int
    rows_evaluated: int
    tokens_forwarded: int
    prompt_tokens: int
    # The cost unit of every result, table and file: model tokens forwarded, the prompt excluded
    # (tokens_forwarded - prompt_tokens).
    model_tokens: int
    peak_live_kv_tokens: int
    seconds: float
    # The backend's numerics and strategy (``Backend.describe()``); None for a plain callable.
    dtype: Optional[str] = None  # the model's weights / compute dtype
    logits_dtype: Optional[str] = None  # what the policy was computed from
    strategy: Optional[str] = None
    beam_width: Optional[int] = None  # nodes kept per depth with order="beam"


@dataclass(frozen=True)
class CanopyResult:
    """Exact population values of the canopy (CE*_max and companions), over the leaf distribution pi.

    ``ce_star`` is the chain-rule sum over internal nodes of pi(u) h(u); ``ce_star_leaves`` is -sum pi log pi
    over the leaves (equal up to rounding: a built-in self-check). Entropies are in nats.
    """

    ce_star: float
    ce_star_leaves: float
    total_mass: float
    length_entropy: float
    content_entropy: float
    expected_length: float
    entropy_rate: float
    length_var: float
    rate_var: float
    length_rate_cov: float
    length_rate_corr: float
    gen_ppl: float
    branching_factor: float
    truncation_prob: float
    length_pmf: np.ndarray
    entropy_by_depth: np.ndarray
    num_internal_nodes: int
    num_leaves: int
    max_support: int
    info: RunInfo
    nodes: Optional[dict[str, np.ndarray]] = field(default=None, repr=False, compare=False)
    # Per-leaf columns (``exact(..., return_leaves=True)``), leaves in lexicographic token order; None
    # otherwise. The rank correlations need them: None means "not computed", NaN means "undefined".
    leaf_tokens: Optional[list[list[int]]] = field(default=None, repr=False, compare=False)
    leaf_probs: Optional[np.ndarray] = field(default=None, repr=False, compare=False)
    leaf_lengths: Optional[np.ndarray] = field(default=None, repr=False, compare=False)
    leaf_rates: Optional[np.ndarray] = field(default=None, repr=False, compare=False)
    length_rate_spearman: Optional[float] = None
    length_rate_kendall: Optional[float] = None

    is_exact = True
    #: The scalar population values (the fields compared between engines, backends and references).
    SCALAR_FIELDS = (
        "ce_star",
        "ce_star_leaves",
        "total_mass",
        "length_entropy",
        "content_entropy",
        "expected_length",
        "entropy_rate",
        "length_var",
        "rate_var",
        "length_rate_cov",
        "length_rate_corr",
        "gen_ppl",
        "branching_factor",
        "truncation_prob",
    )

    @property
    def ce_star_lower(self) -> float:
        return self.ce_star

    @property
    def ce_star_upper(self) -> float:
        return self.ce_star

    @property
    def expected_length_lower(self) -> float:
        return self.expected_length

    @property
    def expected_length_upper(self) -> float:
        return self.expected_length

    @property
    def truncation_prob_lower(self) -> float:
        return self.truncation_prob

    @property
    def truncation_prob_upper(self) -> float:
        return self.truncation_prob

    @property
    def explored_mass(self) -> float:
        return self.total_mass

    frontier_mass = 0.0
    frontier_size = 0
    width = 0.0

    @property
    def num_expanded(self) -> int:
        return self.num_internal_nodes

    # Cost counters, surfaced at the top level.
    @property
    def model_calls(self) -> int:
        return self.info.model_calls

    @property
    def rows_evaluated(self) -> int:
        return self.info.rows_evaluated

    @property
    def tokens_forwarded(self) -> int:
        return self.info.tokens_forwarded

    @property
    def model_tokens(self) -> int:
        """Model tokens forwarded, the prompt excluded: the cost unit of every result and table."""
        return self.info.model_tokens

    @property
    def peak_live_kv_tokens(self) -> int:
        return self.info.peak_live_kv_tokens

    @property
    def tokens_per_expanded_node(self) -> float:
        """Model tokens per expanded node after the prompt's prefill (1.0 is the physical limit: one new
        token per node on top of its parent's cached state)."""
        return (self.info.tokens_forwarded - self.info.prompt_tokens) / max(self.num_internal_nodes - 1, 1)

    @property
    def length_rate_pearson(self) -> float:
        """rho(N, r_N) (``length_rate_corr``), under the name the sampled estimates use."""
        return self.length_rate_corr

    def with_leaves(self, keep_nodes: bool = True) -> "CanopyResult":
        """This result with the per-leaf columns and the pi-weighted Spearman and Kendall tau-b of
        (N, r_N), derived from the recorded node arrays (``exact(..., return_nodes=True)``)."""
        if self.nodes is None:
            raise InvalidArgumentError("with_leaves() needs the node arrays: run exact(..., return_nodes=True)")
        tokens, probs, lengths, rates = leaf_arrays(self.nodes)
        n = lengths.astype(np.float64)
        return dataclasses.replace(
            self,
            nodes=self.nodes if keep_nodes else None,
            leaf_tokens=tokens,
            leaf_probs=probs,
            leaf_lengths=lengths,
            leaf_rates=rates,
            length_rate_spearman=stats.weighted_spearman(n, rates, probs),
            length_rate_kendall=stats.weighted_kendall_tau_b(n, rates, probs),
        )

    @property
    def length_driven(self) -> float:
        """E[N] E[r_N], the length-driven term of CE* = E[N] E[r_N] + Cov(N, r_N)."""
        return self.expected_length * self.entropy_rate

    @property
    def eos_prob_by_depth(self) -> np.ndarray:
        """P(the EOS that ends the rollout is token n), n = 0..max_new_tokens (truncation excluded)."""
        p = self.length_pmf.copy()
        p[-1] -= self.truncation_prob
        return np.clip(p, 0.0, None)

    def to_dict(self, include_nodes: bool = False, include_leaves: bool = False) -> dict[str, Any]:
        skip = {"info", "nodes"} | (set() if include_leaves else set(_LEAF_FIELDS))
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        d.update(
            is_exact=True,
            ce_star_lower=self.ce_star,
            ce_star_upper=self.ce_star,
            length_driven=self.length_driven,
            tokens_per_expanded_node=self.tokens_per_expanded_node,
        )
        d.update(dataclasses.asdict(self.info))
        if include_nodes and self.nodes is not None:
            d["nodes"] = self.nodes
        return to_plain(d)


_LEAF_FIELDS = ("leaf_tokens", "leaf_probs", "leaf_lengths", "leaf_rates")


def leaf_arrays(nodes: dict[str, np.ndarray]) -> tuple[list[list[int]], np.ndarray, np.ndarray, np.ndarray]:
    """``(tokens, probs, lengths, rates)`` of every leaf in the engine's node arrays, leaves in lexicographic
    order of their token sequences (independent of expansion order and batching). A leaf's rate is its path
    entropy (the h of its ancestors, summed root first as the engine does) over its length."""
    parent = np.asarray(nodes["parent"], dtype=np.int64)
    depth = np.asarray(nodes["depth"], dtype=np.int64)
    token = np.asarray(nodes["token"], dtype=np.int64)
    entropy = np.asarray(nodes["entropy"], dtype=np.float64)
    is_leaf = np.asarray(nodes["is_leaf"], dtype=bool)
    leaves = np.flatnonzero(is_leaf)
    if leaves.size == 0:
        raise InvalidArgumentError("the node arrays hold no leaves: they must come from a complete exact() run")
    path = np.zeros(parent.shape[0])
    by_depth = np.argsort(depth, kind="stable")
    bounds = np.searchsorted(depth[by_depth], np.arange(int(depth.max()) + 2))
    for d in range(1, int(depth.max()) + 1):
        ids = by_depth[bounds[d] : bounds[d + 1]]
        path[ids] = path[parent[ids]] + entropy[parent[ids]]
    lengths = depth[leaves]
    width = int(lengths.max())
    # Tokens right-aligned by walking up; then shifted so each row starts at column 0 (-1 pads the tail).
    mat = np.full((leaves.size, width), -1, dtype=np.int64)
    cur = leaves.copy()
    for k in range(width):
        live = depth[cur] > 0
        col = np.where(live, lengths - 1 - k, 0)
        rows = np.flatnonzero(live)
        mat[rows, col[rows]] = token[cur[rows]]
        cur = np.where(live, parent[cur], cur)
    order = np.lexsort(mat.T[::-1])
    mat, leaves, lengths = mat[order], leaves[order], lengths[order]
    # One tolist of the whole matrix, then list slices (a tolist per row is ~10x slower with ~1e6 leaves).
    tokens = [row[:n] for row, n in zip(mat.tolist(), lengths.tolist())]
    probs = np.exp(np.asarray(nodes["log_reach"], dtype=np.float64)[leaves])
    return tokens, probs, lengths, path[leaves] / np.maximum(lengths, 1)


@dataclass(frozen=True)
class CanopyBounds:
    """A certified bracket on CE*_max (and on E[N] and the truncation probability) from a partially expanded
    canopy. ``ce_star_lower <= CE*_max <= ce_star_upper`` holds exactly (see :func:`canopy_rs.bounded`)."""

    ce_star_lower: float
    ce_star_upper: float
    expected_length_lower: float
    expected_length_upper: float
    truncation_prob_lower: float
    truncation_prob_upper: float
    explored_mass: float
    frontier_mass: float
    num_expanded: int
    frontier_size: int
    num_nodes: int
    stopped_by: str
    info: RunInfo

    is_exact = False

    @property
    def width(self) -> float:
        return self.ce_star_upper - self.ce_star_lower

    @property
    def relative_width(self) -> float:
        """Width relative to the lower bound (inf while the lower bound is 0)."""
        return self.width / self.ce_star_lower if self.ce_star_lower > 0 else math.inf

    @property
    def model_calls(self) -> int:
        return self.info.model_calls

    @property
    def tokens_forwarded(self) -> int:
        return self.info.tokens_forwarded

    @property
    def model_tokens(self) -> int:
        """Model tokens forwarded, the prompt excluded: the cost unit of every result and table."""
        return self.info.model_tokens

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "info"}
        d.update(is_exact=False, width=self.width)
        d.update(dataclasses.asdict(self.info))
        return to_plain(d)
