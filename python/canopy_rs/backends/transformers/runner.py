"""Helpers shared by the transformers expansion strategies: the forward call, model introspection, prompt
rendering and cache-row surgery. Nothing here imports the Rust core."""

from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Any, Optional, Sequence

import torch

from transformers import cache_utils

from canopy_rs.errors import InvalidArgumentError, KVBudgetExceededError

__all__ = [
    "ModelRunner",
    "KVBudgetExceededError",
    "render_prompt",
    "resolve_vocab_size",
    "resolve_eos_token_ids",
    "tree_attention_support",
    "kv_layers_support",
    "sliding_window_reason",
    "new_tree_cache",
    "select_cache_rows",
    "concat_caches",
    "can_concat_cache",
    "new_cache",
]


class ModelRunner:
    """Calls a transformers causal LM the way the installed transformers version expects.

    transformers 5.x names the cache argument ``cache`` (``past_key_values`` is a deprecated alias, removed in
    5.40); 4.x names it ``past_key_values``. The name is read from the forward signature once.
    """

    def __init__(self, model: Any, *, float32_head: bool = True):
        self.model = model
        self.head = Float32Head(model) if float32_head else None
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        if "logits_to_keep" in params:
            self.keep_kw: Optional[str] = "logits_to_keep"
        elif "num_logits_to_keep" in params:
            self.keep_kw = "num_logits_to_keep"
        else:
            self.keep_kw = None
        self.tokens_forwarded = 0
        self.model_calls = 0

    @property
    def config(self) -> Any:
        return self.model.config

    def __call__(
        self,
        input_ids: torch.Tensor,
        cache: Any,
        *,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        last_only: bool = False,
        count: bool = True,
        extra: Optional[dict] = None,
    ) -> torch.Tensor:
        """Forward ``input_ids`` ``[B, q]`` on top of ``cache`` (updated in place; ``None``: no cache, the
        attention function keeps the state); returns the logits ``[B, q or 1, V]``. ``extra`` keyword
        arguments travel through the forward to the attention functions."""
        kwargs: dict[str, Any] = {self.cache_kw: cache, "use_cache": True} if cache is not None else {"use_cache": False}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if last_only and self.keep_kw is not None:
            kwargs[self.keep_kw] = 1
        if extra:
            kwargs.update(extra)
        with self.head_context():
            out = self.model(input_ids=input_ids, **kwargs)
        logits = out.logits
        if last_only:
            logits = logits[:, -1:, :]
        if count:
            self.tokens_forwarded += int(input_ids.numel())
            self.model_calls += 1
        return logits

    def full_logits(self, ids: Sequence[int], device: torch.device) -> torch.Tensor:
        """Next-token logits of one full sequence with no cache (the reference path): ``[V]``."""
        t = torch.tensor([list(ids)], dtype=torch.long, device=device)
        with self.head_context():
            out = self.model(input_ids=t, use_cache=False)
        return out.logits[0, -1, :]

    def head_context(self) -> Any:
        return self.head if self.head is not None and self.head.active else contextlib.nullcontext()


_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f")


