"""Testing aids: :func:`check_backend`, the conformance check of a backend against every rule of
:mod:`canopy_rs.protocol`, and :func:`random_logits_fn`, a deterministic random model for tests and studies.

    from canopy_rs.testing import check_backend
    check_backend(MyBackend(...))                       # raises AssertionError naming the broken rule
    check_backend(model, reference=naive_logits_fn)     # also compare every node with a slow reference

It drives the backend directly (no driver in between) over a small tree taken from the backend's own
distribution, several times: breadth-first with no releases; after ``reset()`` with the nodes of a batch
reversed, siblings spread over separate calls and every node released as early as the rules allow; and once
per decoding policy. It needs a backend whose full distribution fits in memory (a few thousand tokens of
vocabulary is plenty), as test models are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from canopy_rs._core import Policy, policy_support
from canopy_rs.backends import as_backend
from canopy_rs.backends.output import Support, expand_support
from canopy_rs.drivers.setup import counters
from canopy_rs.errors import CanopyError
from canopy_rs.protocol import Backend, check_eos_token_ids, check_vocab_size

__all__ = ["check_backend", "DEFAULT_POLICIES", "random_logits_fn"]

#: Policies whose supports are compared with the core's rules: top-k (with its ties), top-p (its crossing
#: token), both, and temperatures on either side of 1.
DEFAULT_POLICIES = (
    Policy(1.0, None, 1.0),
    Policy(1.0, 2, 1.0),
    Policy(0.7, None, 0.6),
    Policy(1.3, 3, 0.9),
)
_REQUIRED_COUNTERS = ("model_calls", "rows_evaluated")
_CUMULATIVE_COUNTERS = ("model_calls", "rows_evaluated", "tokens_forwarded", "peak_live_kv_tokens")


@dataclass(frozen=True)
class _Node:
    id: int
    parent: int  # -1 for the root
    prefix: tuple[int, ...]


class _Checker:
    def __init__(self, backend: Backend, atol: float) -> None:
        self.b = backend
        self.name = type(backend).__name__
        self.atol = atol
        self.rows = 0  # rows expanded in the current run

    def fail(self, rule: str, message: str) -> AssertionError:
        return AssertionError(f"check_backend({self.name}): {rule}: {message}")

    # --- one run -----------------------------------------------------------------------------------
    def reset(self) -> None:
        self.b.reset()
        self.rows = 0
        c = self.counters("reset")
        for k in _REQUIRED_COUNTERS:
            if k not in c:
                raise self.fail("counters", f"counters() lacks the required {k!r} (it has {sorted(c)})")
        nonzero = {k: v for k, v in c.items() if v != 0}
        if nonzero:
            raise self.fail("reset", f"counters must be zero right after reset(), got {nonzero}")
        self.last = c

    def counters(self, when: str) -> dict[str, float]:
        try:
            return counters(self.b)
        except CanopyError as e:
            raise self.fail("counters", f"after {when}: {e}") from None

    def expand(self, nodes: Sequence[_Node], policy: Policy) -> list[Support]:
        ids = np.array([n.id for n in nodes], dtype=np.int64)
        parents = np.array([n.parent for n in nodes], dtype=np.int64)
        tokens = np.array([n.prefix[-1] if n.prefix else -1 for n in nodes], dtype=np.int64)
        depths = np.array([len(n.prefix) for n in nodes], dtype=np.int64)
        try:
            s = expand_support(self.b, policy, ids, parents, tokens, depths,
                               lambda sl: [list(n.prefix) for n in nodes[sl]], len(nodes))
        except CanopyError as e:  # BackendOutputError: malformed output
            raise self.fail("output", str(e)) from None
        except Exception as e:  # the backend itself failed (lost state, an id it cannot take, ...)
            raise self.fail("expand", f"{type(e).__name__} on ids {ids.tolist()} (parents "
                                      f"{parents.tolist()}): {e}") from e
        self.rows += len(nodes)
        c = self.counters(f"expanding ids {ids.tolist()}")
        for k in _CUMULATIVE_COUNTERS:
            if c.get(k, 0.0) < self.last.get(k, 0.0):
                raise self.fail("counters", f"{k!r} decreased within a run ({self.last[k]} -> {c[k]})")
        if c["rows_evaluated"] != self.rows:
            raise self.fail("counters", f"rows_evaluated is {c['rows_evaluated']:g} after {self.rows} expanded rows")
        if c["model_calls"] < 1:
            raise self.fail("counters", "model_calls is 0 after an expand()")
        self.last = c
        o = s.offsets
        return [Support(np.array([0, o[i + 1] - o[i]]), s.tokens[o[i]:o[i + 1]], s.logprobs[o[i]:o[i + 1]],
                        s.entropy[i:i + 1]) for i in range(len(nodes))]

    # --- comparisons -------------------------------------------------------------------------------
    def same(self, rule: str, node: _Node, got: Support, want: Support, what: str) -> None:
        og, ow = np.argsort(got.tokens, kind="stable"), np.argsort(want.tokens, kind="stable")
        tg, tw = got.tokens[og], want.tokens[ow]
        if not np.array_equal(tg, tw):
            raise self.fail(rule, f"prefix {list(node.prefix)} (id {node.id}): support {tg.tolist()} != "
                                  f"{tw.tolist()} {what}")
        err = float(np.max(np.abs(got.logprobs[og] - want.logprobs[ow]), initial=0.0))
        if err > self.atol:
            raise self.fail(rule, f"prefix {list(node.prefix)} (id {node.id}): log-probs differ by {err:.3g} "
                                  f"(atol={self.atol:g}) {what}")


def _plan(c: _Checker, eos: set[int], depth: int, width: int, temperature: float) -> tuple[list[list[_Node]], dict]:
    """The tree to test on, one list of nodes per level: the root, then the ``width`` most probable non-EOS
    children of each of the first ``width`` nodes of a level. Ids are spaced (5, 8, 11, ...) so that a
    backend assuming contiguous ids from 0 is caught. Returns the levels and the root-run supports (full
    distribution at ``temperature``, no release)."""
    full = Policy(temperature, None, 1.0)
    next_id = iter(range(5, 10**9, 3))
    levels = [[_Node(next(next_id), -1, ())]]
    out: dict[int, Support] = {}
    c.reset()
    for d in range(depth):
        level = levels[-1]
        for node, sup in zip(level, c.expand(level, full)):
            out[node.id] = sup
        if d == depth - 1:
            break
        children = []
        for node in level[:width]:
            sup = out[node.id]
            order = np.lexsort((sup.tokens, -sup.logprobs))
            toks = [int(t) for t in sup.tokens[order] if int(t) not in eos][:width]
            children += [_Node(next(next_id), node.id, node.prefix + (t,)) for t in toks]
        if not children:
            break
        levels.append(children)
    return levels, out


def _run_scrambled(c: _Checker, levels: list[list[_Node]], policy: Policy) -> dict[int, Support]:
    """The same tree after ``reset()``: the root alone, then each level in calls of two nodes taken in
    reverse order (so siblings land in different calls), releasing every node as soon as all its children
    are expanded, and childless nodes right away."""
    kids: dict[int, int] = {}
    for level in levels[1:]:
        for n in level:
            kids[n.parent] = kids.get(n.parent, 0) + 1
    out: dict[int, Support] = {}
    c.reset()
    for level in levels:
        rev = level[::-1]
        for a in range(0, len(rev), 2):
            call = rev[a:a + 2]
            for node, sup in zip(call, c.expand(call, policy)):
                out[node.id] = sup
            done = [n.id for n in call if kids.get(n.id, 0) == 0]
            for n in call:
                if n.parent >= 0:
                    kids[n.parent] -= 1
                    if kids[n.parent] == 0:
                        done.append(n.parent)
            if done:
                c.b.release(np.array(sorted(set(done)), dtype=np.int64))
    return out


def _policy_reference(full: Support, vocab_size: int, policy: Policy) -> Support:
    """What the core computes for ``policy`` from the full distribution at the same temperature: its
    log-probs are logits up to a constant, so top-k, top-p and renormalisation give the policy's support."""
    row = np.full((1, vocab_size), -np.inf)
    row[0, full.tokens] = full.logprobs
    return Support(*policy_support(row, Policy(1.0, policy.top_k, policy.top_p)))


