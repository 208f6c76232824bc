"""Shared helpers for the sampler / estimator tests: small models and a protocol-checking backend."""

from __future__ import annotations

import math

import numpy as np

from canopy_rs.backends import CallableModel
from canopy_rs.testing import random_logits_fn


class CheckingBackend:
    """Wraps a CallableModel and asserts the protocol rules a driver must keep (protocol.py): ids unique
    per run, the root first and alone in its batch, every parent expanded earlier and not yet released, releases only of expanded
    nodes, never twice; ``prefixes()`` consistent with the parent chain."""

    def __init__(self, fn, vocab_size, eos_token_ids):
        self.inner = CallableModel(fn, vocab_size, eos_token_ids)
        self.reset()

    @property
    def vocab_size(self):
        return self.inner.vocab_size

    @property
    def eos_token_ids(self):
        return self.inner.eos_token_ids

    def reset(self):
        self.inner.reset()
        self.expanded = {}  # id -> prefix
        self.released = set()
        self.resets = getattr(self, "resets", 0) + 1

    def expand(self, batch, policy):
        ids = batch.node_ids.tolist()
        assert len(set(ids)) == len(ids), "ids in a batch must be distinct"
        prefixes = batch.prefixes()
        for nid, par, tok, dep, pre in zip(ids, batch.parent_ids.tolist(), batch.tokens.tolist(),
                                           batch.depths.tolist(), prefixes):
            assert nid not in self.expanded, f"node {nid} expanded twice"
            if par == -1:
                assert tok == -1 and dep == 0 and pre == [], "bad root"
                assert len(ids) == 1 and not self.expanded, "the root must be alone in the run's first batch"
            else:
                assert par in self.expanded, f"parent {par} of {nid} was never expanded"
                assert par not in self.released, f"parent {par} of {nid} was already released"
                assert pre == self.expanded[par] + [tok], f"prefix of {nid} disagrees with its parent chain"
                assert dep == len(pre)
            self.expanded[nid] = list(pre)
        return self.inner.expand(batch, policy)

    def release(self, node_ids):
        for nid in np.asarray(node_ids).tolist():
            assert nid in self.expanded, f"released {nid} which was never expanded"
            assert nid not in self.released, f"released {nid} twice"
            self.released.add(nid)

    def counters(self):
        return self.inner.counters()


def peaked_model(vocab_size=6, seed=0, scale=3.0, eos_bias=0.0):
    return random_logits_fn(vocab_size, seed=seed, scale=scale, eos_bias=eos_bias)


def two_branch_model(p_bushy: float):
    """docs/definitions.md's counterexample: the first step picks EOS or the bushy token (50 = b); after b, a
    uniform choice among 50 tokens, then EOS (51) for sure."""
    vocab = 52

    def fn(prefixes):
        out = np.full((len(prefixes), vocab), -np.inf)
        for i, p in enumerate(prefixes):
            if len(p) == 0:
                out[i, 50] = math.log(p_bushy)
                out[i, 51] = math.log1p(-p_bushy)
            elif len(p) == 1:
                out[i, :50] = 0.0
            else:
                out[i, 51] = 0.0
        return out

    return fn, dict(vocab_size=vocab, eos_token_ids=[51], max_new_tokens=3)


def leaf_table(result):
    """From ``exact(..., return_nodes=True)``: per leaf (prefix tuple, log pi, path entropy sum, length)."""
    nodes = result.nodes
    parent = nodes["parent"]
    token = nodes["token"]
    ent = nodes["entropy"]
    logr = nodes["log_reach"]
    leaf = nodes["is_leaf"]
    out = {}
    for i in np.flatnonzero(leaf):
        path, hsum, j = [], 0.0, int(i)
        while parent[j] >= 0:
            path.append(int(token[j]))
            j = int(parent[j])
            hsum += float(ent[j])
        out[tuple(reversed(path))] = (float(logr[i]), hsum, len(path))
    return out


class OneTokenPerRowBackend(CheckingBackend):
    """A callable costed as a backend that keeps its parents' state (a KV cache) is: one token per row, not
    the whole prefix a stateless callable recomputes."""

    def counters(self):
        c = dict(self.inner.counters())
        c["tokens_forwarded"] = c["rows_evaluated"]
        return c
