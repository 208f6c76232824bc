"""Cache operations: build a model's transformers cache, say which strategies its layout allows, and move rows
of it between branches (the per-row strategy) without ever sharing state between them.

Every attribute of a cache layer is state. A shallow copy shares it, and then one branch's forward leaks into
its siblings: transformers 5.25's linear-attention layers, for one, advance a token-count tensor in place
(``cumulative_length_linear.add_``), which a shallow copy hands to every branch. So each attribute of each
layer type canopy_rs knows is declared with one of two rules:

* ``ROWS``: per-row state, batch first (a tensor, ``None``, or a dict of them by state index). Rows are
  gathered with ``index_select`` (always a new tensor) and caches are joined with ``torch.cat``
  (``ROWS_DIM1``: the same with the batch in the second dimension).
* ``COMMON``: state all rows of one cache share (flags, sizes, token counters, constants: plain values,
  tensors, or containers of them). Deep-copied: tensors cloned, containers fresh. Caches are joined only when
  it is equal in all of them (rows of one per-row chunk always have the same length, so it is).

A layer type canopy_rs does not know (a static, quantized or indexed layer, a model's own cache class), or an
attribute of a known type that is not declared (a newer transformers that adds state), raises
:class:`~canopy_rs.errors.CacheLayoutUnsupported` naming it: new state is refused, never silently shared.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import transformers
from transformers import cache_utils

from canopy_rs.errors import CacheLayoutUnsupported

__all__ = [
    "new_cache",
    "new_tree_cache",
    "kv_layers_support",
    "tree_attention_support",
    "select_cache_rows",
    "concat_caches",
    "LAYER_RULES",
]

ROWS = "rows"
ROWS_DIM1 = "rows-dim1"  # per-row state whose batch dimension is the second (DSA indexer positions)
COMMON = "common"
_BATCH_DIM = {ROWS: 0, ROWS_DIM1: 1}

_FULL_ATTENTION = {"keys": ROWS, "values": ROWS, "device": COMMON, "dtype": COMMON, "is_initialized": COMMON}
_SLIDING_WINDOW = {
    **_FULL_ATTENTION,
    "sliding_window": COMMON,
    "cumulative_length": COMMON,
    "_sliding_window_tensor": COMMON,
    "record_past": COMMON,
}
_LINEAR_ATTENTION = {
    "conv_states": ROWS,
    "recurrent_states": ROWS,
    "number_of_states": COMMON,
    "is_conv_states_initialized": COMMON,
    "is_recurrent_states_initialized": COMMON,
    "has_previous_state": COMMON,
    "conv_kernel_size": COMMON,
    "cumulative_length_linear": COMMON,  # transformers >= 5.25: tokens seen, a tensor advanced in place
    "device": COMMON,
    "dtype": COMMON,
    "record_past": COMMON,
}

_INDEXED_ATTENTION = {
    **_FULL_ATTENTION,
    "indexer_keys": ROWS,
    "indexer_position_ids": ROWS_DIM1,  # [position_dims, batch, seq]
    "is_indexer_initialized": COMMON,
    "indexer_dtype": COMMON,
    "indexer_device": COMMON,
}

#: The layer types of ``transformers.cache_utils`` whose every attribute canopy_rs copies by a declared rule.
LAYER_RULES: dict[str, dict[str, str]] = {
    "DynamicLayer": _FULL_ATTENTION,
    "DynamicSlidingWindowLayer": _SLIDING_WINDOW,
    "DynamicIndexedLayer": _INDEXED_ATTENTION,
    "DummyLayer": {"keys": ROWS, "values": ROWS, "is_initialized": COMMON},
    "LinearAttentionLayer": _LINEAR_ATTENTION,
    "LinearAttentionAndFullAttentionLayer": {**_LINEAR_ATTENTION, **_FULL_ATTENTION},
    "LinearAttentionAndSlidingWindowAttentionLayer": {**_LINEAR_ATTENTION, **_SLIDING_WINDOW},
}
_CACHE_ATTRIBUTES = frozenset({"layers", "layer_class_to_replicate", "offloading"})

_IMMUTABLE = (bool, int, float, str, type(None), torch.device, torch.dtype, type)


def new_cache(model: Any) -> Any:
    """A fresh ``DynamicCache`` laid out for ``model`` (sliding-window / linear-attention layers included)."""
    return cache_utils.DynamicCache(config=model.config)


def new_tree_cache(model: Any) -> Any:
    """A ``DynamicCache`` whose sliding-window layers are replaced by full ``DynamicLayer``s (tree attention
    keeps every column and enforces the window limit itself)."""
    cache = new_cache(model)
    for i, layer in enumerate(cache.layers):
        if type(layer) is cache_utils.DynamicSlidingWindowLayer:
            cache.layers[i] = cache_utils.DynamicLayer()
    return cache


# ----------------------------------------------------------------------------------------------------------
# Which strategies a layout allows


def kv_layers_support(model: Any) -> tuple[Optional[str], Optional[int]]:
    """``(reason, sliding_window)`` from the model's cache layout alone: ``reason`` is set when a layer is not
    a plain full- or sliding-window-attention KV cache (linear attention, recurrent or indexed state), which
    no flattened tree layout can hold; ``sliding_window`` is the smallest window (``None``: no such layer)."""
    try:
        cache = new_cache(model)
    except Exception as exc:  # pragma: no cover - exotic configs
        return f"cannot build a DynamicCache for this model ({type(exc).__name__}: {exc})", None
    kinds = set()
    windows = []
    for layer in cache.layers:
        if type(layer) in (cache_utils.DynamicLayer, cache_utils.DummyLayer):
            continue
        if type(layer) is cache_utils.DynamicSlidingWindowLayer:
            windows.append(int(layer.sliding_window))
            continue
        kinds.add(type(layer).__name__)
    if kinds:
        names = ", ".join(sorted(kinds))
        if any("Linear" in k for k in kinds):
            why = "linear-attention / recurrent state cannot be masked per branch"
        else:
            why = "these cache layers are not plain full- or sliding-window-attention KV caches"
        return f"the model's cache layers ({names}) do not support tree attention: {why}", None
    return None, (min(windows) if windows else None)


_TREE_ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


def tree_attention_support(model: Any) -> tuple[Optional[str], Optional[int]]:
    """``(reason, sliding_window)``: ``reason`` says why dense-mask tree attention cannot run on ``model`` at
    all (``None`` if it can, pending the startup self-check); ``sliding_window`` as in
    :func:`kv_layers_support`. A sliding-window model is exact under tree attention only while prompt + depth
    <= window (then every window covers the whole sequence)."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in _TREE_ATTN_IMPLEMENTATIONS:
        hint = " (flash-attention kernels take no arbitrary 4D mask)" if "flash" in str(impl) else ""
        return (
            f"attn_implementation={impl!r} cannot take a custom 4D tree mask{hint}; tree attention needs "
            "'sdpa' or 'eager' (load the model with attn_implementation='sdpa')"
        ), None
    return kv_layers_support(model)


