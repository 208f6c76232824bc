"""``exact`` and ``bounded``: expand a model's canopy with the Rust engine.

The loop lives here, in Python, so that any model (a callable, a transformers backend) can be driven, a
progress bar can show nodes/s, mass covered and the bracket, and Ctrl-C keeps what was computed:

    tree.next_batch -> backend.expand -> tree.ingest_* -> backend.release(tree.take_released())
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from canopy_rs._core import Policy, Tree
from canopy_rs.backends import as_backend
from canopy_rs.backends.callable import as_logits_array
from canopy_rs.errors import ArgumentTypeError, Interrupted, InvalidArgumentError
from canopy_rs.protocol import Backend, NextTokenLogits, NodeBatch, PolicySupport
from canopy_rs.results import CanopyBounds, CanopyResult, RunInfo

__all__ = ["exact", "bounded", "Budget", "Interrupted", "make_policy"]

DEFAULT_MAX_NODES = 10_000_000
# Rows per model call: wide enough to amortise a forward, small enough that a V=150k float32 batch stays
# around 0.3 GB.
DEFAULT_BATCH_ELEMENTS = 1 << 26
# Best-first batches take at most 1/BEST_FIRST_SHARE of the frontier.
BEST_FIRST_SHARE = 4
# Approximate arena bytes per stored node (parent, token, depth, log pi, path entropy, h, flags).
ARENA_BYTES_PER_NODE = 48


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


def make_policy(temperature: float = 1.0, top_k: Optional[int] = None, top_p: float = 1.0) -> Policy:
    """The decoding policy, with the argument checks shared by every entry point."""
    if isinstance(top_k, bool) or (top_k is not None and not isinstance(top_k, (int, np.integer))):
        raise ArgumentTypeError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    for name, v in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
            raise ArgumentTypeError(f"{name} must be a number, got {v!r}")
    return Policy(float(temperature), None if top_k is None else int(top_k), float(top_p))


def check_positive_int(name: str, v: Any) -> int:
    """The int arguments' check, shared by every entry point: TypeError for a non-int, ValueError below 1."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ArgumentTypeError(f"{name} must be an int, got {v!r}")
    if v < 1:
        raise InvalidArgumentError(f"{name} must be >= 1, got {v}")
    return int(v)


