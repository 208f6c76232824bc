"""The one driver behind ``exact``, ``bounded``, ``sample``, stochastic beam search and the hybrid estimator.

What those entry points share lives here, once:

* **setup** (:func:`setup`): the argument checks, the policy, the backend and its EOS ids, the batch size
  (the backend's ``preferred_batch_size`` when the caller gives none);
* **output validation** and **chunked expansion** into CSR supports (``expand_checked``, ``expand_support``):
  they live in :mod:`canopy_rs.backends._output`, below the driver, so wrapping backends can use them too;
* **the canopy loop** (:class:`TreeRun`): ``tree.next_batch -> backend.expand -> tree.ingest_* ->
  backend.release(tree.take_released())``, for exact, bounded and the hybrid's head;
* **the rollout loop** (:func:`run_rollouts`), for ``sample`` and the hybrid's tail;
* **counters** (:func:`counters`) and **progress** (:class:`ProgressBar`, the one tqdm wrapper).

Internal: the public entry points are in ``api``, ``sampling`` and ``estimators``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from canopy_rs._core import Policy, Tree
from canopy_rs.backends import as_backend
from canopy_rs.backends._output import blame_backend, expand_checked, expand_support
from canopy_rs.errors import ArgumentTypeError, BackendOutputError, InvalidArgumentError
from canopy_rs.protocol import Backend, NextTokenLogits, NodeBatch, check_eos_token_ids
from canopy_rs.results import CanopyBounds, CanopyResult, RunInfo

DEFAULT_MAX_NODES = 10_000_000
# Rows per model call: wide enough to amortise a forward, small enough that a V=150k float32 batch stays
# around 0.3 GB.
DEFAULT_BATCH_ELEMENTS = 1 << 26
# Best-first batches take at most 1/BEST_FIRST_SHARE of the frontier.
BEST_FIRST_SHARE = 4
# Approximate arena bytes per stored node (parent, token, depth, log pi, path entropy, h, flags).
ARENA_BYTES_PER_NODE = 48

# ------------------------------------------------------------------------------------------------------
# Argument checks and setup
# ------------------------------------------------------------------------------------------------------


def check_positive_int(name: str, v: Any) -> int:
    """The int arguments' check: ArgumentTypeError for a non-int, InvalidArgumentError below 1."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ArgumentTypeError(f"{name} must be an int, got {v!r}")
    if v < 1:
        raise InvalidArgumentError(f"{name} must be >= 1, got {v}")
    return int(v)


def make_policy(temperature: float = 1.0, top_k: Optional[int] = None, top_p: float = 1.0) -> Policy:
    """The decoding policy; the core checks the values, this the types."""
    if isinstance(top_k, bool) or (top_k is not None and not isinstance(top_k, (int, np.integer))):
        raise ArgumentTypeError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    for name, v in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
            raise ArgumentTypeError(f"{name} must be a number, got {v!r}")
    return Policy(float(temperature), None if top_k is None else int(top_k), float(top_p))


def make_rng(seed: Any) -> np.random.Generator:
    """A generator from an int, a SeedSequence, a Generator (used as is) or None (fresh entropy)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer, np.random.SeedSequence))):
        raise InvalidArgumentError(f"seed must be an int, a numpy SeedSequence or None, got {seed!r}")
    return np.random.Generator(np.random.PCG64(seed))


def default_batch_size(vocab_size: int) -> int:
    """Rows per model call when neither the caller nor the backend says: wide calls, but a V-wide float32
    batch stays around 0.3 GB."""
    return int(min(4096, max(16, DEFAULT_BATCH_ELEMENTS // (4 * int(vocab_size)))))


@dataclass(frozen=True)
class Setup:
    """A checked run configuration: the backend, the policy and the sizes every loop needs."""

    backend: Backend
    policy: Policy
    max_new_tokens: int
    batch_size: int
    eos_token_ids: tuple[int, ...]

    @property
    def vocab_size(self) -> int:
        return int(self.backend.vocab_size)

    def policy_dict(self) -> dict[str, Any]:
        p = self.policy
        return {"temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p}


def setup(
    model: Any,
    *,
    vocab_size: Optional[int],
    eos_token_ids: Union[int, Sequence[int], None],
    max_new_tokens: int,
    temperature: float,
    top_k: Optional[int],
    top_p: float,
    batch_size: Optional[int],
) -> Setup:
    """Checks the arguments every entry point shares and wraps ``model`` as a backend. The EOS rule is the
    same for every driver: at least one id, each in ``[0, vocab_size)`` (a leaf ends in EOS or at the cap)."""
    max_new_tokens = check_positive_int("max_new_tokens", max_new_tokens)
    if batch_size is not None:
        batch_size = check_positive_int("batch_size", batch_size)
    policy = make_policy(temperature, top_k, top_p)
    backend = as_backend(model, vocab_size, eos_token_ids)
    check_depth = getattr(backend, "check_max_new_tokens", None)  # optional (see canopy_rs.protocol)
    if check_depth is not None:
        check_depth(max_new_tokens)  # e.g. the model's context window, before any forward
    eos = check_eos_token_ids(backend.eos_token_ids, backend.vocab_size, source=f"{type(backend).__name__}.eos_token_ids")
    if batch_size is None:
        preferred = getattr(backend, "preferred_batch_size", None)  # optional (see canopy_rs.protocol)
        if preferred is not None:
            batch_size = check_positive_int(f"{type(backend).__name__}.preferred_batch_size", preferred)
        else:
            batch_size = default_batch_size(backend.vocab_size)
    return Setup(backend, policy, max_new_tokens, batch_size, eos)


def counters(backend: Backend) -> dict[str, float]:
    """The backend's cost counters as floats. A backend that cannot report them is broken, not silent."""
    out = {}
    for k, v in dict(backend.counters()).items():
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise BackendOutputError(f"{type(backend).__name__}.counters()[{k!r}] must be a number, got {v!r}")
        out[str(k)] = float(v)
    return out


