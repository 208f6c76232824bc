"""canopy_rs.testing.check_backend: every backend in the package passes it, and each rule it checks catches a
backend that breaks it."""

from __future__ import annotations

import numpy as np
import pytest

import canopy_rs
from canopy_rs.backends.cached import CachedModel
from canopy_rs.protocol import NextTokenLogits, PolicySupport
from canopy_rs.testing import check_backend

from reference import RandomModel

V, EOS = 8, (0, 1)


def _fn(seed=0):
    return RandomModel(V, seed)


class ToyKV:
    """A stateful backend, the shape of a KV-cache one: a node's state is a hash of its parent's state and its
    token, kept until released; logits come from the state, never from the prefix."""

    vocab_size = V
    eos_token_ids = EOS

    def __init__(self):
        self.w = np.random.default_rng(1).normal(size=(64, V))
        self.reset()

    def reset(self):
        self.state, self.calls, self.rows = {}, 0, 0

    def _state_of(self, parent, token):
        return 7 if parent < 0 else hash((self.state[parent], token)) % 64

    def expand(self, batch, policy):
        st = [self._state_of(p, t) for p, t in zip(batch.parent_ids.tolist(), batch.tokens.tolist())]
        for i, s in zip(batch.node_ids.tolist(), st):
            self.state[i] = s
        self.calls += 1
        self.rows += len(batch)
        return NextTokenLogits(self.w[st])

    def release(self, node_ids):
        for i in np.asarray(node_ids).tolist():
            del self.state[i]

    def counters(self):
        return {"model_calls": self.calls, "rows_evaluated": self.rows}


@pytest.mark.parametrize("make", [
    lambda: canopy_rs.CallableModel(_fn(), V, EOS),
    # Ties everywhere (three logit levels) and -inf entries: the core's own top-k / top-p rules.
    lambda: canopy_rs.CallableModel(RandomModel(V, 3, levels=3, mask_prob=0.3), V, EOS),
    lambda: CachedModel(_fn(), V, EOS),
    ToyKV,
], ids=["CallableModel", "CallableModel-ties", "CachedModel", "ToyKV"])
def test_package_backends_conform(make):
    summary = check_backend(make())
    assert summary["nodes"] > 5 and summary["depth"] == 3


def _transformers_cases():
    try:
        from canopy_rs.backends.transformers import STRATEGIES
    except ImportError:  # torch / transformers not installed
        return []
    return [(f, s) for f in ("llama", "qwen2", "gpt2") for s in STRATEGIES if s != "auto"]


@pytest.mark.parametrize("family, strategy", _transformers_cases())
def test_transformers_backend_conforms_for_every_strategy(family, strategy):
    """Every strategy the backend offers, on three model families, against a no-cache recomputation."""
    from test_transformers_backend import PROMPT, model_for, naive_logits_fn

    from canopy_rs.backends.transformers import TransformersModel

    m = model_for(family, "sdpa")
    backend = TransformersModel(m, None, prompt=PROMPT, strategy=strategy)
    check_backend(backend, reference=naive_logits_fn(m, PROMPT), atol=1e-6)


def test_reference_comparison_passes_for_the_same_model():
    check_backend(canopy_rs.CallableModel(_fn(), V, EOS), reference=_fn())
    with pytest.raises(AssertionError, match="reference"):
        check_backend(canopy_rs.CallableModel(_fn(), V, EOS), reference=_fn(seed=5))


# --- each rule catches a backend that breaks it ------------------------------------------------------


class SortedRows(ToyKV):
    """Answers in ascending id order instead of the batch's order."""

    def expand(self, batch, policy):
        out = super().expand(batch, policy)
        return NextTokenLogits(out.logits[np.argsort(batch.node_ids, kind="stable")])


class StickyCounters(ToyKV):
    def reset(self):
        self.state = {}
        self.calls, self.rows = getattr(self, "calls", 0), getattr(self, "rows", 0)


class CallsAsRows(ToyKV):
    def counters(self):
        return {"model_calls": self.calls, "rows_evaluated": self.calls}


class ForgetsEverythingOnRelease(ToyKV):
    def release(self, node_ids):
        root = min(self.state) if self.state else None
        self.state = {root: self.state[root]} if root is not None and root not in set(node_ids.tolist()) else {}


class ContiguousIds(ToyKV):
    """Assumes ids 0, 1, 2, ... (a preallocated table)."""

    def expand(self, batch, policy):
        if batch.node_ids.max() >= 16:
            raise IndexError(f"node id {batch.node_ids.max()} past the table")
        return super().expand(batch, policy)


class OwnPolicy(ToyKV):
    """Applies the policy itself (PolicySupport), with a deliberate deviation ``mode``; its logits have ties
    at the 2nd/3rd place, so a strict top-k differs from the rule."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.w = np.tile(np.array([0.5, -0.2, 2.0, 1.0, 1.0, 1.0, 0.0, -1.0]), (64, 1)) + \
            np.random.default_rng(2).normal(size=(64, 1))  # one shift per state keeps the ties

    def expand(self, batch, policy):
        logits = super().expand(batch, policy).logits / policy.temperature
        offs, toks, lps = [0], [], []
        for row in logits:
            order = np.lexsort((np.arange(V), -row))
            keep = order
            if policy.top_k is not None:
                kth = row[order[min(policy.top_k, V) - 1]]
                keep = order[: policy.top_k] if self.mode == "strict-top-k" else order[row[order] >= kth]
            p = np.exp(row[keep] - row[keep].max())
            p /= p.sum()
            if policy.top_p < 1.0:
                cum = np.cumsum(p)
                n = int(np.searchsorted(cum, policy.top_p * (1 - 1e-12))) + 1
                if self.mode == "top-p-drops-crossing":
                    n = max(1, n - 1)
                keep, p = keep[:n], p[:n] / p[:n].sum()
            idx = np.argsort(keep)
            toks.append(keep[idx])
            lps.append(np.log(p[idx]))
            offs.append(offs[-1] + len(keep))
        return PolicySupport(np.array(offs), np.concatenate(toks), np.concatenate(lps))


@pytest.mark.parametrize("backend, rule", [
    (SortedRows(), "rows, batches and release"),
    (StickyCounters(), "reset"),
    (CallsAsRows(), "counters"),
    (ForgetsEverythingOnRelease(), "expand"),
    (ContiguousIds(), "expand"),
    (OwnPolicy("strict-top-k"), "support rules"),
    (OwnPolicy("top-p-drops-crossing"), "support rules"),
], ids=["row-order", "reset", "counters", "release", "ids", "top-k-ties", "top-p"])
def test_each_rule_catches_a_broken_backend(backend, rule):
    with pytest.raises(AssertionError, match=f"check_backend\\({type(backend).__name__}\\): {rule}"):
        check_backend(backend)


def test_the_correct_own_policy_backend_passes():
    check_backend(OwnPolicy("correct"))


def test_attributes_are_checked():
    class NoEos(ToyKV):
        eos_token_ids = ()

    with pytest.raises(AssertionError, match="attributes: NoEos.eos_token_ids must name at least one"):
        check_backend(NoEos())
    with pytest.raises(AssertionError, match="lacks members"):
        check_backend(object())

    class OddDescribe(ToyKV):
        def describe(self):
            return {"dtype": 32}

    with pytest.raises(AssertionError, match=r"attributes: describe\(\) must return a dict of strings"):
        check_backend(OddDescribe())
