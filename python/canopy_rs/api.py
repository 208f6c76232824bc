"""``exact`` and ``bounded``: expand a model's canopy with the Rust engine.

The loop is the canopy driver's (:class:`canopy_rs.drivers.canopy.TreeRun`), in Python, so that any model (a
callable, a transformers backend) can be driven, a progress bar can show nodes/s, mass covered and the
bracket, and Ctrl-C keeps what was computed:

    tree.next_batch -> backend.expand -> tree.ingest_* -> backend.release(tree.take_released())
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from canopy_rs.drivers.canopy import Budget, TreeRun
from canopy_rs.drivers.setup import DEFAULT_MAX_NODES, Setup, check_positive_int, setup
from canopy_rs.drivers.progress import MassProgress
from canopy_rs.drivers.shards import finish
from canopy_rs.drivers.size_probe import check_canopy_size
from canopy_rs.errors import ArgumentTypeError, Interrupted, InvalidArgumentError, TreeTooLargeError
from canopy_rs.results import CanopyBounds, CanopyResult

__all__ = ["exact", "bounded", "Budget", "Interrupted"]


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
    streaming: Optional[bool] = None,
    executor: Optional[str] = None,
    ray_address: Optional[str] = None,
    num_workers: Optional[int] = None,
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
    ``streaming`` (default: on for depth-first without ``return_nodes`` / ``return_leaves``) keeps only the
    live path and its pending children in the engine, recycling the nodes of finished subtrees, so the
    engine's memory does not grow with the canopy; ``max_nodes`` then limits the work (nodes reached), not
    memory, and can be raised freely. ``streaming=False`` keeps every internal node (the arena path).
    ``executor="ray"`` splits the canopy into shards run by Ray actors (``num_workers``, default one per
    CPU, or per GPU where the cluster has them; ``ray_address`` picks the cluster, else the running or a
    new local Ray) and merges their sums into the same result (a shard far larger than its share is split
    again); ``model`` is pickled to each actor (for a large model, use
    :func:`canopy_rs.drivers.ray_canopy.run_ray` with a ``model_factory``). ``progress`` then receives the
    bracket as shards return (``True``: a bar over the reach mass covered).
    ``return_nodes=True`` adds per-node arrays (``parent, token, depth, log_reach, entropy, is_leaf``) as
    ``result.nodes``. ``return_leaves=True`` adds the per-leaf columns ``leaf_tokens``, ``leaf_probs``,
    ``leaf_lengths``, ``leaf_rates`` (leaves in lexicographic token order; for :func:`canopy_rs.embed` and
    :func:`canopy_rs.exact_semantics`) and the pi-weighted ``length_rate_spearman`` and
    ``length_rate_kendall`` of (N, r_N) (None without leaves). ``progress=True`` shows a tqdm bar; a callable receives a :class:`CanopyBounds` snapshot
    every ``progress_interval`` seconds. Ctrl-C raises :class:`Interrupted` carrying the bracket reached.
    """
    if order == "beam":
        raise InvalidArgumentError("order='beam' prunes the canopy, so it is not exact; use "
                                   "'depth-first', 'breadth-first' or 'best-first', or canopy_rs.bounded(..., "
                                   "order='beam', beam_width=B) for a certified bracket")
    _check_executor(executor, ray_address, num_workers)
    policy: dict[str, Any] = dict(vocab_size=vocab_size, eos_token_ids=eos_token_ids, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_k=top_k, top_p=top_p, batch_size=batch_size)
    if executor == "ray":
        if return_nodes or return_leaves:
            raise InvalidArgumentError("executor='ray' merges sums: return_nodes / return_leaves need one process")
        if order != "depth-first" or streaming is False:
            raise InvalidArgumentError("executor='ray' enumerates each shard depth-first and streaming: leave "
                                       "order and streaming at their defaults")
        setup(model, **policy)  # the arguments, checked here before Ray starts
        merged, complete = _on_ray(model, dict(policy, max_nodes=max_nodes), progress, ray_address=ray_address,
                                   num_workers=num_workers)
        res = finish(merged)
        if not complete:
            raise Interrupted(res)
        assert isinstance(res, CanopyResult)
        return res
    s = setup(model, **policy)
    record = return_nodes or return_leaves
    if streaming is None:
        streaming = order == "depth-first" and not record
    elif streaming and (order != "depth-first" or record):
        raise InvalidArgumentError("streaming=True needs order='depth-first' without return_nodes / return_leaves "
                                   "(the other orders and the node arrays keep every node)")
    run = TreeRun(s, order=order, max_nodes=max_nodes, record_nodes=record, streaming=bool(streaming),
                  progress=progress, progress_interval=progress_interval)
    try:
        run.expand()
    except KeyboardInterrupt:
        raise Interrupted(run.bounds("interrupt")) from None
    except TreeTooLargeError as e:
        if not streaming:
            raise
        raise TreeTooLargeError(f"{e}. This run streams (the engine's memory stays bounded whatever the "
                                f"canopy's size), so max_nodes limits only the work; {_size_note(s, max_nodes)}") from None
    res = run.result()
    return res.with_leaves(keep_nodes=return_nodes) if return_leaves else res


def _check_executor(executor: Optional[str], ray_address: Optional[str], num_workers: Optional[int]) -> None:
    if executor not in (None, "local", "ray"):
        raise InvalidArgumentError(f"executor must be None, 'local' or 'ray', got {executor!r}")
    if executor != "ray":
        for name, v in (("ray_address", ray_address), ("num_workers", num_workers)):
            if v is not None:
                raise InvalidArgumentError(f"{name} is for executor='ray' (got executor={executor!r})")


