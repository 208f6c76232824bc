"""Every exception canopy_rs raises, in one place.

``except canopy_rs.CanopyError`` catches every error of the library, from Python checks and from the Rust
core alike (the compiled core raises these very classes). Each class also derives from the built-in
exception a caller would expect, so ``except ValueError`` / ``TypeError`` / ``MemoryError`` /
``FileNotFoundError`` keep working::

    CanopyError
    ├── InvalidArgumentError      (ValueError)   a bad argument value; the message names the parameter
    ├── ArgumentTypeError         (TypeError)    an argument of the wrong type
    ├── BackendOutputError        (ValueError)   a backend's expand() broke the protocol (shape, dtype, CSR)
    ├── TreeTooLargeError         (ValueError)   the canopy would exceed max_nodes
    ├── StrategyUnsupportedError  (ValueError)   no expansion strategy is proven exact on the model (why, by how much)
    │   ├── TreeAttentionUnsupported             the model cannot run a tree-attention strategy
    │   └── CacheLayoutUnsupported               a cache layer whose state per-row caches cannot copy
    ├── KVBudgetExceededError     (MemoryError)  the live KV cache would exceed max_live_kv_tokens
    ├── ModelNotFoundError        (FileNotFoundError)  no local model where one was named
    ├── StudyConfigError          (ValueError)   a study config that cannot run; the message names the field
    └── EngineStateError          (RuntimeError) the engine was driven out of order (a bug in the driver)

:class:`Interrupted` is not an error: it is the ``KeyboardInterrupt`` (Ctrl-C) of :func:`canopy_rs.exact`,
carrying the bracket reached, so ``except CanopyError`` never swallows a Ctrl-C.

This module imports nothing from the package: the compiled core looks its classes up here.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CanopyError",
    "InvalidArgumentError",
    "ArgumentTypeError",
    "BackendOutputError",
    "TreeTooLargeError",
    "StrategyUnsupportedError",
    "TreeAttentionUnsupported",
    "CacheLayoutUnsupported",
    "KVBudgetExceededError",
    "ModelNotFoundError",
    "StudyConfigError",
    "EngineStateError",
    "Interrupted",
]


class CanopyError(Exception):
    """Base class of every error canopy_rs raises."""


class InvalidArgumentError(CanopyError, ValueError):
    """A bad argument value (the message names the parameter and, where there is one, the fix)."""


class ArgumentTypeError(CanopyError, TypeError):
    """An argument of the wrong type."""


class BackendOutputError(CanopyError, ValueError):
    """A backend's ``expand()`` returned something the protocol does not allow (wrong kind, row count,
    shape or dtype, malformed CSR support, NaN logits). Every driver raises it with the same message."""


class TreeTooLargeError(CanopyError, ValueError):
    """The canopy would exceed ``max_nodes``: raise it, shrink the policy, or use ``canopy_rs.bounded``."""


class StrategyUnsupportedError(CanopyError, ValueError):
    """The transformers backend cannot prove an expansion strategy exact on this model: its startup self-check
    deviated from full recomputation (the message says by how much), its cache holds state that cannot be
    copied per branch, or it keeps state outside transformers' cache. Raised for the requested strategy, or
    by ``strategy="auto"`` when none is left; a plain ``logits_fn`` callable that recomputes every prefix
    always works."""


class TreeAttentionUnsupported(StrategyUnsupportedError):
    """The model cannot run the requested tree-attention strategy (``"cascade"`` or ``"tree"``; the message says
    why); use ``strategy="auto"`` or ``"per-row"``."""


class CacheLayoutUnsupported(StrategyUnsupportedError):
    """A cache layer type, or an attribute of one, that per-row caches do not know how to copy per branch:
    refused rather than shared between branches."""


class KVBudgetExceededError(CanopyError, MemoryError):
    """The live KV cache would exceed ``max_live_kv_tokens``."""


class ModelNotFoundError(CanopyError, FileNotFoundError):
    """No local model where one was named (nothing is ever downloaded)."""


class StudyConfigError(CanopyError, ValueError):
    """A study configuration (:func:`canopy_rs.study`) that cannot run: an unknown key, a missing model folder
    or prompt file, a family that is not one base and one fine-tuned model, ...; the message names the field."""


class EngineStateError(CanopyError, RuntimeError):
    """The engine was called out of order (e.g. ingest without a pending batch): a bug in the caller."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`canopy_rs.exact`: ``.bounds`` holds the certified bracket reached so far."""

    def __init__(self, bounds: Any) -> None:
        super().__init__(
            f"interrupted after {bounds.num_expanded} expanded nodes: "
            f"CE* in [{bounds.ce_star_lower:.6g}, {bounds.ce_star_upper:.6g}] (see .bounds)"
        )
        self.bounds = bounds
