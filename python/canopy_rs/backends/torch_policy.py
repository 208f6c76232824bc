"""The decoding policy applied on the model's device (torch).

This is the torch twin of the Rust reference ``canopy_rs._core.policy_support`` and follows the same rules:

* ``z = logits / temperature`` (in float64);
* top-k keeps every token whose ``z`` is >= the k-th largest ``z`` (ties at the threshold are kept, so a row can
  keep more than k tokens);
* the kept tokens are sorted by ``z`` descending, ties by token id ascending; probabilities are renormalised
  over the kept set; top-p keeps the smallest prefix whose cumulative probability reaches
  ``top_p * (1 - 1e-12)`` (the crossing token is kept, the first token is always kept, ``top_p >= 1`` keeps
  all);
* the result is renormalised.

Tokens with a ``-inf`` logit, or whose float64 probability underflows to 0, are not part of the support. The top-k *selection*
runs on the raw logits in their own dtype (dividing by a positive temperature preserves the order and the
ties); only the kept logits are gathered and converted to float64, so the log-probabilities match the f64
Rust path to about 1e-12 when the model computes float32 logits. Only ``k``-wide rows (the support) leave the
device.
"""

from __future__ import annotations

from typing import Any, Tuple

import numpy as np
import torch

from canopy_rs.errors import BackendOutputError, InvalidArgumentError

__all__ = ["policy_support_torch", "policy_support_numpy", "TOP_P_SLACK"]

#: Relative slack on the top-p threshold, identical to the Rust core's.
TOP_P_SLACK = 1e-12
#: Extra top-k candidates fetched to catch ties at the k-th value without a V-wide pass.
TOP_K_TIE_SLACK = 16


def _policy_params(policy: Any) -> Tuple[float, int | None, float]:
    temperature = float(policy.temperature)
    top_k = policy.top_k
    top_p = float(policy.top_p)
    if not (temperature > 0.0) or not np.isfinite(temperature):
        raise InvalidArgumentError(f"temperature must be a positive finite number, got {temperature}")
    if top_k is not None:
        top_k = int(top_k)
        if top_k < 1:
            raise InvalidArgumentError(f"top_k must be >= 1 or None, got {top_k}")
    if not (top_p > 0.0):
        raise InvalidArgumentError(f"top_p must be in (0, 1], got {top_p}")
    return temperature, top_k, top_p


