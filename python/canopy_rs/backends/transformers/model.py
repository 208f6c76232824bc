"""The transformers backend's model class: one causal LM and one prompt behind the backend protocol, with
the cheapest expansion strategy the startup self-check proves exact on the model."""


from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from canopy_rs.backends.torch_policy import policy_support_numpy
from canopy_rs.errors import (
    ArgumentTypeError,
    InvalidArgumentError,
    StrategyUnsupportedError,
    TreeAttentionUnsupported,
)
from canopy_rs.protocol import NextTokenLogits, NodeBatch, PolicySupport

from ._engine import KVEngine
from .cache_ops import kv_layers_support, tree_attention_support
from .cascade import CascadeEngine
from .model_config import (
    declared_context_length,
    resolve_eos_token_ids,
    resolve_vocab_size,
    state_outside_cache_reason,
    text_config,
)
from .per_row import PerRowEngine
from .prompt import render_prompt
from .runner import ModelRunner
from .self_check import CHECK_DEPTH, engine_self_check
from .tree_attention import TreeAttentionEngine

__all__ = ["TransformersModel", "STRATEGIES"]

STRATEGIES = ("auto", "cascade", "tree", "per-row")
_STRATEGY_ALIASES = {"per_row": "per-row", "rows": "per-row", "tree-attention": "tree", "tree_attention": "tree"}


_WIDER_WINDOW = (
    "raise the window if the model's position scaling allows more (context_length=N; CLI: --context-length N; "
    "study: context_length in the model's table)"
)


