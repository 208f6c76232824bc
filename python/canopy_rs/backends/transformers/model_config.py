"""What canopy_rs reads from a transformers model's configuration: the decoder's config, the logits width,
the EOS ids, the context window, and whether the model keeps its state in transformers' ``Cache`` at all."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from canopy_rs.errors import InvalidArgumentError

__all__ = [
    "text_config",
    "resolve_vocab_size",
    "resolve_eos_token_ids",
    "declared_context_length",
    "state_outside_cache_reason",
]


def text_config(model: Any) -> Any:
    """The decoder's config (the text config of a multimodal model)."""
    cfg = model.config
    get = getattr(cfg, "get_text_config", None)
    if get is not None:
        try:
            return get(decoder=True)
        except TypeError:
            return get()
    return cfg


def resolve_vocab_size(model: Any, override: Optional[int]) -> int:
    """The width of the model's logits rows (the policy's vocabulary), or ``override`` (which must not exceed
    it; the logits are then cut to the first ``override`` columns)."""
    width = None
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        width = int(emb.weight.shape[0])
    if width is None:
        width = int(getattr(text_config(model), "vocab_size"))
    if override is None:
        return width
    override = int(override)
    if not 1 <= override <= width:
        raise InvalidArgumentError(f"vocab_size={override} must be in [1, {width}] (the model's logits width)")
    return override


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (int,)):
        return [int(value)]
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    return [int(v) for v in value]


def resolve_eos_token_ids(
    model: Any, tokenizer: Any, override: Optional[Sequence[int]], vocab_size: int
) -> tuple[int, ...]:
    """EOS ids: ``override`` if given (``[]`` means no EOS); else the generation config's ``eos_token_id``
    (all of them), else the model config's, else the tokenizer's. Each id is its own outcome."""
    if override is not None:
        ids = _as_id_list(override)
        source = "eos_token_ids="
    else:
        ids = []
        source = ""
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            ids = _as_id_list(getattr(gen, "eos_token_id", None))
            source = "generation_config.eos_token_id"
        if not ids:
            ids = _as_id_list(getattr(text_config(model), "eos_token_id", None))
            source = "config.eos_token_id"
        if not ids and tokenizer is not None:
            ids = _as_id_list(getattr(tokenizer, "eos_token_id", None))
            source = "tokenizer.eos_token_id"
        if not ids:
            raise InvalidArgumentError(
                "could not find EOS token ids in the generation config, the model config or the tokenizer; "
                "pass eos_token_ids=[...] (or eos_token_ids=[] for a canopy with no EOS)"
            )
    out = sorted(set(ids))
    bad = [i for i in out if not 0 <= i < vocab_size]
    if bad:
        raise InvalidArgumentError(
            f"EOS ids {bad} (from {source}) are outside the vocabulary [0, {vocab_size}); "
            "pass eos_token_ids=[...] explicitly"
        )
    return tuple(out)


#: Config fields that bound the positions a model was built for, in the order they are read.
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def declared_context_length(model: Any) -> tuple[Optional[int], Optional[str]]:
    """``(length, field)``: the model's context window (the number of positions its config declares) and the
    config field it came from; ``(None, None)`` for a model with no such bound (state-space models)."""
    cfg = text_config(model)
    for name in CONTEXT_FIELDS:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return int(value), name
    return None, None


def state_outside_cache_reason(model: Any, cache_kw: Optional[str]) -> Optional[str]:
    """Why the model's state cannot be branched through transformers' ``DynamicCache`` (``None``: it can):
    its forward takes no cache argument (RWKV keeps a ``state`` of its own), or transformers itself does not
    give it a ``DynamicCache`` (models with their own cache class)."""
    name = type(model).__name__
    if cache_kw is None:
        return f"{name}.forward takes no cache argument: its recurrent state lives outside transformers' Cache"
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    if supports is not None and not supports():
        return f"{name} uses a cache class of its own, not transformers' DynamicCache"
    return None