def default_batch_size(vocab_size: int) -> int:
    """Rows per model call when the caller does not say: wide calls, but a V-wide float32 batch stays
    around 0.3 GB."""
    return int(min(4096, max(16, DEFAULT_BATCH_ELEMENTS // (4 * int(vocab_size)))))


class _Run:
    """One expansion of one canopy: the tree, the backend, counters and the progress display."""

    def __init__(
        self,
        model: Any,
        *,
        vocab_size: Optional[int],
        eos_token_ids: Union[int, Sequence[int], None],
        max_new_tokens: int,
        temperature: float,
        top_k: Optional[int],
        top_p: float,
        batch_size: Optional[int],
        max_nodes: int,
        order: str,
        record_nodes: bool,
        support_cap: Optional[int],
        progress: Union[bool, Callable[[CanopyBounds], None]],
        progress_interval: float,
    ) -> None:
        self.backend: Backend = as_backend(model, vocab_size, eos_token_ids)
        self.policy = make_policy(temperature, top_k, top_p)
        self.max_new_tokens = check_positive_int("max_new_tokens", max_new_tokens)
        self.max_nodes = check_positive_int("max_nodes", max_nodes)
        v = self.backend.vocab_size
        self.batch_size = check_positive_int("batch_size", batch_size) if batch_size is not None else default_batch_size(v)
        self.order = order
        self.record_nodes = record_nodes
        self.tree = Tree(
            v,
            list(self.backend.eos_token_ids),
            self.max_new_tokens,
            self.policy,
            order=order,
            max_nodes=self.max_nodes,
            record_nodes=record_nodes,
            support_cap=support_cap,
        )
        self.callback = progress if callable(progress) else None
        self.bar = _progress_bar() if progress is True else None
        self.progress_interval = progress_interval
        self.seconds = 0.0
        self.peak_kv = 0

    def counters(self) -> dict[str, float]:
        c = dict(self.backend.counters())
        self.peak_kv = max(self.peak_kv, int(c.get("peak_live_kv_tokens", 0)))
        return c

    def info(self) -> RunInfo:
        c = self.counters()
        p = self.policy
        return RunInfo(
            vocab_size=self.backend.vocab_size,
            eos_token_ids=tuple(int(e) for e in self.backend.eos_token_ids),
            max_new_tokens=self.max_new_tokens,
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            order=self.order,
            model_calls=int(c.get("model_calls", 0)),
            rows_evaluated=int(c.get("rows_evaluated", 0)),
            tokens_forwarded=int(c.get("tokens_forwarded", 0)),
            prompt_tokens=int(c.get("prompt_tokens", 0)),
            peak_live_kv_tokens=self.peak_kv,
            seconds=self.seconds,
        )

    def bounds(self, stopped_by: str) -> CanopyBounds:
        b = self.tree.bounds()
        return CanopyBounds(
            ce_star_lower=b["ce_star_lower"],
            ce_star_upper=b["ce_star_upper"],
            expected_length_lower=b["expected_length_lower"],
            expected_length_upper=b["expected_length_upper"],
            truncation_prob_lower=b["truncation_prob_lower"],
            truncation_prob_upper=b["truncation_prob_upper"],
            explored_mass=b["explored_mass"],
            frontier_mass=b["frontier_mass"],
            num_expanded=int(b["num_expanded"]),
            frontier_size=int(b["frontier_size"]),
            num_nodes=int(b["num_nodes"]),
            stopped_by=stopped_by,
            info=self.info(),
        )

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

    def expand(self, budget: Optional[Budget] = None) -> Optional[str]:
        """Expands until the canopy is complete (returns None) or the budget is hit (returns which limit).
        KeyboardInterrupt propagates with the tree in a consistent state."""
        tree, backend, policy, v = self.tree, self.backend, self.policy, self.backend.vocab_size
        start = time.perf_counter()
        last_report = start
        backend.reset()
        try:
            while not tree.is_done:
                hit = self._budget_hit(budget, start)
                if hit is not None:
                    return hit
                rows = self.batch_size
                if self.order == "best-first":
                    # Popping the whole frontier at once would be breadth-first: take only its best share,
                    # so the batch stays close to the exact priority order while still growing wide.
                    rows = min(rows, max(1, tree.frontier_size // BEST_FIRST_SHARE))
                if budget is not None and budget.nodes is not None:
                    rows = min(rows, budget.nodes - tree.num_expanded)
                ids, parents, tokens, depths = tree.next_batch(rows)
                batch = NodeBatch(ids, parents, tokens, depths, lambda ids=ids: tree.prefixes(ids))
                out = backend.expand(batch, policy)
                if isinstance(out, NextTokenLogits):
                    tree.ingest_logits(as_logits_array(out.logits, len(ids), v, source=type(backend).__name__))
                elif isinstance(out, PolicySupport):
                    tree.ingest_support(
                        np.ascontiguousarray(out.offsets, dtype=np.int64),
                        np.ascontiguousarray(out.tokens, dtype=np.int64),
                        np.ascontiguousarray(out.logprobs, dtype=np.float64),
                    )
                else:
                    raise ArgumentTypeError(
                        f"{type(backend).__name__}.expand must return NextTokenLogits or PolicySupport, "
                        f"got {type(out).__name__}"
                    )
                released = tree.take_released()
                if len(released):
                    backend.release(released)
                now = time.perf_counter()
                if (self.bar is not None or self.callback is not None) and now - last_report >= self.progress_interval:
                    last_report = now
                    self._report(now - start)
            return None
        finally:
            self.seconds += time.perf_counter() - start
            self.counters()
            if self.bar is not None or self.callback is not None:
                self._report(self.seconds)
            if self.bar is not None:
                self.bar.close()

    def _report(self, elapsed: float) -> None:
        b = self.bounds("progress")
        if self.callback is not None:
            self.callback(b)
        if self.bar is not None:
            self.bar.n = b.num_expanded
            self.bar.set_postfix(
                {
                    "nodes/s": f"{b.num_expanded / max(elapsed, 1e-9):,.0f}",
                    "mass": f"{b.explored_mass:.4f}",
                    "CE*": f"[{b.ce_star_lower:.4f}, {b.ce_star_upper:.4f}]",
                    "width": f"{b.width:.2e}",
                },
                refresh=True,
            )


def _progress_bar() -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError as e:  # pragma: no cover - tqdm ships with the [hf] and [demo] extras
        raise ImportError("progress=True needs tqdm: pip install tqdm") from e
    return tqdm(desc="canopy", unit="node", total=None, smoothing=0.1)


def exact(
    model: Any,
    *,
    vocab_size: Optional[int] = None,
    eos_token_ids: Union[int, Sequence[int], None] = None,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    batch_size: Optional[int] = None,
    max_nodes: int = DEFAULT_MAX_NODES,
    order: str = "depth-first",
    return_nodes: bool = False,
    return_leaves: bool = False,
    progress: Union[bool, Callable[[CanopyBounds], None]] = False,
    progress_interval: float = 0.5,
) -> CanopyResult:
    """The exact canopy entropy CE*_max of ``model`` under the decoding policy, and its companions.

    ``model`` is a :class:`~canopy_rs.protocol.Backend` (e.g. :class:`canopy_rs.TransformersModel`) or a
    callable ``logits_fn(prefixes: list[list[int]]) -> array [len(prefixes), vocab_size]`` of next-token
    logits for generated-token prefixes (prompt excluded); a callable needs ``vocab_size`` and
    ``eos_token_ids`` (an int or a sequence; each id is its own outcome).

    The policy is temperature -> top-k (ties kept) -> top-p -> renormalise. A leaf is a prefix ending in an
    EOS id (counted in N) or of length ``max_new_tokens``. ``batch_size`` rows go to the model per call;
    ``max_nodes`` bounds the tree (nodes, leaves included): past it a :class:`canopy_rs.TreeTooLargeError` is
    raised before memory runs out. ``order`` changes only how much model state is alive at once.
    ``return_nodes=True`` adds per-node arrays (``parent, token, depth, log_reach, entropy, is_leaf``) as
    ``result.nodes``. ``return_leaves=True`` adds the per-leaf columns ``leaf_tokens``, ``leaf_probs``,
    ``leaf_lengths``, ``leaf_rates`` (leaves in lexicographic token order; for :func:`canopy_rs.embed` and
    :func:`canopy_rs.exact_semantics`) and the pi-weighted ``length_rate_spearman`` and
    ``length_rate_kendall`` of (N, r_N) (None without leaves). ``progress=True`` shows a tqdm bar; a callable receives a :class:`CanopyBounds` snapshot
    every ``progress_interval`` seconds. Ctrl-C raises :class:`Interrupted` carrying the bracket reached.
    """
    run = _Run(
        model,
        vocab_size=vocab_size,
        eos_token_ids=eos_token_ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        batch_size=batch_size,
        max_nodes=max_nodes,
        order=order,
        record_nodes=return_nodes or return_leaves,
        support_cap=None,
        progress=progress,
        progress_interval=progress_interval,
    )
    try:
        run.expand()
    except KeyboardInterrupt:
        raise Interrupted(run.bounds("interrupt")) from None
    res = run.result()
    return res.with_leaves(keep_nodes=return_nodes) if return_leaves else res


def bounded(
    model: Any,
    *,
    budget: Union[int, Budget],
    vocab_size: Optional[int] = None,
    eos_token_ids: Union[int, Sequence[int], None] = None,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: float = 1.0,
    order: str = "best-first",
    support_cap: Optional[int] = None,
    batch_size: Optional[int] = None,
    max_nodes: int = DEFAULT_MAX_NODES,
    progress: Union[bool, Callable[[CanopyBounds], None]] = False,
    progress_interval: float = 0.5,
) -> Union[CanopyResult, CanopyBounds]:
    """A certified bracket ``[ce_star_lower, ce_star_upper]`` on CE*_max within a budget.

    Expands the canopy best-first (highest reach probability pi first; ``order`` may also be
    ``"breadth-first"`` or ``"depth-first"``) until ``budget`` is spent: an int counts expanded nodes; a
    :class:`Budget` can also limit model tokens, seconds or memory. Returns the exact :class:`CanopyResult`
    (``is_exact=True``, bounds equal) when the whole canopy fits, else a :class:`CanopyBounds`.

    Why the bracket holds: CE*_max = sum over internal nodes u of pi(u) h(u) with every h(u) >= 0, so the
    sum over expanded nodes is a lower bound. Every unexpanded frontier node u at depth d heads a subtree
    whose leaf distribution has at most S^(T-d) outcomes (S = the largest policy support, T =
    ``max_new_tokens``), so its contribution pi(u) H(leaf | u) is at most pi(u) (T - d) log S; adding these
    gives the upper bound. S is ``support_cap`` if given (every expanded node is checked against it, and a
    violation raises rather than report an unsound bracket), else ``vocab_size``: top-k alone does not cap
    the support, since ties at the k-th logit keep extra tokens. Likewise each frontier node adds between
    d + 1 and T to the length and up to pi(u) to the truncation probability. The bracket is monotone: it
    never widens as more nodes are expanded.

    Ctrl-C returns the bracket reached so far (``stopped_by="interrupt"``) instead of raising.
    """
    if isinstance(budget, bool):
        raise ArgumentTypeError("budget must be an int (expanded nodes) or a canopy_rs.Budget")
    if isinstance(budget, (int, np.integer)):
        budget = Budget(nodes=check_positive_int("budget", budget))
    elif not isinstance(budget, Budget):
        raise ArgumentTypeError(f"budget must be an int (expanded nodes) or a canopy_rs.Budget, got {budget!r}")
    run = _Run(
        model,
        vocab_size=vocab_size,
        eos_token_ids=eos_token_ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        batch_size=batch_size,
        max_nodes=max_nodes,
        order=order,
        record_nodes=False,
        support_cap=support_cap,
        progress=progress,
        progress_interval=progress_interval,
    )
    try:
        stopped_by = run.expand(budget)
    except KeyboardInterrupt:
        return run.bounds("interrupt")
    if run.tree.is_done:
        return run.result()
    return run.bounds(stopped_by or "budget")