def check_backend(
    backend: Any,
    *,
    policies: Sequence[Policy] = DEFAULT_POLICIES,
    depth: int = 3,
    width: int = 3,
    atol: float = 1e-4,
    reference: Optional[Any] = None,
) -> dict[str, Any]:
    """Checks ``backend`` against the :mod:`canopy_rs.protocol` contract; raises ``AssertionError`` naming the
    rule and the node that breaks it, or returns a summary (nodes and policies checked).

    Rules checked: the members and their values (``vocab_size``, ``eos_token_ids`` and the optional
    ``preferred_batch_size``, ``memory_per_row_bytes``, ``describe()``);
    ``reset()`` forgets every node (ids are reused after it) and zeroes the counters; the required counters
    are there, numeric, cumulative and ``rows_evaluated`` counts expanded rows; a row belongs to its
    ``node_ids`` entry and does not depend on the batch, the order within it, the calls its siblings went in
    or on ``release`` (outputs agree within ``atol`` between a breadth-first run without releases and a
    scrambled run with early releases); the output is well formed; and for every policy in ``policies`` the
    support equals the core's top-k (ties kept) / top-p rule applied to the backend's own full distribution
    at that temperature. ``reference`` (a backend or a ``logits_fn`` with the same vocabulary, e.g. a slow
    recomputation) adds a node-by-node comparison of the full distributions with it.
    """
    if not isinstance(backend, Backend):
        raise AssertionError(f"check_backend: {type(backend).__name__} lacks members of canopy_rs.protocol.Backend "
                             "(vocab_size, eos_token_ids, reset, expand, release, counters)")
    c = _Checker(backend, atol)
    try:
        vocab = check_vocab_size(backend.vocab_size, f"{c.name}.vocab_size")
        eos = set(check_eos_token_ids(backend.eos_token_ids, vocab, f"{c.name}.eos_token_ids"))
    except CanopyError as e:
        raise c.fail("attributes", str(e)) from None
    pref = getattr(backend, "preferred_batch_size", None)
    if pref is not None and (isinstance(pref, bool) or not isinstance(pref, (int, np.integer)) or pref < 1):
        raise c.fail("attributes", f"preferred_batch_size must be None or an int >= 1, got {pref!r}")

    mem = getattr(backend, "memory_per_row_bytes", None)
    if mem is not None and (isinstance(mem, bool) or not isinstance(mem, (int, float, np.integer, np.floating))
                            or not mem > 0):
        raise c.fail("attributes", f"memory_per_row_bytes must be None or a number > 0, got {mem!r}")
    desc = getattr(backend, "describe", None)
    if desc is not None:
        d = desc() if callable(desc) else desc
        if not isinstance(d, Mapping) or any(v is not None and not isinstance(v, str) for v in d.values()):
            raise c.fail("attributes", f"describe() must return a dict of strings (dtype, logits_dtype, strategy), "
                                       f"got {d!r}")

    levels, base = _plan(c, eos, depth, width, 1.0)
    nodes = [n for level in levels for n in level]
    backend.release(np.array([n.id for n in nodes], dtype=np.int64))
    scrambled = _run_scrambled(c, levels, Policy(1.0, None, 1.0))
    for n in nodes:
        c.same("rows, batches and release", n, scrambled[n.id], base[n.id],
               "between a breadth-first run and one with reversed rows, split siblings and early releases")

    if reference is not None:
        ref = _Checker(as_backend(reference, vocab, sorted(eos)) if not isinstance(reference, Backend) else reference,
                       atol)
        ref_out = _run_scrambled(ref, levels, Policy(1.0, None, 1.0))
        for n in nodes:
            c.same("reference", n, base[n.id], ref_out[n.id], f"vs the reference {ref.name}")

    full_at: dict[float, dict[int, Support]] = {1.0: base}
    for policy in policies:
        t = policy.temperature
        if t not in full_at:
            full_at[t] = _run_scrambled(c, levels, Policy(t, None, 1.0))
        got = _run_scrambled(c, levels, policy)
        for n in nodes:
            want = _policy_reference(full_at[t][n.id], vocab, policy)
            c.same("support rules", n, got[n.id], want, f"under {policy!r}")
    backend.reset()
    return {"backend": c.name, "nodes": len(nodes), "depth": len(levels), "policies": [repr(p) for p in policies]}