# ------------------------------------------------------------------------------------------------------
# Progress
# ------------------------------------------------------------------------------------------------------


class ProgressBar:
    """The one tqdm wrapper (a no-op when disabled): ``update(n)`` adds, ``show(n, postfix)`` sets."""

    def __init__(self, enabled: bool, *, desc: str, unit: str, total: Optional[int] = None, file: Any = None) -> None:
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError as e:  # tqdm ships with the [hf] and [demo] extras
                raise ImportError("progress=True needs tqdm: pip install tqdm") from e
            self._bar = tqdm(desc=desc, unit=unit, total=total, smoothing=0.1, file=file, dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def show(self, n: int, postfix: dict[str, str]) -> None:
        if self._bar is not None:
            self._bar.n = n
            self._bar.set_postfix(postfix, refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def bracket_postfix(b: Any, elapsed: float) -> dict[str, str]:
    """What a canopy progress bar shows for a bracket snapshot."""
    return {
        "nodes/s": f"{b.num_expanded / max(elapsed, 1e-9):,.0f}",
        "mass": f"{b.explored_mass:.4f}",
        "CE*": f"[{b.ce_star_lower:.4f}, {b.ce_star_upper:.4f}]",
        "width": f"{b.ce_star_upper - b.ce_star_lower:.2e}",
    }


# ------------------------------------------------------------------------------------------------------
# The canopy loop
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """Stop expanding when any limit is reached: expanded ``nodes``, model ``tokens`` forwarded, wall
    ``seconds``, or ``memory_bytes`` (engine arena plus the backend's reported ``kv_bytes``)."""

    nodes: Optional[int] = None
    tokens: Optional[int] = None
    seconds: Optional[float] = None
    memory_bytes: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("nodes", "tokens", "seconds", "memory_bytes"):
            v = getattr(self, name)
            if v is not None and not (v > 0):
                raise InvalidArgumentError(f"budget {name} must be > 0, got {v}")
        if all(getattr(self, n) is None for n in ("nodes", "tokens", "seconds", "memory_bytes")):
            raise InvalidArgumentError("budget: set at least one of nodes, tokens, seconds, memory_bytes")


class TreeRun:
    """One expansion of one canopy: the Rust tree, the backend, counters and progress."""

    def __init__(
        self,
        s: Setup,
        *,
        order: str,
        beam_width: Optional[int] = None,
        max_nodes: int = DEFAULT_MAX_NODES,
        record_nodes: bool = False,
        support_cap: Optional[int] = None,
        progress: Union[bool, Callable[[CanopyBounds], None]] = False,
        progress_interval: float = 0.5,
    ) -> None:
        self.setup = s
        self.backend = s.backend
        self.order = order
        # The core says whether order needs or forbids beam_width; this checks the type.
        self.beam_width = None if beam_width is None else check_positive_int("beam_width", beam_width)
        self.record_nodes = record_nodes
        self.tree = Tree(
            s.vocab_size,
            list(s.eos_token_ids),
            s.max_new_tokens,
            s.policy,
            order=order,
            beam_width=self.beam_width,
            max_nodes=check_positive_int("max_nodes", max_nodes),
            record_nodes=record_nodes,
            support_cap=support_cap,
        )
        self.callback = progress if callable(progress) else None
        self.bar = ProgressBar(progress is True, desc="canopy", unit="node")
        self.reporting = progress is True or self.callback is not None
        self.progress_interval = progress_interval
        self.seconds = 0.0
        self.peak_kv = 0

    def counters(self) -> dict[str, float]:
        c = counters(self.backend)
        self.peak_kv = max(self.peak_kv, int(c.get("peak_live_kv_tokens", 0)))
        return c

    def info(self) -> RunInfo:
        c, s = self.counters(), self.setup
        return RunInfo(
            vocab_size=s.vocab_size,
            eos_token_ids=s.eos_token_ids,
            max_new_tokens=s.max_new_tokens,
            temperature=s.policy.temperature,
            top_k=s.policy.top_k,
            top_p=s.policy.top_p,
            order=self.order,
            beam_width=self.beam_width,
            model_calls=int(c.get("model_calls", 0)),
            rows_evaluated=int(c.get("rows_evaluated", 0)),
            tokens_forwarded=int(c.get("tokens_forwarded", 0)),
            prompt_tokens=int(c.get("prompt_tokens", 0)),
            peak_live_kv_tokens=self.peak_kv,
            seconds=self.seconds,
            **describe(self.backend),
        )

    def bounds(self, stopped_by: str) -> CanopyBounds:
        b = self.tree.bounds()
        for k in ("num_expanded", "frontier_size", "num_nodes"):
            b[k] = int(b[k])
        return CanopyBounds(**b, stopped_by=stopped_by, info=self.info())

    def result(self) -> CanopyResult:
        r = self.tree.result()
        r.pop("engine_calls")
        nodes = self.tree.nodes() if self.record_nodes else None
        return CanopyResult(**r, info=self.info(), nodes=nodes)

    def _budget_hit(self, budget: Optional[Budget], start: float) -> Optional[str]:
        if budget is None:
            return None
        if budget.nodes is not None and self.tree.num_expanded >= budget.nodes:
            return "nodes"
        if budget.seconds is not None and time.perf_counter() - start >= budget.seconds:
            return "seconds"
        if budget.tokens is not None or budget.memory_bytes is not None:
            c = self.counters()
            if budget.tokens is not None and c.get("tokens_forwarded", 0) >= budget.tokens:
                return "tokens"
            if budget.memory_bytes is not None:
                used = self.tree.num_nodes * ARENA_BYTES_PER_NODE + c.get("kv_bytes", 0)
                if used >= budget.memory_bytes:
                    return "memory"
        return None

    def expand(self, budget: Optional[Budget] = None, stop: Optional[Callable[[], bool]] = None) -> Optional[str]:
        """Resets the backend and expands until the canopy is complete (returns None) or the budget is hit
        (returns which limit), or ``stop()`` (checked before every batch) says so (returns ``"stop"``).
        KeyboardInterrupt propagates with the tree in a consistent state."""
        tree, backend, policy = self.tree, self.backend, self.setup.policy
        start = time.perf_counter()
        last_report = start
        backend.reset()
        try:
            while not tree.is_done:
                hit = self._budget_hit(budget, start)
                if hit is not None:
                    return hit
                if stop is not None and stop():
                    return "stop"
                rows = self.setup.batch_size
                if self.order == "best-first":
                    # Popping the whole frontier at once would be breadth-first: take only its best share,
                    # so the batch stays close to the exact priority order while still growing wide.
                    rows = min(rows, max(1, tree.frontier_size // BEST_FIRST_SHARE))
                if budget is not None and budget.nodes is not None:
                    rows = min(rows, budget.nodes - tree.num_expanded)
                ids, parents, tokens, depths = tree.next_batch(rows)
                batch = NodeBatch(ids, parents, tokens, depths, lambda ids=ids: tree.prefixes(ids))
                out = expand_checked(backend, batch, policy)
                with blame_backend(backend):
                    if isinstance(out, NextTokenLogits):
                        tree.ingest_logits(out.logits)
                    else:
                        tree.ingest_support(out.offsets, out.tokens, out.logprobs)
                released = tree.take_released()
                if len(released):
                    backend.release(released)
                now = time.perf_counter()
                if self.reporting and now - last_report >= self.progress_interval:
                    last_report = now
                    self._report(now - start)
            return None
        finally:
            self.seconds += time.perf_counter() - start
            self.counters()
            if self.reporting:
                self._report(self.seconds)
            self.bar.close()

    def _report(self, elapsed: float) -> None:
        b = self.bounds("progress")
        if self.callback is not None:
            self.callback(b)
        self.bar.show(b.num_expanded, bracket_postfix(b, elapsed))


# ------------------------------------------------------------------------------------------------------
# The rollout loop
# ------------------------------------------------------------------------------------------------------


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


def describe(backend: Backend) -> dict[str, Optional[str]]:
    """The backend's numerics and strategy for a result record (the optional ``describe()``, see
    :mod:`canopy_rs.protocol`): ``dtype``, ``logits_dtype``, ``strategy``; None where not reported."""
    get = getattr(backend, "describe", None)
    d = dict(get()) if get is not None else {}
    return {k: (None if d.get(k) is None else str(d[k])) for k in ("dtype", "logits_dtype", "strategy")}


def cost(backend: Backend, nodes_expanded: int, t0: float) -> dict[str, float]:
    """A sampler's cost record: the backend's counters, distinct nodes expanded and wall seconds."""
    c = counters(backend)
    c["nodes_expanded"] = float(nodes_expanded)
    c["seconds"] = time.perf_counter() - t0
    return c
