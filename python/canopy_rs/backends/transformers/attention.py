"""Cascade tree attention: an attention function registered with transformers' ``AttentionInterface``.

Expanding F canopy nodes is one forward of F query tokens (one per node). Each query attends

* the prompt, densely: one batched product of all ``g*F`` queries of a KV head with the ``P`` prompt keys
  (stored once; every query sees the whole prompt, so there is no mask), and
* its own ancestors: at most ``T`` (depth) columns gathered by index from an arena that holds one KV column per
  live expanded node, the query's own new column included;

and the two partial softmaxes are combined exactly through their log-sum-exps::

    out = exp(lse_p - lse) * out_p + exp(lse_a - lse) * out_a,   lse = logaddexp(lse_p, lse_a).

Cost per node O(P + depth) and memory P + live nodes, whatever the canopy's size or expansion order.

Every model whose attention modules call ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation,
...)`` (Llama, Qwen2/3, Mistral, Gemma 3, GPT-2, ...) runs it unchanged: :func:`cascade_forward` switches the
model's attention implementation to ``"canopy_cascade"`` for one forward and passes the step's indices
through the forward's keyword arguments (``canopy_cascade=``), which transformers hands to the attention
function. The name has no mask function registered, so transformers builds no mask for it: visibility is
defined by the indices alone. Sliding-window layers stay exact: a key is visible when its position is inside
the query's window (``key_pos > query_pos - window``, transformers' rule), checked on the gathered set.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from transformers import AttentionInterface

from canopy_rs.errors import EngineStateError, InvalidArgumentError

__all__ = ["CASCADE_ATTENTION", "CascadeKV", "CascadeStep", "cascade_attention_forward", "cascade_forward"]

CASCADE_ATTENTION = "canopy_cascade"
# Keyword under which the step travels through the model's forward to the attention function.
STEP_KWARG = "canopy_cascade"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics are kept in float32 for half types (as transformers' eager path does)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class CascadeKV:
    """Per-layer KV storage: the prompt's keys/values ``[kv_heads, P, head_dim]`` (stored once) and an arena
    ``[capacity, kv_heads, head_dim]`` with one column (slot) per live expanded node. The arena grows
    geometrically (:meth:`grow`); freed slots are reused, so it never needs compacting."""

    def __init__(self, prompt_keys: list, prompt_values: list, capacity: int) -> None:
        self.prompt_k = [k.contiguous() for k in prompt_keys]
        self.prompt_v = [v.contiguous() for v in prompt_values]
        self.arena_k = [torch.empty((capacity, *k.shape[:1], k.shape[-1]), dtype=k.dtype, device=k.device) for k in self.prompt_k]
        self.arena_v = [torch.empty((capacity, *v.shape[:1], v.shape[-1]), dtype=v.dtype, device=v.device) for v in self.prompt_v]
        self.capacity = int(capacity)

    def grow(self, capacity: int) -> None:
        if capacity <= self.capacity:
            return
        for arenas in (self.arena_k, self.arena_v):
            for i, a in enumerate(arenas):
                new = torch.empty((capacity, *a.shape[1:]), dtype=a.dtype, device=a.device)
                new[: self.capacity].copy_(a)
                arenas[i] = new
        self.capacity = int(capacity)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.prompt_k, *self.prompt_v, *self.arena_k, *self.arena_v))


@dataclass
class CascadeStep:
    """One forward's indices (all on the model's device). ``slots[i]`` is the arena column query ``i`` writes;
    ``anc[i, j]`` the column of its ancestor at depth ``j + 1`` (itself at ``depth - 1``), valid where
    ``valid[i, j]``; ``positions[i] = P + depth_i - 1``."""

    kv: CascadeKV
    slots: torch.Tensor  # int64 [F]
    anc: torch.Tensor  # int64 [F, D], padding entries point at a valid slot and are masked
    valid: torch.Tensor  # bool [F, D]
    positions: torch.Tensor  # int64 [F]
    prompt_len: int
    calls: int = 0  # attention-function invocations (the self-check's proof the registry is used)


def _prompt_part_matmul(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, softcap: Optional[float], keep: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [kvH, M, d]`` against ``k, v [kvH, P, d]``: normalised output ``[kvH, M, d]`` and the log-sum-exp of
    the scores ``[kvH, M]`` (``-inf`` where ``keep [M, P]`` hides every key)."""
    acc = _acc_dtype(q.dtype)
    s = torch.matmul(q, k.transpose(1, 2)).to(acc) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return torch.matmul(p.to(v.dtype), v), lse


def _prompt_part_fused_cpu(q, k, v, scaling, softcap, keep):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q[None], k[None], v[None], 0.0, False, scale=scaling)[:2]
    return out[0], lse[0]


_FUSED: dict = {}


def _prompt_kernel(q: torch.Tensor) -> Callable:
    """The fastest prompt-part kernel that returns the log-sum-exp and agrees with the matmul reference on
    this device and dtype (checked once on random data; the matmul is the fallback)."""
    key = (q.device.type, q.dtype)
    if key not in _FUSED:
        _FUSED[key] = _prompt_part_matmul
        if q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and hasattr(
            torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"
        ):
            try:
                g = torch.Generator(device="cpu").manual_seed(0)
                a, b, c = (torch.randn((2, n, 64), generator=g).to(q.dtype) for n in (5, 37, 37))
                o1, l1 = _prompt_part_fused_cpu(a, b, c, 0.125, None, None)
                o2, l2 = _prompt_part_matmul(a, b, c, 0.125, None, None)
                tol = 1e-5 if q.dtype == torch.float32 else 2e-2
                if (o1.float() - o2.float()).abs().max() <= tol and (l1.float() - l2.float()).abs().max() <= tol:
                    _FUSED[key] = _prompt_part_fused_cpu
            except Exception:  # pragma: no cover - a torch build without the CPU flash kernel
                pass
    return _FUSED[key]