# ------------------------------------------------------------------------------------------------
# A reproducible random model for studies and tests
# ------------------------------------------------------------------------------------------------

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (vectorised, wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLD
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def random_logits_fn(
    vocab_size: int,
    *,
    seed: int = 0,
    scale: float = 1.0,
    eos_token_id: int = 0,
    eos_bias: float = 0.0,
    eos_slope: float = 0.0,
) -> Callable[[list[list[int]]], np.ndarray]:
    """A deterministic random "language model" for :func:`canopy_rs.exact` and friends.

    The logits of a prefix are ``scale`` times i.i.d. standard normals drawn from a hash of (seed, prefix),
    plus ``eos_bias + eos_slope * len(prefix)`` on the EOS id. Larger ``scale`` gives peakier policies.
    Vectorised: one call evaluates any batch of prefixes."""
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    if not 0 <= eos_token_id < vocab_size:
        raise ValueError(f"eos_token_id must lie in [0, vocab_size), got {eos_token_id}")
    v = int(vocab_size)
    col_keys = _mix(np.arange(2 * v, dtype=np.uint64) + np.uint64(0x5EED))
    root = _mix(np.array(seed & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64))

    def logits_fn(prefixes: list[list[int]]) -> np.ndarray:
        b = len(prefixes)
        lens = np.fromiter((len(p) for p in prefixes), dtype=np.int64, count=b)
        width = int(lens.max()) if b else 0
        arr = np.zeros((b, width), dtype=np.uint64)
        for i, p in enumerate(prefixes):
            arr[i, : len(p)] = p
        h = np.full(b, root, dtype=np.uint64)
        for d in range(width):
            nh = _mix(h ^ _mix(arr[:, d] + np.uint64(1) + (np.uint64(d) << np.uint64(32))))
            h = np.where(lens > d, nh, h)
        x = _mix(h[:, None] ^ col_keys[None, :])
        u = ((x >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))
        z = np.sqrt(-2.0 * np.log(u[:, :v])) * np.cos(2.0 * np.pi * u[:, v:])
        out = scale * z
        out[:, eos_token_id] += eos_bias + eos_slope * lens
        return out

    return logits_fn