# ----------------------------------------------------------------------------------------------------------
# Rows between branches (the per-row strategy): every attribute copied by its declared rule


def _where() -> str:
    return f"transformers {transformers.__version__}"


def _layer_rules(layer: Any) -> dict[str, str]:
    cls = type(layer)
    rules = LAYER_RULES.get(cls.__name__) if cls.__module__ == cache_utils.__name__ else None
    if rules is None:
        raise CacheLayoutUnsupported(
            f"cache layer {cls.__module__}.{cls.__name__} ({_where()}) is not a layer type canopy_rs knows how "
            f"to copy per branch (known: {', '.join(LAYER_RULES)}); per-row caches refuse it rather than share "
            "its state between branches"
        )
    unknown = sorted(set(vars(layer)) - rules.keys())
    if unknown:
        raise CacheLayoutUnsupported(
            f"cache layer {cls.__name__} ({_where()}) holds state canopy_rs does not know how to copy per branch: "
            f"{', '.join(unknown)}; per-row caches refuse it rather than share it between branches"
        )
    return rules


def _check_cache(cache: Any) -> None:
    if type(cache) is not cache_utils.DynamicCache:
        raise CacheLayoutUnsupported(
            f"{type(cache).__module__}.{type(cache).__name__} is not transformers' DynamicCache: canopy_rs "
            "copies only DynamicCache rows per branch"
        )
    unknown = sorted(set(vars(cache)) - _CACHE_ATTRIBUTES)
    if unknown or getattr(cache, "offloading", False):
        what = f"attributes {', '.join(unknown)}" if unknown else "offloading=True"
        raise CacheLayoutUnsupported(f"a DynamicCache with {what} ({_where()}) cannot be copied per branch")