def check_context_length(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidArgumentError(f"context_length must be a positive int (positions), got {value!r}")
    return int(value)


class TransformersModel:
    """A :class:`canopy_rs.protocol.Backend` for a transformers causal LM and one prompt.

    Args:
        model: a transformers causal LM (``AutoModelForCausalLM``-like: ``forward(input_ids, cache=...,
            attention_mask=..., position_ids=...)`` returning ``.logits``). It is put in eval mode; ``device``
            and ``dtype``, if given, move/cast it in place.
        tokenizer: needed for a string prompt (and ``chat=True``); optional for token-id prompts.
        prompt: a string, or a list of token ids used as is.
        chat: render the prompt with the tokenizer's chat template (user turn, generation prompt; Qwen3-style
            templates get ``enable_thinking=False``). Otherwise a string is tokenised raw (with the tokenizer's
            own special tokens, e.g. BOS).
        strategy: ``"auto"`` (the cheapest strategy that runs on this model: cascade, tree, per-row; a
            warning names why a cheaper one was rejected), ``"cascade"``, ``"tree"`` (each raises
            :class:`TreeAttentionUnsupported` naming the reason if it cannot run; dense tree attention on a
            sliding-window model runs while prompt + depth <= the window and raises beyond) or
            ``"per-row"``. The choice and its reason: ``.strategy``, ``.strategy_reason``.
        eos_token_ids: override the EOS ids (default: all of ``generation_config.eos_token_id``, else the
            config's, else the tokenizer's). Each id is its own outcome; ``[]`` means no EOS.
        vocab_size: override the vocabulary (default: the logits width); logits are cut to the first
            ``vocab_size`` columns.
        max_live_kv_tokens: cap on live KV tokens (cascade / tree: prompt + node columns; per-row: rows x
            their lengths). Exceeding it raises :class:`KVBudgetExceededError`.
        debug_logits: always return V-wide :class:`NextTokenLogits` (the Rust core applies the policy).
        policy_on: ``"auto"`` (the model's device on a GPU, the Rust core on the CPU), ``"device"`` (torch,
            on the model's device: :class:`PolicySupport`) or ``"host"`` (the Rust core, from V-wide logits).
        self_check: run the startup self-check for every strategy considered, the requested one included
            (:mod:`.self_check`: a 121-node branching tree against full recomputation; a strategy that deviates
            beyond the dtype's tolerance is skipped, and a model none passes raises
            :class:`~canopy_rs.errors.StrategyUnsupportedError`). ``False`` trusts the strategy unchecked.
        chat_template_kwargs: extra keyword arguments for ``apply_chat_template``.
        context_length: the context window checked against prompt + ``max_new_tokens`` (default: the model
            config's ``max_position_embeddings`` or equivalent; ``None`` when it declares none). Raise it only
            for a model whose position scaling allows more.

    After ``canopy_rs.exact(model, ...)``, :meth:`counters` holds ``tokens_forwarded`` (prompt included),
    ``model_calls``, ``rows_evaluated``, ``peak_live_kv_tokens``, ``prompt_tokens``,
    ``tokens_per_expanded_node`` (after the prompt), ``kv_bytes``, ``support_entries`` and ``compactions``.
    """

    #: Per-call memory the CPU sizing aims at (see :attr:`preferred_batch_size`).
    cpu_call_budget_bytes = 256 << 20

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        prompt: Union[str, Sequence[int], None] = None,
        chat: bool = False,
        device: Union[str, torch.device, None] = None,
        dtype: Optional[torch.dtype] = None,
        strategy: str = "auto",
        *,
        eos_token_ids: Optional[Sequence[int]] = None,
        vocab_size: Optional[int] = None,
        max_live_kv_tokens: Optional[int] = None,
        debug_logits: bool = False,
        policy_on: str = "auto",
        self_check: bool = True,
        chat_template_kwargs: Optional[dict] = None,
        context_length: Optional[int] = None,
    ) -> None:
        if prompt is None:
            raise ArgumentTypeError("TransformersModel needs a prompt: pass prompt= a string or a list of token ids")
        strategy = _STRATEGY_ALIASES.get(strategy, strategy)
        if strategy not in STRATEGIES:
            raise InvalidArgumentError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if max_live_kv_tokens is not None and int(max_live_kv_tokens) < 1:
            raise InvalidArgumentError(f"max_live_kv_tokens must be a positive int or None, got {max_live_kv_tokens!r}")
        if device is not None:
            model.to(device)
        if dtype is not None:
            model.to(dtype)
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        try:
            p = next(model.parameters())
            self.device, self.dtype = p.device, p.dtype
        except StopIteration:  # pragma: no cover
            self.device, self.dtype = torch.device("cpu"), torch.float32
        self.chat = bool(chat)
        self.prompt_ids: list[int] = render_prompt(model, tokenizer, prompt, self.chat, chat_template_kwargs)
        self._logits_width = resolve_vocab_size(model, None)
        self._vocab_size = resolve_vocab_size(model, vocab_size)
        self._eos = resolve_eos_token_ids(model, tokenizer, eos_token_ids, self._vocab_size)
        if max(self.prompt_ids) >= self._logits_width or min(self.prompt_ids) < 0:
            raise InvalidArgumentError(f"prompt token ids must be in [0, {self._logits_width}) (the model's logits width)")
        self.debug_logits = bool(debug_logits)
        if policy_on not in ("auto", "device", "host"):
            raise InvalidArgumentError(f"policy_on must be 'auto', 'device' or 'host', got {policy_on!r}")
        self.policy_on = policy_on
        # On the CPU the logits are host memory already: the Rust core's policy costs no transfer and is
        # faster than torch.topk there.
        self._host_policy = self.debug_logits or policy_on == "host" or (policy_on == "auto" and self.device.type == "cpu")
        self.max_live_kv_tokens = None if max_live_kv_tokens is None else int(max_live_kv_tokens)
        self.runner = ModelRunner(model)
        declared, context_field = declared_context_length(model)
        self.context_length = declared if context_length is None else check_context_length(context_length)
        self.context_source = (f"config.{context_field}" if context_field else None) if context_length is None else "context_length="
        if self.context_length is not None and self.prompt_len >= self.context_length:
            raise InvalidArgumentError(
                f"the prompt ({self.prompt_len} tokens{' after the chat template' if self.chat else ''}) fills the "
                f"model's context window ({self.context_length}, from {self.context_source}): shorten the prompt, or "
                + _WIDER_WINDOW
            )
        self.requested_strategy = strategy
        self.self_check_details: dict[str, str] = {}
        self.strategy, self.strategy_reason = self._choose_strategy(strategy, self_check)
        self.engine = self._make_engine(self.strategy)
        self.reset()

    # ------------------------------------------------------------------------------------------------
    def _mask_kind(self) -> str:
        impl = getattr(self.model.config, "_attn_implementation", None) or "eager"
        return "bool" if impl == "sdpa" else "float"

    def _self_check(self, engine: KVEngine, n_prompt: int = 4) -> Optional[str]:
        """``None`` if ``engine`` reproduces full recomputation on the self-check tree, else why not."""
        ok, detail = engine_self_check(engine, self.runner, self.device, self.dtype, self.prompt_ids, self._logits_width, n_prompt)
        self.self_check_details[engine.name] = detail
        return None if ok else f"startup self-check failed: {detail}"

    def _cascade_reason(self, self_check: bool) -> Optional[str]:
        """Why cascade tree attention cannot run on this model (``None``: it can)."""
        reason, _ = kv_layers_support(self.model)
        if reason is None and self_check:
            reason = self._self_check(CascadeEngine(self.runner, self.device, initial_capacity=4))
        return reason

    def _tree_reason(self, strategy: str, self_check: bool) -> Optional[str]:
        """Why dense-mask tree attention cannot run (``None``: it can; sets ``sliding_window``)."""
        reason, window = tree_attention_support(self.model)
        if reason is None and window is not None:
            if self.prompt_len >= window:
                reason = f"the prompt ({self.prompt_len} tokens) fills the sliding window ({window})"
            else:
                self.sliding_window = window
        if reason is None and self_check:
            # Within a sliding window the check's sequences (prompt window + depth) must fit the window.
            n_prompt = 4 if window is None else min(4, window - CHECK_DEPTH)
            if n_prompt < 1:
                reason = f"the sliding window ({window}) is too small for tree attention"
            else:
                engine = TreeAttentionEngine(
                    self.runner, self.device, self.dtype, self._mask_kind(), compact_min=1, compact_fraction=0.0,
                    sliding_window=self.sliding_window,
                )
                reason = self._self_check(engine, n_prompt)
        if reason is None and window is not None and strategy == "auto":
            reason = (
                f"sliding-window attention (window {window}): a flattened tree cache is exact only while prompt + "
                f"depth <= {window}; pass strategy='tree' to use tree attention within that limit"
            )
        return reason

    def _per_row_reason(self, self_check: bool) -> Optional[str]:
        """Why per-row caches cannot run (``None``: they can)."""
        if not self_check:
            return None
        return self._self_check(PerRowEngine(self.runner, self.device, compact_fraction=0.0, compact_min_rows=1))

    def _choose_strategy(self, strategy: str, self_check: bool) -> tuple[str, str]:
        """Cost order (per expanded node, P prompt tokens, depth d, L live tree columns): cascade reads
        P + d keys and copies nothing; dense tree attention reads P + L (L grows with the canopy); per-row
        copies and reads P + d per row and holds rows x (P + d) KV. So ``auto`` takes the first that passes
        its checks: cascade, tree, per-row. Every strategy, the requested one included, must pass the startup
        self-check (unless ``self_check=False``); a model none passes is refused."""
        self.sliding_window: Optional[int] = None
        outside = state_outside_cache_reason(self.model, self.runner.cache_kw)
        if outside is not None:
            raise StrategyUnsupportedError(
                f"no expansion strategy can branch {type(self.model).__name__}: {outside}. A plain logits_fn callable "
                "that recomputes every prefix without a cache always works (slow)"
            )
        rejected = []
        if strategy in ("auto", "cascade"):
            reason = self._cascade_reason(self_check)
            if reason is None:
                return "cascade", (
                    "requested" if strategy == "cascade" else
                    "auto: cascade tree attention runs on this model (cost per node O(prompt + depth), live KV = "
                    "prompt + live nodes: cheapest of the three)"
                )
            if strategy == "cascade":
                raise TreeAttentionUnsupported(f"cascade tree attention is not available for this model: {reason}")
            rejected.append(f"cascade: {reason}")
        if strategy in ("auto", "tree"):
            reason = self._tree_reason(strategy, self_check)
            if reason is None:
                if strategy == "tree":
                    return "tree", "requested"
                warnings.warn(
                    f"canopy_rs.TransformersModel: using dense-mask tree attention instead of cascade: {rejected[0]}",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return "tree", f"auto: {rejected[0]}"
            if strategy == "tree":
                raise TreeAttentionUnsupported(f"tree attention is not available for this model: {reason}")
            rejected.append(f"tree: {reason}")
        reason = self._per_row_reason(self_check)
        if reason is not None:
            rejected.append(f"per-row: {reason}")
            raise StrategyUnsupportedError(
                f"no expansion strategy is proven exact on {type(self.model).__name__}: " + "; ".join(rejected)
                + ". A plain logits_fn callable that recomputes every prefix without a cache always works (slow)"
            )
        if strategy == "per-row":
            return "per-row", "requested"
        why = "; ".join(rejected)
        warnings.warn(
            f"canopy_rs.TransformersModel: using per-row caches instead of tree attention: {why}",
            RuntimeWarning,
            stacklevel=3,
        )
        return "per-row", f"auto: {why}"

    def _make_engine(self, strategy: str) -> KVEngine:
        if strategy == "cascade":
            return CascadeEngine(self.runner, self.device, max_live_kv_tokens=self.max_live_kv_tokens)
        if strategy == "tree":
            return TreeAttentionEngine(
                self.runner,
                self.device,
                self.dtype,
                self._mask_kind(),
                max_live_kv_tokens=self.max_live_kv_tokens,
                sliding_window=self.sliding_window,
            )
        return PerRowEngine(self.runner, self.device, max_live_kv_tokens=self.max_live_kv_tokens)

    def with_prompt(self, prompt: Union[str, Sequence[int]], **overrides: Any) -> "TransformersModel":
        """A backend for another prompt on the same model (the strategy decision and self-check are reused
        unless ``strategy`` is overridden)."""
        kwargs: dict[str, Any] = dict(
            chat=self.chat,
            strategy=self.strategy,
            eos_token_ids=list(self._eos),
            vocab_size=self._vocab_size,
            max_live_kv_tokens=self.max_live_kv_tokens,
            debug_logits=self.debug_logits,
            policy_on=self.policy_on,
            self_check=False,
            context_length=self.context_length if self.context_source == "context_length=" else None,
        )
        kwargs.update(overrides)
        return TransformersModel(self.model, self.tokenizer, prompt, **kwargs)

    def check_max_new_tokens(self, max_new_tokens: int) -> None:
        """Refuse canopies that would run past the context window (the drivers call this before any
        expansion): prompt + ``max_new_tokens`` positions must fit."""
        if self.context_length is None:
            return
        need = self.prompt_len + int(max_new_tokens)
        if need > self.context_length:
            raise InvalidArgumentError(
                f"the prompt ({self.prompt_len} tokens{' after the chat template' if self.chat else ''}) plus "
                f"max_new_tokens={int(max_new_tokens)} needs {need} positions, beyond the model's context window "
                f"({self.context_length}, from {self.context_source}): use max_new_tokens <= "
                f"{self.context_length - self.prompt_len}, shorten the prompt, or " + _WIDER_WINDOW
            )

    # ------------------------------------------------------------------------------------------------
    # Backend protocol
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    def reset(self) -> None:
        self.engine.reset()
        self.runner.tokens_forwarded = 0
        self.runner.model_calls = 0
        self._rows = 0
        self._support_entries = 0

    def expand(self, batch: NodeBatch, policy: Any) -> Union[PolicySupport, NextTokenLogits]:
        ids = np.asarray(batch.node_ids, dtype=np.int64)
        parents = np.asarray(batch.parent_ids, dtype=np.int64)
        tokens = np.asarray(batch.tokens, dtype=np.int64)
        depths = np.asarray(batch.depths, dtype=np.int64)
        B = len(ids)
        if B == 0:
            raise InvalidArgumentError("expand() got an empty batch: pass at least one node")
        is_root = parents < 0
        gen = tokens[~is_root]
        if (gen < 0).any() or (gen >= self._logits_width).any():
            raise InvalidArgumentError(f"node tokens must be in [0, {self._logits_width})")
        with torch.inference_mode():
            if is_root.any():
                if is_root.sum() > 1:
                    raise InvalidArgumentError("a batch can hold at most one root (parent < 0): expand the root alone or with its children")
                r = int(np.flatnonzero(is_root)[0])
                root_logits = self.engine.prefill(int(ids[r]), self.prompt_ids)
                if B == 1:
                    logits = root_logits
                else:
                    rest = np.flatnonzero(~is_root)
                    other = self.engine.expand(ids[rest], parents[rest], tokens[rest], depths[rest])
                    logits = torch.empty((B, root_logits.shape[-1]), dtype=other.dtype, device=other.device)
                    logits[r] = root_logits[0].to(other.dtype)
                    logits[torch.as_tensor(rest).to(other.device)] = other
            else:
                logits = self.engine.expand(ids, parents, tokens, depths)
            if self._vocab_size != logits.shape[-1]:
                logits = logits[:, : self._vocab_size]
            self._rows += B
            if self._host_policy:
                # float32 (the compute dtype of reduced-precision models' head), float64 kept as it is.
                host = logits if logits.dtype == torch.float64 else logits.float()
                return NextTokenLogits(np.ascontiguousarray(host.cpu().numpy()))
            # The step's one device -> host transfer (no other synchronisation with a top-k policy).
            out = PolicySupport(*policy_support_numpy(logits, policy))
        self._support_entries += int(out.tokens.shape[0])
        return out

    def release(self, node_ids: np.ndarray) -> None:
        with torch.inference_mode():
            self.engine.release(np.asarray(node_ids, dtype=np.int64).tolist())

    def counters(self) -> dict[str, float]:
        tokens = self.runner.tokens_forwarded
        rows = self._rows
        prompt = self.prompt_len if rows else 0
        return {
            "tokens_forwarded": tokens,
            "model_calls": self.runner.model_calls,
            "rows_evaluated": rows,
            "peak_live_kv_tokens": self.engine.peak_live_kv_tokens,
            "live_kv_tokens": self.engine.live_kv_tokens,
            "kv_bytes": self.kv_bytes(),
            "prompt_tokens": prompt,
            "tokens_per_expanded_node": (tokens - prompt) / (rows - 1) if rows > 1 else 0.0,
            "support_entries": self._support_entries,
            "compactions": self.engine.compactions,
        }

    def describe(self) -> dict[str, str]:
        """The numerics and strategy every result records (see :mod:`canopy_rs.protocol`)."""
        head = self.runner.head
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "logits_dtype": "float32" if head is not None and head.active else str(self.dtype).removeprefix("torch."),
            "strategy": self.strategy,
        }

    # --- call sizing (read by the drivers when no batch_size is given; see canopy_rs.protocol) ---------
    def kv_bytes_per_token(self) -> int:
        """KV bytes one token occupies across all layers (keys + values, the model's dtype)."""
        cfg = text_config(self.model)
        heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or int(getattr(cfg, "hidden_size")) // heads)
        layers = int(getattr(cfg, "num_hidden_layers"))
        return 2 * layers * kv_heads * head_dim * torch.finfo(self.dtype).bits // 8

    @property
    def memory_per_row_bytes(self) -> int:
        """Device memory one more row of an ``expand()`` call needs: its float32 logits (with the policy's
        temporaries), one layer's attention scores over prompt + depth, and the live KV the strategy adds
        per expanded node (one column for cascade / tree; the whole prefix for per-row)."""
        cfg = text_config(self.model)
        heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
        width = int(getattr(cfg, "intermediate_size", 0) or 4 * int(getattr(cfg, "hidden_size", 0)))
        depth = 16  # a typical canopy depth; attention and per-row KV grow with it only slowly
        logits = 3 * 4 * self._logits_width
        attention = 2 * 4 * heads * (self.prompt_len + depth)
        activations = 4 * width * torch.finfo(self.dtype).bits // 8
        kv = self.kv_bytes_per_token() * self.engine.kv_tokens_per_row(self.prompt_len, depth)
        return int(logits + attention + activations + kv)

    @property
    def preferred_batch_size(self) -> int:
        """Rows per ``expand()`` call: as wide as a per-call memory budget allows (a GPU needs wide calls to
        be busy: up to 4096 rows, within a quarter of its free memory; on the CPU throughput is flat past a
        few hundred rows, so up to 1024 rows within 256 MiB)."""
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget, cap = free // 4, 4096
        else:
            budget, cap = self.cpu_call_budget_bytes, 1024
        return int(min(cap, max(16, budget // max(1, self.memory_per_row_bytes))))

    def kv_bytes(self) -> int:
        """Bytes held by the live KV storage (allocated arena / dead columns and rows until reuse or
        compaction included)."""
        return self.engine.kv_bytes()

    def __repr__(self) -> str:
        return (
            f"TransformersModel({type(self.model).__name__}, strategy={self.strategy!r}, prompt_len={self.prompt_len}, "
            f"vocab_size={self._vocab_size}, eos_token_ids={list(self._eos)}, device={self.device}, dtype={self.dtype})"
        )