def _on_ray(model: Any, kw: dict[str, Any], progress: Union[bool, Callable[[CanopyBounds], None]],
            **ray_kw: Any) -> Any:
    """:func:`canopy_rs.drivers.ray_canopy.run_ray` with ``progress=True`` as a bar over the mass covered."""
    from canopy_rs.drivers.ray_canopy import run_ray  # imports ray: only for executor="ray"

    bar = MassProgress(True) if progress is True else None
    try:
        return run_ray(model, kw, progress=bar or (progress if callable(progress) else None), **ray_kw)
    finally:
        if bar is not None:
            bar.close()


def _size_note(s: Setup, max_nodes: int) -> str:
    """The size probe's estimate of a canopy that outgrew ``max_nodes`` (16 short rollouts)."""
    try:
        probe = check_canopy_size(s.backend, node_limit=max_nodes, max_new_tokens=s.max_new_tokens,
                                  batch_size=s.batch_size, **s.policy_dict())
    except TreeTooLargeError as e:
        return f"size check: {e}"
    return "size check: the policy allows no larger canopy" if probe is None else f"size check: {probe.describe()}"


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
    beam_width: Optional[int] = None,
    support_cap: Optional[int] = None,
    batch_size: Optional[int] = None,
    max_nodes: int = DEFAULT_MAX_NODES,
    progress: Union[bool, Callable[[CanopyBounds], None]] = False,
    progress_interval: float = 0.5,
    executor: Optional[str] = None,
    ray_address: Optional[str] = None,
    num_workers: Optional[int] = None,
) -> Union[CanopyResult, CanopyBounds]:
    """A certified bracket ``[ce_star_lower, ce_star_upper]`` on CE*_max within a budget.

    Expands the canopy best-first (highest reach probability pi first; ``order`` may also be
    ``"breadth-first"`` or ``"depth-first"``) until ``budget`` is spent: an int counts expanded nodes; a
    :class:`Budget` can also limit model tokens, seconds or memory. Returns the exact :class:`CanopyResult`
    (``is_exact=True``, bounds equal) when the whole canopy fits, else a :class:`CanopyBounds`.
    ``order="beam"`` (with ``beam_width=B``, required there and only there) goes depth by depth and expands
    only the B highest-pi nodes of each depth (ties to the earlier-created node); the pruned ones stay
    frontier nodes, so the bracket below still holds (``stopped_by="beam"`` when the beam ran out before the
    budget).

    Why the bracket holds: CE*_max = sum over internal nodes u of pi(u) h(u) with every h(u) >= 0, so the
    sum over expanded nodes is a lower bound. Every unexpanded frontier node u at depth d heads a subtree
    whose leaf distribution has at most S^(T-d) outcomes (S = the largest policy support, T =
    ``max_new_tokens``), so its contribution pi(u) H(leaf | u) is at most pi(u) (T - d) log S; adding these
    gives the upper bound. S is ``support_cap`` if given (every expanded node is checked against it, and a
    violation raises rather than report an unsound bracket), else ``vocab_size``: top-k alone does not cap
    the support, since ties at the k-th logit keep extra tokens. Likewise each frontier node adds between
    d + 1 and T to the length and up to pi(u) to the truncation probability. The bracket is monotone: it
    never widens as more nodes are expanded.

    ``executor="ray"`` splits the canopy into shards run by Ray actors (``num_workers``, ``ray_address``
    as for :func:`exact`): what the head leaves of the node and token budget is split over the shards by
    reach mass (at least one node each), every shard is bracketed in ``order`` within its share, and the
    shards' certified brackets add up to one (lower bounds sum, upper bounds sum); ``seconds`` is the whole
    run's wall clock, ``memory_bytes`` holds for each shard's run. The budget being split differently, the
    bracket is not the single process's, but it is the exact result once every shard fits its share.
    ``progress`` then receives the bracket as shards return (``True``: a bar over the reach mass covered).

    Ctrl-C returns the bracket reached so far (``stopped_by="interrupt"``) instead of raising.
    """
    if isinstance(budget, bool):
        raise ArgumentTypeError("budget must be an int (expanded nodes) or a canopy_rs.Budget")
    if isinstance(budget, (int, np.integer)):
        budget = Budget(nodes=check_positive_int("budget", budget))
    elif not isinstance(budget, Budget):
        raise ArgumentTypeError(f"budget must be an int (expanded nodes) or a canopy_rs.Budget, got {budget!r}")
    _check_executor(executor, ray_address, num_workers)
    policy: dict[str, Any] = dict(vocab_size=vocab_size, eos_token_ids=eos_token_ids, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_k=top_k, top_p=top_p, batch_size=batch_size)
    s = setup(model, **policy)
    if executor == "ray":
        if order not in ("best-first", "breadth-first", "depth-first") or beam_width is not None:
            raise InvalidArgumentError(f"executor='ray' brackets each shard on its own: order must be 'best-first', "
                                       f"'breadth-first' or 'depth-first' (a beam prunes each depth of the whole "
                                       f"canopy), got order={order!r}, beam_width={beam_width!r}")
        merged, _ = _on_ray(model, dict(policy, max_nodes=max_nodes), progress, budget=budget, order=order,
                            support_cap=support_cap, ray_address=ray_address, num_workers=num_workers)
        return finish(merged)
    run = TreeRun(s, order=order, beam_width=beam_width, max_nodes=max_nodes, support_cap=support_cap,
                  progress=progress, progress_interval=progress_interval)
    try:
        stopped_by = run.expand(budget)
    except KeyboardInterrupt:
        return run.bounds("interrupt")
    if run.tree.frontier_size == 0:
        return run.result()
    # Expansion ended with frontier nodes left: the budget, or a beam that pruned them.
    return run.bounds(stopped_by or "beam")