def cascade_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature. ``query [1, H, F, d]``, ``key/value [1, kvH, F, d]`` are
    the F new tokens (no cache is passed to the model: their columns are written into the arena here).
    Returns ``([1, F, H, d], None)``."""
    step: Optional[CascadeStep] = kwargs.get(STEP_KWARG)
    if step is None:
        raise EngineStateError(
            f"attn_implementation={CASCADE_ATTENTION!r} runs only inside canopy_rs' cascade expansion "
            "(it needs the step's ancestor indices); load the model with 'sdpa' or 'eager' for other uses"
        )
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise NotImplementedError("cascade attention does not support attention sinks")
    if query.shape[0] != 1:
        raise InvalidArgumentError(f"cascade attention expects one flattened row (batch size 1), got {query.shape[0]}")
    step.calls += 1
    li = module.layer_idx
    kv = step.kv
    _, H, F, d = query.shape
    Ka, Va = kv.arena_k[li], kv.arena_v[li]
    kvH = Ka.shape[1]
    g = H // kvH
    if scaling is None:
        scaling = d**-0.5
    # Store the new columns (F rows of [kvH, d]) at their slots.
    Ka.index_copy_(0, step.slots, key[0].transpose(0, 1).to(Ka.dtype))
    Va.index_copy_(0, step.slots, value[0].transpose(0, 1).to(Va.dtype))
    acc = _acc_dtype(query.dtype)
    q = query[0]  # [H, F, d]; head h = kv head h // g (transformers' repeat_kv layout)

    # Prompt part: every query of a KV head against its P prompt keys in one product.
    Kp, Vp = kv.prompt_k[li], kv.prompt_v[li]
    P = Kp.shape[1]
    keep_p = None
    if sliding_window is not None:
        qpos = step.positions.repeat(g)  # [g*F], matching q.reshape(kvH, g*F, d)
        keep_p = torch.arange(P, device=q.device)[None, :] > (qpos[:, None] - sliding_window)
    qp = q.reshape(kvH, g * F, d)
    if keep_p is None and softcap is None:
        out_p, lse_p = _prompt_kernel(qp)(qp, Kp, Vp, scaling, None, None)
    else:
        out_p, lse_p = _prompt_part_matmul(qp, Kp, Vp, scaling, softcap, keep_p)
    out_p = out_p.reshape(kvH, g, F, d).permute(2, 0, 1, 3).to(acc)  # [F, kvH, g, d]
    lse_p = lse_p.reshape(kvH, g, F).permute(2, 0, 1).to(acc)  # [F, kvH, g]

    # Ancestor part: each query against its own gathered columns [D].
    Kg = Ka[step.anc]  # [F, D, kvH, d]
    Vg = Va[step.anc]
    qa = q.reshape(kvH, g, F, d).permute(2, 0, 1, 3)  # [F, kvH, g, d]
    s = torch.matmul(qa, Kg.permute(0, 2, 3, 1)).to(acc) * scaling  # [F, kvH, g, D]
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    keep_a = step.valid
    if sliding_window is not None:
        D = step.anc.shape[1]
        kpos = step.prompt_len + torch.arange(D, device=q.device)
        keep_a = keep_a & (kpos[None, :] > (step.positions[:, None] - sliding_window))
    s = s.masked_fill(~keep_a[:, None, None, :], float("-inf"))
    lse_a = torch.logsumexp(s, dim=-1)  # finite: a query always sees itself
    p = torch.exp(s - lse_a[..., None])
    out_a = torch.matmul(p.to(Vg.dtype), Vg.permute(0, 2, 1, 3)).to(acc)  # [F, kvH, g, d]

    lse = torch.logaddexp(lse_p, lse_a)
    w_p = torch.exp(lse_p - lse)[..., None]
    w_a = torch.exp(lse_a - lse)[..., None]
    # A prompt part hidden entirely by the window has weight 0 (and a 0/0 output).
    out = torch.where(w_p > 0, w_p * out_p, 0.0) + w_a * out_a
    return out.reshape(1, F, H, d).to(query.dtype), None


AttentionInterface.register(CASCADE_ATTENTION, cascade_attention_forward)


def _configs(model: Any) -> list:
    seen: dict[int, Any] = {}
    for m in (model, *model.modules()):
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


@contextlib.contextmanager
def cascade_forward(model: Any) -> Iterator[None]:
    """Within the block, every attention module of ``model`` that dispatches through transformers'
    ``AttentionInterface`` uses :func:`cascade_attention_forward`; the previous implementation is restored
    on exit (the model is shared with the caller)."""
    configs = _configs(model)
    old = [cfg._attn_implementation_internal for cfg in configs]
    try:
        for cfg in configs:
            cfg._attn_implementation_internal = CASCADE_ATTENTION
        yield
    finally:
        for cfg, o in zip(configs, old):
            cfg._attn_implementation_internal = o