class _Float32(torch.nn.Module):
    """A float32 copy of a module, applied to its input cast to float32."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.inner = copy.deepcopy(module).float()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.inner(x.float(), *args, **kwargs)


def _owner(root: torch.nn.Module, target: torch.nn.Module) -> Optional[tuple[torch.nn.Module, str]]:
    for name, mod in root.named_modules():
        for child_name, child in mod.named_children():
            if child is target:
                return mod, child_name
    return None


class Float32Head:
    """Runs a reduced-precision model's final norm and LM head in float32 (a context manager swapping in
    float32 copies for the duration of a forward): the logits, hence the top-k sets and the policy support,
    then carry float32 rounding only, whatever the model's dtype. Inactive for float32/float64 models.
    ``covers`` names what runs in float32 (``"final norm + LM head"``, or ``"LM head"`` when no final norm
    is recognised)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.swaps: list[tuple[torch.nn.Module, str, torch.nn.Module, torch.nn.Module]] = []
        try:
            dtype = next(model.parameters()).dtype
        except StopIteration:  # pragma: no cover
            dtype = torch.float32
        self.active = dtype in (torch.float16, torch.bfloat16)
        self.covers = ""
        if not self.active:
            return
        parts = []
        get_decoder = getattr(model, "get_decoder", None)
        decoder = get_decoder() if get_decoder is not None else None
        if decoder is not None:
            for name in _FINAL_NORM_NAMES:
                norm = getattr(decoder, name, None)
                if isinstance(norm, torch.nn.Module) and not list(norm.children()):
                    self.swaps.append((decoder, name, norm, _Float32(norm)))
                    parts.append("final norm")
                    break
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        owner = _owner(model, head) if isinstance(head, torch.nn.Module) else None
        if owner is not None:
            self.swaps.append((owner[0], owner[1], head, _Float32(head)))
            parts.append("LM head")
        self.covers = " + ".join(parts)
        self.active = bool(self.swaps)

    def __enter__(self) -> None:
        for parent, name, _, f32 in self.swaps:
            setattr(parent, name, f32)

    def __exit__(self, *exc: Any) -> None:
        for parent, name, orig, _ in self.swaps:
            setattr(parent, name, orig)


def new_cache(model: Any) -> Any:
    """A fresh ``DynamicCache`` laid out for ``model`` (sliding-window / linear-attention layers included)."""
    return cache_utils.DynamicCache(config=model.config)


# ----------------------------------------------------------------------------------------------------------
# Model introspection


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


_TREE_ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


