"""The startup self-check: before a strategy is used on a model, it must reproduce full recomputation on a
branching tree that exercises everything that can leak state between branches.

The tree is the full ternary tree of depth 4 under a short prompt window (121 expanded nodes). It is expanded
in a fixed pseudo-random order that mixes depths within one call and spreads siblings over several calls, and
nodes are released out of order as soon as their children are expanded, with compaction after every release
(per-row and dense tree) or a tiny arena that must grow and reuse slots (cascade). Per-row caches thereby copy
rows, repeat a parent's row for its siblings, join rows of several chunks and compact chunks; tree attention
compacts its flattened cache. Every node's logits are compared with a forward of its whole sequence without
a cache (all sequences of one depth in one batch).

A deviation above the dtype's tolerance fails the check, with the deviation in the message; the model then
moves to the next strategy, or is refused (:class:`~canopy_rs.errors.StrategyUnsupportedError`). The
tolerance is relative to the largest reference logit (at least 1): float64 1e-6 (the float32 internals of
some kernels, e.g. Mamba-2's scan, differ by ~1e-7 between the cached and the full path), float32 1e-3,
reduced precision 5e-2.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ._engine import KVEngine
from .cache_ops import new_cache
from .runner import ModelRunner

__all__ = ["engine_self_check", "self_check_tolerance", "CHECK_DEPTH", "CHECK_CHILDREN"]

#: Depth and branching of the self-check tree (full: 1 + 3 + 9 + 27 + 81 expanded nodes).
CHECK_DEPTH = 4
CHECK_CHILDREN = 3
_MAX_BATCH = 8


def self_check_tolerance(dtype: torch.dtype) -> float:
    if dtype == torch.float64:
        return 1e-6
    if dtype == torch.float32:
        return 1e-3
    return 5e-2


def _check_tree(first_token: int, vocab_size: int) -> dict[int, tuple[int, int, tuple[int, ...]]]:
    """``{node: (parent, token, path)}`` of the full tree; siblings get distinct tokens."""
    nodes: dict[int, tuple[int, int, tuple[int, ...]]] = {0: (-1, -1, ())}
    level = [0]
    for depth in range(1, CHECK_DEPTH + 1):
        nxt = []
        for parent in level:
            for j in range(CHECK_CHILDREN):
                nid = len(nodes)
                token = (first_token + 1 + CHECK_CHILDREN * depth + j) % vocab_size
                nodes[nid] = (parent, token, nodes[parent][2] + (token,))
                nxt.append(nid)
        level = nxt
    return nodes


@torch.inference_mode()
def engine_self_check(
    engine: KVEngine,
    runner: ModelRunner,
    device: torch.device,
    dtype: torch.dtype,
    prompt_ids: Sequence[int],
    vocab_size: int,
    n_prompt: int = 4,
) -> tuple[bool, str]:
    """Expand the self-check tree (see the module docstring) with ``engine`` under the first ``n_prompt``
    prompt tokens and compare every node's logits with full recomputation. Returns ``(ok, detail)``. For the
    cascade engine it also checks that every layer's attention went through the registered function (a model
    whose attention bypasses transformers' registry fails here). The engine is reset afterwards and the
    runner's counters are left as they were."""
    if n_prompt < 1:
        return False, "the prompt window is too small"
    prompt = [int(t) for t in prompt_ids[:n_prompt]]
    V = int(vocab_size)
    if V < CHECK_CHILDREN:
        return False, f"the vocabulary ({V}) is smaller than the self-check's branching ({CHECK_CHILDREN})"
    nodes = _check_tree(prompt[0], V)
    children: dict[int, list[int]] = {n: [] for n in nodes}
    for n, (parent, _, _) in nodes.items():
        if parent >= 0:
            children[parent].append(n)
    rng = np.random.default_rng(0)
    counters0 = (runner.tokens_forwarded, runner.model_calls)
    calls = forwards = 0
    got: dict[int, torch.Tensor] = {}
    try:
        got[0] = engine.prefill(0, prompt)[0]
        frontier = list(children[0])
        waiting = {n: len(children[n]) for n in nodes}  # unexpanded children
        releasable: list[int] = []
        while frontier:
            take = min(len(frontier), int(rng.integers(1, _MAX_BATCH + 1)))
            picked = [frontier.pop(int(i)) for i in sorted(rng.choice(len(frontier), take, replace=False), reverse=True)]
            lg = engine.expand(
                np.array(picked, dtype=np.int64),
                np.array([nodes[n][0] for n in picked], dtype=np.int64),
                np.array([nodes[n][1] for n in picked], dtype=np.int64),
                np.array([len(nodes[n][2]) for n in picked], dtype=np.int64),
            )
            forwards += 1
            calls += _attention_calls(engine)
            for i, n in enumerate(picked):
                got[n] = lg[i]
                frontier.extend(children[n])
                parent = nodes[n][0]
                waiting[parent] -= 1
                if waiting[parent] == 0:
                    releasable.append(parent)
                if not children[n]:
                    releasable.append(n)
            # Release a random part of what may go, in random order; the rest waits for a later call.
            rng.shuffle(releasable)
            k = int(rng.integers(0, len(releasable) + 1))
            engine.release(releasable[:k])
            releasable = releasable[k:]
        engine.release(releasable)
        worst = 0.0
        for depth in range(CHECK_DEPTH + 1):
            ids = [n for n in nodes if len(nodes[n][2]) == depth]
            ref = runner.full_logits_batch([prompt + list(nodes[n][2]) for n in ids], device).float()
            out = torch.stack([got[n].float() for n in ids])
            scale = torch.clamp(ref.abs().amax(dim=-1), min=1.0)
            worst = max(worst, ((out - ref).abs().amax(dim=-1) / scale).max().item())
    except Exception as exc:  # the model rejected the mask / position ids / cache layout / attention function
        return False, f"{engine.name} forward failed ({type(exc).__name__}: {exc})"
    finally:
        runner.tokens_forwarded, runner.model_calls = counters0
        engine.reset()
    if engine.name == "cascade":
        layers = len(new_cache(runner.model).layers)
        if calls != forwards * layers:
            return False, (
                f"only {calls} of {forwards * layers} attention calls went through transformers' AttentionInterface: "
                "this model's attention does not dispatch through the registry"
            )
    tol = self_check_tolerance(dtype)
    tree = f"a depth-{CHECK_DEPTH}, {CHECK_CHILDREN}-way branching tree of {len(nodes)} nodes"
    if not worst <= tol:
        return False, (
            f"{engine.name} logits differ from full recomputation by {worst:.3g} (relative; tolerance {tol:g} for "
            f"{str(dtype).removeprefix('torch.')}) on {tree}"
        )
    return True, f"max relative logit difference {worst:.2g} on {tree}"


def _attention_calls(engine: Any) -> int:
    step = getattr(engine, "last_step", None)
    return int(step.calls) if step is not None else 0