def _masked_logsumexp(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """logsumexp over the valid entries of each row (every row has at least one valid entry)."""
    neg_inf = torch.tensor(float("-inf"), dtype=x.dtype, device=x.device)
    return torch.logsumexp(torch.where(valid, x, neg_inf), dim=1, keepdim=True)


@torch.no_grad()
def policy_support_torch(
    logits: torch.Tensor, policy: Any
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply ``policy`` to each row of ``logits`` ``[B, V]`` on their device.

    Returns torch tensors on the same device ``(offsets [B+1] int64, tokens [nnz] int64, logprobs [nnz]
    float64)`` in CSR form: row ``i`` owns ``tokens[offsets[i]:offsets[i+1]]`` in descending probability order
    (ties by token id). ``policy`` is any object with ``temperature``, ``top_k`` and ``top_p`` attributes
    (e.g. ``canopy_rs.Policy``).
    """
    if logits.ndim != 2:
        raise InvalidArgumentError(f"logits must be 2-D [B, V], got shape {tuple(logits.shape)}")
    temperature, top_k, top_p = _policy_params(policy)
    x = logits
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    B, V = x.shape
    device = x.device
    if B == 0:
        z = torch.zeros(0, dtype=torch.int64, device=device)
        return torch.zeros(1, dtype=torch.int64, device=device), z, z.to(torch.float64)
    # One reduction (one device sync) validates every row: NaN propagates through amax, +inf and an all -inf
    # row make it non-finite.
    if not bool(torch.isfinite(x.amax(dim=1)).all()):
        if torch.isnan(x).any():
            raise BackendOutputError("logits contain NaN; check the model's numerics (dtype overflow?)")
        if torch.isposinf(x).any():
            raise BackendOutputError("logits contain +inf; logits must be finite or -inf (masked)")
        raise BackendOutputError("a logits row is entirely -inf: the policy has an empty support")

    width = min(V, top_k + TOP_K_TIE_SLACK) if top_k is not None and top_k < V else V
    ids, logp, valid, overflow = _dense_support(x, temperature, top_k, top_p, width)
    if bool(overflow.any()):
        # A row's ties at the k-th value overflow the slack: widen to every token >= the k-th value (rare:
        # only then a V-wide count).
        kth = torch.topk(x, top_k, dim=1).values[:, -1:]
        width = int((x >= kth).sum(dim=1).max().item())
        ids, logp, valid, _ = _dense_support(x, temperature, top_k, top_p, width)
    counts = valid.sum(dim=1)
    offsets = torch.zeros(B + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(counts, dim=0)
    tokens = ids[valid].to(torch.int64)
    logprobs = logp[valid]
    return offsets, tokens, logprobs


def _dense_support(
    x: torch.Tensor, temperature: float, top_k: "int | None", top_p: float, width: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The policy on ``width`` candidates per row, with no host synchronisation: ``(ids, logp, valid)``
    ``[B, width]`` in support order (descending probability, ties by token id) and ``overflow [B]``, set
    where ties at the k-th value may continue past the candidates (the row then needs a wider pass)."""
    B, V = x.shape
    device = x.device
    if top_k is not None and top_k < V:
        # The k largest plus a slack for ties at the k-th value.
        cand_vals, cand_ids = torch.topk(x, width, dim=1, largest=True, sorted=True)
        kth = cand_vals[:, top_k - 1 : top_k]
        if width < V:
            overflow = cand_vals[:, -1] >= kth[:, 0]
        else:
            overflow = torch.zeros(B, dtype=torch.bool, device=device)
        # topk's tie order is unspecified: sort by token id first, then stably by value.
        cand_ids, perm = torch.sort(cand_ids, dim=1)
        cand_vals = cand_vals.gather(1, perm)
        vals, perm = torch.sort(cand_vals, dim=1, descending=True, stable=True)
        ids = cand_ids.gather(1, perm)
        valid = vals >= kth
    else:
        # Whole vocabulary; a stable sort of the id-ordered row breaks ties by token id.
        vals, ids = torch.sort(x, dim=1, descending=True, stable=True)
        valid = torch.ones_like(vals, dtype=torch.bool)
        overflow = torch.zeros(B, dtype=torch.bool, device=device)
    valid &= torch.isfinite(vals)

    z = vals.to(torch.float64) / temperature
    logp = z - _masked_logsumexp(z, valid)

    if top_p < 1.0:
        prob = torch.where(valid, torch.exp(logp), torch.zeros((), dtype=torch.float64, device=device))
        # Mass strictly before each token (exclusive prefix sums).
        before = torch.cat(
            [torch.zeros((B, 1), dtype=torch.float64, device=device), torch.cumsum(prob[:, :-1], dim=1)],
            dim=1,
        )
        keep = before < top_p * (1.0 - TOP_P_SLACK)
        keep[:, 0] = True
        valid &= keep
        logp = logp - _masked_logsumexp(logp, valid)

    # As in the Rust core: a token whose f64 probability underflows to 0 is not in the support.
    valid &= torch.exp(logp) > 0.0
    return ids, logp, valid, overflow


@torch.no_grad()
def policy_support_numpy(logits: Any, policy: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`policy_support_torch` returning host numpy arrays ``(offsets int64, tokens int64, logprobs
    float64)``. Accepts a numpy array or a torch tensor.

    With a top-k below the vocabulary this is one device -> host transfer and no other synchronisation:
    the k + slack candidates of every row, their log-probabilities (NaN outside the support) and two flags
    per row travel packed in one float64 array, and the CSR is built on the host. The flags send the rare
    row whose ties overflow the slack, or a malformed row, through :func:`policy_support_torch`."""
    t = logits if isinstance(logits, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(logits))
    if t.ndim != 2:
        raise InvalidArgumentError(f"logits must be 2-D [B, V], got shape {tuple(t.shape)}")
    temperature, top_k, top_p = _policy_params(policy)
    x = t if t.dtype in (torch.float32, torch.float64) else t.float()
    B, V = x.shape
    if B == 0 or top_k is None or top_k >= V:
        # The support may be the whole vocabulary: build the CSR on the device.
        offsets, tokens, logprobs = policy_support_torch(x, policy)
        return (
            offsets.cpu().numpy().astype(np.int64, copy=False),
            tokens.cpu().numpy().astype(np.int64, copy=False),
            logprobs.cpu().numpy().astype(np.float64, copy=False),
        )
    width = min(V, top_k + TOP_K_TIE_SLACK)
    ids, logp, valid, overflow = _dense_support(x, temperature, top_k, top_p, width)
    bad = ~torch.isfinite(x.amax(dim=1))
    nan = torch.full((), float("nan"), dtype=torch.float64, device=x.device)
    packed = torch.cat(
        [torch.where(valid, logp, nan), ids.to(torch.float64), bad[:, None].to(torch.float64), overflow[:, None].to(torch.float64)],
        dim=1,
    ).cpu().numpy()
    lp, tok = packed[:, :width], packed[:, width : 2 * width].astype(np.int64)
    if packed[:, 2 * width].any():
        policy_support_torch(x, policy)  # raises the error that names what is wrong
    redo = np.flatnonzero(packed[:, 2 * width + 1])
    keep = ~np.isnan(lp)
    counts = keep.sum(axis=1)
    tokens_rows = [tok[i][keep[i]] for i in range(B)] if len(redo) else None
    if tokens_rows is None:
        offsets = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return offsets, tok[keep], lp[keep]
    logp_rows = [lp[i][keep[i]] for i in range(B)]
    o, tt, ll = policy_support_torch(x[torch.as_tensor(redo, device=x.device)], policy)
    o, tt, ll = o.cpu().numpy(), tt.cpu().numpy(), ll.cpu().numpy()
    for j, i in enumerate(redo.tolist()):
        tokens_rows[i], logp_rows[i] = tt[o[j] : o[j + 1]], ll[o[j] : o[j + 1]]
    offsets = np.zeros(B + 1, dtype=np.int64)
    np.cumsum([len(r) for r in tokens_rows], out=offsets[1:])
    return offsets, np.concatenate(tokens_rows).astype(np.int64), np.concatenate(logp_rows).astype(np.float64)