def _rows(value: Any, index: torch.Tensor, n_rows: Optional[int], where: str, dim: int) -> Any:
    """Per-row state gathered at ``index`` along ``dim`` (a new tensor, repeats allowed)."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: _rows(v, index, n_rows, where, dim) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.ndim > dim:
        if n_rows is not None and value.shape[dim] != n_rows:
            raise CacheLayoutUnsupported(
                f"{where} has {value.shape[dim]} rows where the cache has {n_rows}: not per-row state"
            )
        return value.index_select(dim, index.to(value.device))
    raise CacheLayoutUnsupported(f"{where} holds a {type(value).__name__}, not per-row state")


def _common(value: Any, where: str) -> Any:
    """``COMMON`` state deep-copied: tensors cloned, containers fresh, plain values as they are."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _common(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_common(v, where) for v in value)
    if isinstance(value, _IMMUTABLE):
        return value
    raise CacheLayoutUnsupported(f"{where} holds a {type(value).__name__}, which canopy_rs cannot copy per branch")


def _num_rows(cache: Any) -> Optional[int]:
    for layer in cache.layers:
        for name, rule in _layer_rules(layer).items():
            if rule != ROWS:
                continue
            value = getattr(layer, name, None)
            values = value.values() if isinstance(value, dict) else [value]
            for v in values:
                if isinstance(v, torch.Tensor) and v.ndim >= 1:
                    return int(v.shape[0])
    return None


def _new_like(obj: Any, state: dict[str, Any]) -> Any:
    new = object.__new__(type(obj))
    new.__dict__.update(state)
    return new


def select_cache_rows(cache: Any, rows: torch.Tensor) -> Any:
    """A new cache holding ``rows`` (repeats allowed) of ``cache``, sharing no mutable state with it (see the
    module docstring); ``cache`` is left untouched."""
    _check_cache(cache)
    n_rows = _num_rows(cache)
    layers = []
    for i, layer in enumerate(cache.layers):
        rules = _layer_rules(layer)
        state = {}
        for name, value in vars(layer).items():
            where = f"layer {i} ({type(layer).__name__}).{name}"
            rule = rules[name]
            state[name] = _common(value, where) if rule == COMMON else _rows(value, rows, n_rows, where, _BATCH_DIM[rule])
        layers.append(_new_like(layer, state))
    return _new_like(cache, {k: (layers if k == "layers" else _common(v, f"cache.{k}")) for k, v in vars(cache).items()})


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _cat_rows(values: list, where: str, dim: int) -> Any:
    first = values[0]
    if first is None:
        if any(v is not None for v in values):
            raise CacheLayoutUnsupported(f"{where} is set in some caches and not in others: cannot join them")
        return None
    if isinstance(first, dict):
        return {k: _cat_rows([v[k] for v in values], where, dim) for k in first}
    return torch.cat(values, dim=dim)


def concat_caches(caches: list) -> Any:
    """Join caches of the same layout along the batch dimension (their rows in order). Each must have been
    made by :func:`select_cache_rows` (so it shares nothing with another); ``COMMON`` state must be equal in
    all of them, else :class:`CacheLayoutUnsupported` (never a silent choice of one)."""
    if len(caches) == 1:
        return caches[0]
    for c in caches:
        _check_cache(c)
    layers = []
    for i, per_layer in enumerate(zip(*(c.layers for c in caches))):
        first = per_layer[0]
        rules = _layer_rules(first)
        if any(type(layer) is not type(first) or vars(layer).keys() != vars(first).keys() for layer in per_layer):
            raise CacheLayoutUnsupported(f"layer {i} differs in type or state between the caches to join")
        state = {}
        for name, rule in rules.items():
            if name not in vars(first):
                continue
            where = f"layer {i} ({type(first).__name__}).{name}"
            values = [vars(layer)[name] for layer in per_layer]
            if rule != COMMON:
                state[name] = _cat_rows(values, where, _BATCH_DIM[rule])
            else:
                if not all(_equal(values[0], v) for v in values[1:]):
                    raise CacheLayoutUnsupported(f"{where} differs between the caches to join (rows of different lengths?)")
                state[name] = values[0]  # already a private copy (select_cache_rows)
        layers.append(_new_like(first, state))
    return _new_like(caches[0], {**vars(caches[0]), "layers": layers})
