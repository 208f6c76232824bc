"""Type stubs for the compiled Rust core ``canopy_rs._core``.

Everything heavy (the decoding policy on logits rows, the canopy arena and frontier, f64 aggregation) runs in
Rust with the GIL released. Python owns the model and drives the loop. Errors are raised as the classes of
``canopy_rs.errors``.
"""

from typing import Any, Optional, Sequence, final

import numpy as np
import numpy.typing as npt
from typing_extensions import Self

__all__ = [
    "__version__",
    "Policy",
    "Tree",
    "Partial",
    "policy_support",
    "normalise_support",
]

__version__: str

@final
class Policy:
    """The decoding policy: temperature -> top-k (ties at the k-th value kept) -> top-p (smallest prefix of
    the descending order whose probability reaches p; the first token always kept) -> renormalise."""

    def __new__(
        cls, temperature: float = 1.0, top_k: Optional[int] = None, top_p: float = 1.0
    ) -> Self: ...
    @property
    def temperature(self) -> float: ...
    @property
    def top_k(self) -> Optional[int]: ...
    @property
    def top_p(self) -> float: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...

def policy_support(
    logits: npt.NDArray[np.floating[Any]], policy: Policy
) -> tuple[
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
]:
    """Apply the policy to each row of ``logits`` ``[B, V]`` (float32 or float64).

    Returns ``(offsets [B+1], tokens [nnz], logprobs [nnz], entropy [B])``: row ``i``'s support is
    ``tokens[offsets[i]:offsets[i+1]]`` in ascending token order; tokens whose f64 probability
    underflows to 0 are not in the support."""

def normalise_support(
    offsets: npt.NDArray[np.int64],
    tokens: npt.NDArray[np.int64],
    logprobs: npt.NDArray[np.float64],
    vocab_size: int,
) -> tuple[
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
]:
    """Validate a backend's CSR support (tokens distinct and in range, log-probs finite, each row summing to 1
    within 1e-4) and renormalise it in f64. Returns the same layout as :func:`policy_support`."""

@final
class Tree:
    """The canopy of one prompt under one policy, expanded in batches.

    ``order``: ``"depth-first"`` (least live state), ``"breadth-first"``, ``"best-first"`` (highest reach
    probability first; what ``bounded`` uses) or ``"beam"`` (depth by depth, expanding only the
    ``beam_width`` highest-reach nodes of each depth; the rest stay frontier nodes, so ``is_done`` can hold
    with ``frontier_size > 0``). ``support_cap`` is the largest policy support the certified
    upper bound may assume (default: ``vocab_size``); every expanded node is checked against it.

    ``streaming`` (depth-first without ``record_nodes`` only) recycles the slots of finished subtrees, so the
    engine holds only the live paths and their pending children; node ids are still numbered in creation
    order (those of the arena path), and :meth:`prefixes` takes only live nodes' ids. ``root=(prefix, log_reach, path_entropy)`` enumerates only the
    subtree below that prefix (a shard): the canopy's root and the prefix's nodes are expanded first, one
    per batch, to walk the backend down the prefix, and add nothing to the sums."""

    def __new__(
        cls,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        max_new_tokens: int,
        policy: Policy,
        order: str = "depth-first",
        max_nodes: int = 10_000_000,
        record_nodes: bool = False,
        support_cap: Optional[int] = None,
        beam_width: Optional[int] = None,
        streaming: bool = False,
        root: Optional[tuple[Sequence[int], float, float]] = None,
    ) -> Self: ...
    def next_batch(
        self, max_rows: int
    ) -> tuple[
        npt.NDArray[np.int64],
        npt.NDArray[np.int64],
        npt.NDArray[np.int64],
        npt.NDArray[np.int64],
    ]:
        """Pop up to ``max_rows`` frontier nodes: ``(node_ids, parent_ids, tokens, depths)``. The next call
        must be ``ingest_logits`` or ``ingest_support`` for exactly these rows, in this order."""
    def prefixes(self, node_ids: npt.NDArray[np.int64]) -> list[list[int]]: ...
    def ingest_logits(self, logits: npt.NDArray[np.floating[Any]]) -> None: ...
    def ingest_support(
        self,
        offsets: npt.NDArray[np.int64],
        tokens: npt.NDArray[np.int64],
        logprobs: npt.NDArray[np.float64],
    ) -> None: ...
    def take_released(self) -> npt.NDArray[np.int64]:
        """Expanded node ids whose state is no longer needed (since the last call)."""
    def frontier(
        self,
    ) -> tuple[
        npt.NDArray[np.int64],
        npt.NDArray[np.int64],
        npt.NDArray[np.int64],
        npt.NDArray[np.int64],
        npt.NDArray[np.float64],
    ]:
        """Unexpanded internal nodes: ``(node_ids, parent_ids, tokens, depths, log_reach)``."""
    @property
    def is_done(self) -> bool: ...
    @property
    def num_expanded(self) -> int: ...
    @property
    def num_nodes(self) -> int:
        """Arena slots used so far (internal nodes; leaves too when ``record_nodes``). Without streaming the
        ids are ``0..num_nodes``; with streaming this is the arena's high-water mark, not an id bound."""
    @property
    def live_nodes(self) -> int:
        """Arena slots holding a node now."""
    @property
    def frontier_size(self) -> int: ...
    def frontier_roots(self) -> list[tuple[list[int], float, float]]:
        """The frontier's nodes as shard roots ``(prefix, log_reach, path_entropy)``, most probable first."""
    def partial(self, with_frontier: bool = True) -> Partial:
        """The run's sums so far; ``with_frontier=False`` leaves the frontier's bound terms to the shards."""
    def bounds(self) -> dict[str, float]:
        """Certified brackets: ``ce_star_lower/upper``, ``expected_length_lower/upper``,
        ``truncation_prob_lower/upper``, ``explored_mass``, ``frontier_mass``, ``num_expanded``,
        ``frontier_size``, ``num_nodes``."""
    def result(self) -> dict[str, Any]:
        """Exact population values once ``is_done`` (raises otherwise)."""
    def nodes(self) -> dict[str, npt.NDArray[Any]]:
        """Per-node arrays when ``record_nodes``: ``parent, token, depth, log_reach, entropy, is_leaf``."""

@final
class Partial:
    """The sums of a run over part of a canopy (:meth:`Tree.partial`). Partials of disjoint parts merge into
    the canopy's values; picklable as a flat float64 array."""

    @staticmethod
    def from_array(values: npt.NDArray[np.float64]) -> Partial: ...
    def to_array(self) -> npt.NDArray[np.float64]: ...
    def merge(self, other: Partial) -> Partial:
        """A new partial with both parts' sums."""
    @property
    def max_new_tokens(self) -> int: ...
    def bounds(self) -> dict[str, float]:
        """The certified bracket of the merged parts (keys as :meth:`Tree.bounds`)."""
    def result(self) -> dict[str, Any]:
        """Exact values when no unexpanded node is left (raises otherwise)."""