def tree_attention_support(model: Any) -> tuple[Optional[str], Optional[int]]:
    """``(reason, sliding_window)``: ``reason`` says why tree attention cannot run on ``model`` at all
    (``None`` if it can, pending the startup self-check); ``sliding_window`` is the smallest attention window
    of the model's sliding-window layers (``None`` if it has none). A sliding-window model is exact under tree
    attention only while prompt + depth <= window (then every window covers the whole sequence)."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in _TREE_ATTN_IMPLEMENTATIONS:
        hint = ""
        if "flash" in str(impl):
            hint = " (flash-attention kernels take no arbitrary 4D mask)"
        return (
            f"attn_implementation={impl!r} cannot take a custom 4D tree mask{hint}; tree attention needs "
            "'sdpa' or 'eager' (load the model with attn_implementation='sdpa')"
        ), None
    return kv_layers_support(model)


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
        if type(layer) is cache_utils.DynamicLayer or type(layer).__name__ == "DummyLayer":
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


def sliding_window_reason(window: int) -> str:
    return (
        f"sliding-window attention (window {window}): a flattened tree cache is exact only while prompt + depth "
        f"<= {window}; pass strategy='tree' to use tree attention within that limit"
    )


def new_tree_cache(model: Any) -> Any:
    """A ``DynamicCache`` whose sliding-window layers are replaced by full ``DynamicLayer``s (tree attention
    keeps every column and enforces the window limit itself)."""
    cache = new_cache(model)
    for i, layer in enumerate(cache.layers):
        if type(layer) is cache_utils.DynamicSlidingWindowLayer:
            cache.layers[i] = cache_utils.DynamicLayer()
    return cache


# ----------------------------------------------------------------------------------------------------------
# Prompt rendering


def _wants_enable_thinking_false(model: Any, tokenizer: Any) -> bool:
    model_type = str(getattr(text_config(model), "model_type", "") or getattr(model.config, "model_type", ""))
    if model_type.startswith("qwen3"):
        return True
    template = getattr(tokenizer, "chat_template", None)
    return "enable_thinking" in str(template or "")


def render_prompt(
    model: Any,
    tokenizer: Any,
    prompt: Any,
    chat: bool,
    chat_template_kwargs: Optional[dict] = None,
) -> list[int]:
    """The prompt token ids (docs/backends.md#transformers-models): base models get the raw prompt (tokenised with the
    tokenizer's special tokens, e.g. BOS); ``chat=True`` renders ``[{"role": "user", "content": prompt}]``
    with the chat template and ``add_generation_prompt=True`` (Qwen3-style templates get
    ``enable_thinking=False``). A list of token ids is used as is."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise InvalidArgumentError("a string prompt needs a tokenizer; pass tokenizer=... or a list of token ids")
        if chat:
            if not getattr(tokenizer, "chat_template", None):
                raise InvalidArgumentError("chat=True but the tokenizer has no chat_template: pass chat=False or a tokenizer with one")
            kwargs = dict(chat_template_kwargs or {})
            if "enable_thinking" not in kwargs and _wants_enable_thinking_false(model, tokenizer):
                kwargs["enable_thinking"] = False
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False, **kwargs
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
    else:
        if chat:
            raise InvalidArgumentError("chat=True needs a string prompt (token ids are used as is)")
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.flatten().tolist()
        ids = prompt
    ids = [int(t) for t in ids]
    if not ids:
        raise InvalidArgumentError("the prompt is empty: the model needs at least one token to predict the next one")
    return ids


# ----------------------------------------------------------------------------------------------------------
# Cache-row surgery (per-row strategy). Rows are the batch dimension of every layer's state.


def _copy_layer(layer: Any) -> Any:
    """A shallow copy whose dict attributes (linear-attention state dicts) are fresh, so that reassigning
    state on the copy never touches the original."""
    c = copy.copy(layer)
    for k, v in list(vars(c).items()):
        if isinstance(v, dict):
            setattr(c, k, dict(v))
    return c


def select_cache_rows(cache: Any, rows: torch.Tensor) -> Any:
    """A new cache holding ``rows`` (repeats allowed) of ``cache``; ``cache`` is left untouched.

    Uses each layer's ``reorder_cache`` (an ``index_select`` on the batch dimension that exists for every
    layer type: full, sliding-window, indexed, linear-attention and hybrid layers), applied to copies."""
    new = copy.copy(cache)
    new.layers = [_copy_layer(layer) for layer in cache.layers]
    for layer in new.layers:
        layer.reorder_cache(rows)
    return new


def _concat_layer_names() -> tuple[str, ...]:
    return (
        "DynamicLayer",
        "DynamicSlidingWindowLayer",
        "DummyLayer",
        "LinearAttentionLayer",
        "LinearAttentionAndFullAttentionLayer",
        "LinearAttentionAndSlidingWindowAttentionLayer",
    )


def can_concat_cache(cache: Any) -> bool:
    """Whether :func:`concat_caches` knows every layer type of ``cache`` (batch-first state only)."""
    names = _concat_layer_names()
    return all(type(layer).__name__ in names for layer in cache.layers)


def _cat_value(values: list, rows: list[int]) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor):
        if first.ndim >= 1 and all(v.shape[0] == r for v, r in zip(values, rows)):
            return torch.cat(values, dim=0)
        return first
    if isinstance(first, dict):
        return {k: _cat_value([v[k] for v in values], rows) for k in first}
    return first


def concat_caches(caches: list, rows: list[int]) -> Any:
    """Concatenate caches of the same layout along the batch dimension (``rows[i]`` rows each). Only for
    layouts accepted by :func:`can_concat_cache`."""
    if len(caches) == 1:
        return caches[0]
    new = copy.copy(caches[0])
    layers = []
    for per_layer in zip(*(c.layers for c in caches)):
        out = _copy_layer(per_layer[0])
        for k in list(vars(per_layer[0]).keys()):
            setattr(out, k, _cat_value([vars(layer)[k] for layer in per_layer], rows))
        layers.append(out)
    new.layers = layers
    return new
