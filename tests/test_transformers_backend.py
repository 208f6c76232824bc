"""The transformers backend on tiny random models (Llama, Qwen2, GPT-2 families; CPU).

* ``exact`` through each strategy (tree attention with eager / sdpa masks, per-row caches) equals ``exact``
  through a naive callable that recomputes every prefix without a cache, every field to 1e-6, under several
  policies (temperature, top-k, top-p) with two EOS ids;
* tree-attention logits equal sequential KV-cache decoding logits for arbitrary expansion orders, with
  releases and compaction;
* sliding-window and flash-attention models get the documented fallback or error.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import canopy_rs  # noqa: E402
from canopy_rs.backends.transformers import (  # noqa: E402
    KVBudgetExceededError,
    TransformersModel,
    TreeAttentionUnsupported,
)
from canopy_rs.backends.transformers.per_row import PerRowEngine  # noqa: E402
from canopy_rs.backends.transformers.tree_attention import TreeAttentionEngine  # noqa: E402
from canopy_rs.backends.transformers.runner import ModelRunner  # noqa: E402
from canopy_rs.protocol import NodeBatch  # noqa: E402

torch.set_num_threads(1)

SCALAR_FIELDS = canopy_rs.CanopyResult.SCALAR_FIELDS
INT_FIELDS = ["num_internal_nodes", "num_leaves", "max_support"]
PROMPT = [1, 4, 2, 6]


def _build(family: str, attn: str = "eager", **extra):
    torch.manual_seed({"llama": 0, "qwen2": 1, "gpt2": 2}[family])
    common = dict(initializer_range=0.3)
    if family == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, eos_token_id=[3, 5], bos_token_id=1, **common, **extra,
        )
        cls = transformers.LlamaForCausalLM
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(
            vocab_size=12, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, eos_token_id=[0, 7], bos_token_id=1, **common, **extra,
        )
        cls = transformers.Qwen2ForCausalLM
    else:
        cfg = transformers.GPT2Config(
            vocab_size=8, n_embd=32, n_layer=2, n_head=4, n_positions=64, eos_token_id=[2, 6], bos_token_id=1,
            **common, **extra,
        )
        cls = transformers.GPT2LMHeadModel
    cfg._attn_implementation = attn
    model = cls(cfg).eval()
    return model


_MODELS: dict = {}


def model_for(family: str, attn: str = "eager", dtype=torch.float64):
    """Models are cached; the attention implementation is switched on the shared weights. The exactness
    tests run the models in float64 so that 1e-6 separates a wrong mask from rounding (float32 logits of
    these random models differ by ~1e-6 between any two kernels)."""
    key = (family, dtype)
    if key not in _MODELS:
        _MODELS[key] = _build(family).to(dtype)
    m = _MODELS[key]
    m.config._attn_implementation = attn
    return m


def naive_logits_fn(model, prompt):
    """Every prefix recomputed from scratch, no cache: the reference."""

    @torch.no_grad()
    def fn(prefixes):
        rows = []
        for p in prefixes:
            ids = torch.tensor([list(prompt) + list(p)])
            rows.append(model(input_ids=ids, use_cache=False).logits[0, -1].numpy())
        return np.stack(rows)

    return fn


def assert_results_equal(a, b, tol=1e-6, corr_tol=None):
    """Every field of two results equal to ``tol`` (``corr_tol`` for rho(N, r_N), a ratio of small
    covariances that amplifies rounding; default ``tol``)."""
    for f in SCALAR_FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        f_tol = corr_tol if f == "length_rate_corr" and corr_tol is not None else tol
        if f == "length_rate_corr" and (math.isnan(x) or math.isnan(y)):
            # Undefined when Var(N) or Var(r_N) is 0; rounding can leave ~1e-31 instead of an exact 0.
            degenerate = max(a.length_var, b.length_var) < 1e-20 or max(a.rate_var, b.rate_var) < 1e-20
            assert math.isnan(x) == math.isnan(y) or degenerate, f
        elif math.isnan(y):
            assert math.isnan(x), f
        else:
            assert x == pytest.approx(y, rel=f_tol, abs=f_tol), f"{f}: {x} vs {y}"
    for f in INT_FIELDS:
        assert getattr(a, f) == getattr(b, f), f
    np.testing.assert_allclose(a.length_pmf, b.length_pmf, rtol=0, atol=tol)
    np.testing.assert_allclose(a.entropy_by_depth, b.entropy_by_depth, rtol=0, atol=tol)


POLICIES = {
    "full": dict(temperature=1.0, top_k=None, top_p=1.0, max_new_tokens=3),
    "T0.7-k3": dict(temperature=0.7, top_k=3, top_p=1.0, max_new_tokens=5),
    "T1.3-p0.8": dict(temperature=1.3, top_k=None, top_p=0.8, max_new_tokens=3),
    "k4-p0.7": dict(temperature=1.0, top_k=4, top_p=0.7, max_new_tokens=5),
}
_NAIVE: dict = {}


def naive_result(family, policy_name, dtype=torch.float64):
    key = (family, policy_name, dtype)
    if key not in _NAIVE:
        m = model_for(family, "eager", dtype)
        eos = list(m.config.eos_token_id)
        _NAIVE[key] = canopy_rs.exact(
            naive_logits_fn(m, PROMPT), vocab_size=m.config.vocab_size, eos_token_ids=eos, **POLICIES[policy_name]
        )
    return _NAIVE[key]


STRATS = [("cascade", "eager"), ("cascade", "sdpa"), ("tree", "eager"), ("tree", "sdpa"), ("per-row", "eager"), ("per-row", "sdpa")]


@pytest.mark.parametrize("policy_name", list(POLICIES))
@pytest.mark.parametrize("strategy,attn", STRATS, ids=["cascade-eager", "cascade-sdpa", "tree-eager", "tree-sdpa", "rows-eager", "rows-sdpa"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_exact_matches_naive_recompute(family, strategy, attn, policy_name):
    ref = naive_result(family, policy_name)
    m = model_for(family, attn)
    # Both policy placements: torch on the model's device (PolicySupport) and the Rust core (CPU default).
    policy_on = "device" if attn == "sdpa" else "auto"
    be = TransformersModel(m, None, prompt=PROMPT, strategy=strategy, policy_on=policy_on)
    assert be.strategy == strategy
    assert be.eos_token_ids == tuple(sorted(m.config.eos_token_id)) and len(be.eos_token_ids) == 2
    assert be.vocab_size == m.config.vocab_size
    res = canopy_rs.exact(be, batch_size=5, **POLICIES[policy_name])
    assert_results_equal(res, ref)
    c = be.counters()
    n = res.num_internal_nodes
    assert c["rows_evaluated"] == n
    assert c["tokens_forwarded"] == len(PROMPT) + n - 1  # exactly one token per node after the prompt
    assert c["tokens_per_expanded_node"] == pytest.approx(1.0)
    assert res.tokens_forwarded == c["tokens_forwarded"] and res.model_calls == c["model_calls"]
    assert 0 < res.peak_live_kv_tokens
    assert (c["support_entries"] >= n) if policy_on == "device" else (c["support_entries"] == 0)


@pytest.mark.parametrize("strategy", ["cascade", "tree", "per-row"])
def test_exact_float32_model(strategy):
    """The float32 path (what real runs use): equal to the float32 naive recompute up to rounding."""
    ref = naive_result("llama", "k4-p0.7", torch.float32)
    be = TransformersModel(model_for("llama", "sdpa", torch.float32), None, prompt=PROMPT, strategy=strategy)
    res = canopy_rs.exact(be, batch_size=5, **POLICIES["k4-p0.7"])
    assert_results_equal(res, ref, tol=2e-5)


@pytest.mark.parametrize("order", ["breadth-first", "best-first", "depth-first"])
@pytest.mark.parametrize("strategy", ["tree", "per-row"])
def test_orders_batch_sizes_and_compaction(order, strategy):
    """Any order / batch size gives the same result; compaction after every release changes nothing."""
    ref = naive_result("llama", "T0.7-k3")
    m = model_for("llama", "sdpa")
    compactions = 0
    for batch_size in (1, 4, 1000):
        be = TransformersModel(m, None, prompt=PROMPT, strategy=strategy)
        if strategy == "tree":
            be.engine.compact_min, be.engine.compact_fraction = 1, 0.0
        else:
            be.engine.compact_min_rows, be.engine.compact_fraction = 1, 0.0
        res = canopy_rs.exact(be, order=order, batch_size=batch_size, **POLICIES["T0.7-k3"])
        assert_results_equal(res, ref)
        compactions += be.counters()["compactions"]
        assert be.engine.live_nodes == 0  # everything released at the end
        if strategy == "tree":
            assert be.engine.L == len(PROMPT)  # only the prompt columns remain after the last compaction
    assert compactions > 0


def test_depth_first_keeps_tree_cache_small():
    m = model_for("llama", "sdpa")
    be = TransformersModel(m, None, prompt=PROMPT, strategy="tree")
    be.engine.compact_min = 8
    res = canopy_rs.exact(be, order="depth-first", batch_size=4, max_new_tokens=6, top_k=2)
    # Without compaction every expanded node would keep its column.
    assert res.peak_live_kv_tokens < len(PROMPT) + res.num_internal_nodes
    assert be.counters()["compactions"] > 0


def test_debug_logits_mode_matches():
    ref = naive_result("qwen2", "k4-p0.7")
    be = TransformersModel(model_for("qwen2", "eager"), None, prompt=PROMPT, debug_logits=True)
    res = canopy_rs.exact(be, batch_size=7, **POLICIES["k4-p0.7"])
    assert_results_equal(res, ref)
    assert be.counters()["support_entries"] == 0


# ------------------------------------------------------------------------------------------------------
# Tree-attention logits vs sequential KV-cache decoding, arbitrary expansion orders


@torch.no_grad()
def sequential_kv_logits(model, prompt, prefix):
    """Prompt prefill, then one token at a time through a DynamicCache (standard incremental decoding)."""
    runner = ModelRunner(model)
    cache = transformers.DynamicCache(config=model.config)
    logits = runner(torch.tensor([list(prompt)]), cache)[:, -1]
    for t in prefix:
        logits = runner(torch.tensor([[int(t)]]), cache)[:, -1]
    return logits[0]


def random_drive(engine, prompt, vocab, rng, *, max_depth, max_nodes, max_batch, max_children=3):
    """Expands a random tree in a random order with random mixed-depth batches; releases each node at a
    random time after its last child was expanded. Returns {node id: (prefix, logits)}."""
    out = {0: ((), engine.prefill(0, prompt)[0].clone())}
    info = {0: ((), 0)}
    pending_children = {}
    frontier = []
    next_id = 1

    def add_children(nid):
        nonlocal next_id
        prefix, depth = info[nid]
        if depth >= max_depth:
            pending_children[nid] = 0
            return
        toks = rng.choice(vocab, size=int(rng.integers(1, max_children + 1)), replace=False)
        pending_children[nid] = len(toks)
        for t in toks:
            info[next_id] = (prefix + (int(t),), depth + 1)
            frontier.append((next_id, nid, int(t), depth + 1))
            next_id += 1

    add_children(0)
    releasable = []
    while frontier and len(out) < max_nodes:
        rng.shuffle(frontier)
        b = int(rng.integers(1, max_batch + 1))
        batch, frontier[:] = frontier[:b], frontier[b:]
        arr = np.array(batch, dtype=np.int64)
        logits = engine.expand(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3])
        for i, (nid, parent, _, _) in enumerate(batch):
            out[nid] = (info[nid][0], logits[i].clone())
            pending_children[parent] -= 1
            if pending_children[parent] == 0:
                releasable.append(parent)
            add_children(nid)
            if pending_children[nid] == 0:
                releasable.append(nid)
        # Release a random subset of the releasable nodes now, the rest later.
        rng.shuffle(releasable)
        k = int(rng.integers(0, len(releasable) + 1))
        engine.release(releasable[:k])
        releasable = releasable[k:]
    engine.release(list(out))  # the driver's end of run: every expanded node
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("family,attn", [("llama", "eager"), ("llama", "sdpa"), ("qwen2", "sdpa"), ("gpt2", "eager"), ("gpt2", "sdpa")])
def test_tree_attention_logits_equal_sequential_kv_cache(family, attn, dtype):
    m = model_for(family, attn, dtype)
    runner = ModelRunner(m)
    mask_kind = "bool" if attn == "sdpa" else "float"
    # Llama/Qwen2 eager attention takes its softmax in float32 even for a float64 model.
    tol = 1e-10 if dtype == torch.float64 and (attn == "sdpa" or family == "gpt2") else 2e-5
    # A tiny depth block (2) exercises the block-parent walk; compaction after every release.
    eng = TreeAttentionEngine(runner, torch.device("cpu"), dtype, mask_kind, block=2, compact_min=1, compact_fraction=0.0)
    rng = np.random.default_rng(7)
    with torch.inference_mode():
        got = random_drive(eng, PROMPT, m.config.vocab_size, rng, max_depth=7, max_nodes=60, max_batch=6)
    assert eng.compactions > 0 and len(got) > 30
    assert max(len(p) for p, _ in got.values()) >= 5
    for nid, (prefix, logits) in got.items():
        ref = sequential_kv_logits(m, PROMPT, prefix)
        torch.testing.assert_close(logits, ref, rtol=tol, atol=tol, msg=f"node {nid} prefix {prefix}")
    # Every column was released: only the prompt remains.
    assert eng.live_nodes == 0 and eng.L == len(PROMPT)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_per_row_logits_equal_sequential_random_order(family):
    m = model_for(family, "sdpa")
    eng = PerRowEngine(ModelRunner(m), torch.device("cpu"), compact_min_rows=1, compact_fraction=0.0)
    rng = np.random.default_rng(3)
    with torch.inference_mode():
        got = random_drive(eng, PROMPT, m.config.vocab_size, rng, max_depth=6, max_nodes=50, max_batch=6)
    for nid, (prefix, logits) in got.items():
        ref = sequential_kv_logits(m, PROMPT, prefix)
        torch.testing.assert_close(logits, ref, rtol=1e-10, atol=1e-10, msg=f"node {nid} prefix {prefix}")
    assert eng.live_nodes == 0 and not eng.chunks


def test_tree_attention_compaction_uses_layer_keys_values():
    """Compaction index_selects cache.layers[i].keys/.values along the sequence dimension."""
    m = model_for("llama", "eager")
    eng = TreeAttentionEngine(ModelRunner(m), torch.device("cpu"), torch.float64, "float", compact_min=1, compact_fraction=0.0)
    with torch.inference_mode():
        eng.prefill(0, PROMPT)
        eng.expand(np.array([1, 2, 3]), np.array([0, 0, 0]), np.array([4, 5, 6]), np.array([1, 1, 1]))
        assert eng.cache.layers[0].keys.shape[-2] == len(PROMPT) + 3
        before = eng.cache.layers[1].keys[..., [len(PROMPT), len(PROMPT) + 2], :].clone()
        eng.release([2])
        assert eng.compactions == 1 and eng.L == len(PROMPT) + 2
        for layer in eng.cache.layers:
            assert layer.keys.shape[-2] == layer.values.shape[-2] == len(PROMPT) + 2
        torch.testing.assert_close(eng.cache.layers[1].keys[..., len(PROMPT) :, :], before)
        assert eng.node_col == {1: len(PROMPT), 3: len(PROMPT) + 1}


# ------------------------------------------------------------------------------------------------------
# Unsupported models: the documented fallback or error


def test_sliding_window_smaller_than_the_prompt():
    """Window 3 < prompt 4: dense tree attention refuses; cascade (auto) and per-row are exact."""
    m = _build("qwen2", "sdpa", use_sliding_window=True, sliding_window=3, max_window_layers=0).double()
    with pytest.raises(TreeAttentionUnsupported, match="fills the sliding window"):
        TransformersModel(m, None, prompt=PROMPT, strategy="tree")
    pol = dict(temperature=1.0, top_k=3, top_p=0.9, max_new_tokens=4)
    ref = canopy_rs.exact(naive_logits_fn(m, PROMPT), vocab_size=12, eos_token_ids=[0, 7], **pol)
    auto = TransformersModel(m, None, prompt=PROMPT)
    assert auto.strategy == "cascade"
    for be in (auto, TransformersModel(m, None, prompt=PROMPT, strategy="per-row")):
        res = canopy_rs.exact(be, batch_size=4, **pol)
        assert_results_equal(res, ref)
        assert be.counters()["tokens_per_expanded_node"] == pytest.approx(1.0)


def test_sliding_window_tree_within_the_window():
    """strategy='tree' on a sliding-window model: exact while prompt + depth <= window, an error beyond."""
    window = 10
    m = _build("qwen2", "sdpa", use_sliding_window=True, sliding_window=window, max_window_layers=0).double()
    be = TransformersModel(m, None, prompt=PROMPT, strategy="tree")
    assert be.strategy == "tree" and be.sliding_window == window
    # Deepest expanded node: depth max_new_tokens - 1 = 6, and 4 + 6 <= 10.
    pol = dict(temperature=1.0, top_k=2, top_p=1.0, max_new_tokens=window - len(PROMPT) + 1)
    ref = canopy_rs.exact(naive_logits_fn(m, PROMPT), vocab_size=12, eos_token_ids=[0, 7], **pol)
    assert_results_equal(canopy_rs.exact(be, batch_size=8, **pol), ref)
    with pytest.raises(canopy_rs.errors.TreeAttentionUnsupported, match="sliding-window model"):
        canopy_rs.exact(be, batch_size=8, **{**pol, "max_new_tokens": pol["max_new_tokens"] + 1})


def test_gemma3_mixed_sliding_and_full_layers():
    """Gemma-3 style: alternating sliding-window (8) and full layers. Cascade (auto) and per-row past the
    window, dense tree within."""
    if not hasattr(transformers, "Gemma3TextConfig"):
        pytest.skip("transformers without Gemma 3")
    torch.manual_seed(3)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=64, eos_token_id=[3, 5], initializer_range=0.3,
    )
    cfg._attn_implementation = "sdpa"
    m = transformers.Gemma3ForCausalLM(cfg).eval().double()
    naive = naive_logits_fn(m, PROMPT)
    pol = dict(temperature=1.0, top_k=2, top_p=1.0, max_new_tokens=7)  # prompt 4 + depth 6 > window 8
    be = TransformersModel(m, None, prompt=PROMPT)
    assert be.strategy == "cascade"
    ref = canopy_rs.exact(naive, vocab_size=16, eos_token_ids=[3, 5], **pol)
    assert_results_equal(canopy_rs.exact(be, batch_size=8, **pol), ref)
    rows = TransformersModel(m, None, prompt=PROMPT, strategy="per-row")
    assert_results_equal(canopy_rs.exact(rows, batch_size=8, **pol), ref)
    pol["max_new_tokens"] = 5  # 4 + 4 <= 8
    ref = canopy_rs.exact(naive, vocab_size=16, eos_token_ids=[3, 5], **pol)
    tree = TransformersModel(m, None, prompt=PROMPT, strategy="tree")
    assert_results_equal(canopy_rs.exact(tree, batch_size=8, **pol), ref)


def test_hybrid_linear_attention_model_uses_per_row():
    """LFM2 (a short-conv + attention hybrid): recurrent/conv state cannot be masked per branch."""
    if not hasattr(transformers, "Lfm2Config"):
        pytest.skip("transformers without LFM2")
    torch.manual_seed(5)
    cfg = transformers.Lfm2Config(
        vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, layer_types=["conv", "full_attention"], eos_token_id=[3, 5], max_position_embeddings=64,
    )
    m = transformers.Lfm2ForCausalLM(cfg).eval().double()
    for strategy in ("cascade", "tree"):
        with pytest.raises(TreeAttentionUnsupported, match="linear-attention"):
            TransformersModel(m, None, prompt=PROMPT, strategy=strategy)
    with pytest.warns(RuntimeWarning, match="linear-attention"):
        be = TransformersModel(m, None, prompt=PROMPT)
    assert be.strategy == "per-row"
    pol = dict(temperature=0.8, top_k=3, top_p=0.95, max_new_tokens=4)
    ref = canopy_rs.exact(naive_logits_fn(m, PROMPT), vocab_size=16, eos_token_ids=[3, 5], **pol)
    res = canopy_rs.exact(be, batch_size=5, order="breadth-first", **pol)
    assert_results_equal(res, ref)


def test_flash_attention_is_refused_for_tree():
    m = _build("llama", "eager")
    m.config._attn_implementation = "flash_attention_2"  # the kernel itself is never called here
    with pytest.raises(TreeAttentionUnsupported, match="flash"):
        TransformersModel(m, None, prompt=PROMPT, strategy="tree")
    # Without the flash kernels installed no strategy's self-check can run a forward: refused, naming why.
    with pytest.raises(canopy_rs.errors.StrategyUnsupportedError, match="flash") as err:
        TransformersModel(m, None, prompt=PROMPT, strategy="auto")
    assert "per-row: startup self-check failed" in str(err.value)
    # The one way past the check is the caller's explicit choice.
    be = TransformersModel(m, None, prompt=PROMPT, strategy="per-row", self_check=False)
    assert be.strategy == "per-row" and be.strategy_reason == "requested"
    assert isinstance(TreeAttentionUnsupported("x"), ValueError)


def test_failed_self_check_falls_back(monkeypatch):
    """A model that ignores the 4D mask fails the startup self-check."""
    import canopy_rs.backends.transformers.tree_attention as ta

    m = model_for("llama", "eager")
    orig = ta.TreeAttentionEngine.expand

    def no_mask_expand(self, *a, **k):
        runner = self.runner
        real_call = runner.__class__.__call__

        def call(r, ids, cache, **kw):
            kw.pop("attention_mask", None)
            return real_call(r, ids, cache, **kw)

        runner.__class__.__call__ = call
        try:
            return orig(self, *a, **k)
        finally:
            runner.__class__.__call__ = real_call

    monkeypatch.setattr(ta.TreeAttentionEngine, "expand", no_mask_expand)
    with pytest.raises(TreeAttentionUnsupported, match="self-check"):
        TransformersModel(m, None, prompt=PROMPT, strategy="tree")
    # auto takes cascade, which does not use the 4D mask at all.
    assert TransformersModel(m, None, prompt=PROMPT).strategy == "cascade"


# ------------------------------------------------------------------------------------------------------
# Options, prompt handling, errors


def test_memory_budget():
    m = model_for("llama", "sdpa")
    for strategy in ("cascade", "tree", "per-row"):
        be = TransformersModel(m, None, prompt=PROMPT, strategy=strategy, max_live_kv_tokens=12)
        with pytest.raises(KVBudgetExceededError, match="max_live_kv_tokens"):
            canopy_rs.exact(be, batch_size=16, max_new_tokens=4, top_k=3, order="breadth-first")
        be = TransformersModel(m, None, prompt=PROMPT, strategy=strategy, max_live_kv_tokens=400)
        res = canopy_rs.exact(be, batch_size=2, max_new_tokens=4, top_k=2)
        assert res.peak_live_kv_tokens <= 400
    assert issubclass(KVBudgetExceededError, MemoryError)


def test_eos_and_vocab_overrides():
    m = model_for("gpt2", "eager")
    be = TransformersModel(m, None, prompt=PROMPT, eos_token_ids=[6, 2, 6])
    assert be.eos_token_ids == (2, 6)
    be = TransformersModel(m, None, prompt=PROMPT, eos_token_ids=[], strategy="per-row")
    assert be.eos_token_ids == ()
    with pytest.raises(canopy_rs.InvalidArgumentError, match="outside the vocabulary"):
        TransformersModel(m, None, prompt=PROMPT, eos_token_ids=[50256])
    # A vocab cut: logits restricted to the first 6 columns.
    be = TransformersModel(m, None, prompt=PROMPT, vocab_size=6, eos_token_ids=[2])
    fn = naive_logits_fn(m, PROMPT)
    ref = canopy_rs.exact(lambda p: fn(p)[:, :6], vocab_size=6, eos_token_ids=[2], max_new_tokens=3, top_k=3)
    res = canopy_rs.exact(be, max_new_tokens=3, top_k=3)
    assert_results_equal(res, ref)
    with pytest.raises(canopy_rs.InvalidArgumentError, match="vocab_size"):
        TransformersModel(m, None, prompt=PROMPT, vocab_size=9)


def test_default_eos_from_generation_config_must_fit_vocab():
    m = _build("gpt2")
    m.generation_config.eos_token_id = 50256
    with pytest.raises(canopy_rs.InvalidArgumentError, match="eos_token_ids"):
        TransformersModel(m, None, prompt=PROMPT)


def _word_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "hello", "world", "user", "assistant", "think", "nothink", "[UNK]", "|", "x"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }} | {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant |{% if enable_thinking is defined and not enable_thinking %}"
        " think nothink{% endif %}{% endif %}"
    )
    return fast


def test_prompt_rendering_base_and_chat():
    tok = _word_tokenizer()
    m = model_for("llama", "sdpa")
    base = TransformersModel(m, tok, prompt="hello world", strategy="per-row")
    assert base.prompt_ids == [1, 3, 4]  # raw prompt with the tokenizer's BOS
    chat = TransformersModel(m, tok, prompt="hello world", chat=True, strategy="per-row")
    # "user | hello world assistant | think nothink"   (enable_thinking=False, no extra BOS)
    assert chat.prompt_ids == [5, 10, 3, 4, 6, 10, 7, 8]
    thinking = TransformersModel(
        m, tok, prompt="hello world", chat=True, strategy="per-row", chat_template_kwargs={"enable_thinking": True}
    )
    assert thinking.prompt_ids == [5, 10, 3, 4, 6, 10]
    with pytest.raises(canopy_rs.InvalidArgumentError, match="tokenizer"):
        TransformersModel(m, None, prompt="hello")
    with pytest.raises(canopy_rs.InvalidArgumentError, match="chat=True"):
        TransformersModel(m, None, prompt=[1, 2], chat=True)
    with pytest.raises(canopy_rs.InvalidArgumentError, match="empty"):
        TransformersModel(m, None, prompt=[])
    with pytest.raises(canopy_rs.InvalidArgumentError, match="strategy"):
        TransformersModel(m, None, prompt=[1], strategy="magic")


def test_with_prompt_and_protocol():
    m = model_for("llama", "sdpa")
    be = TransformersModel(m, None, prompt=PROMPT, policy_on="device")
    assert isinstance(be, canopy_rs.Backend)
    other = be.with_prompt([2, 3])
    assert other.strategy == be.strategy and other.prompt_ids == [2, 3]
    fn = naive_logits_fn(m, [2, 3])
    ref = canopy_rs.exact(fn, vocab_size=16, eos_token_ids=[3, 5], max_new_tokens=3, top_k=2)
    assert_results_equal(canopy_rs.exact(other, max_new_tokens=3, top_k=2), ref)
    # Driving the protocol by hand: a parent that was released cannot be expanded.
    be.reset()
    pol = canopy_rs.Policy(1.0, 2, 1.0)
    root = NodeBatch(np.array([0]), np.array([-1]), np.array([-1]), np.array([0]), lambda: [[]])
    out = be.expand(root, pol)
    assert out.offsets.tolist() == [0, 2]
    kid = NodeBatch(np.array([1]), np.array([0]), np.array([int(out.tokens[0])]), np.array([1]), lambda: [[]])
    be.expand(kid, pol)
    be.release(np.array([1]))
    with pytest.raises(canopy_rs.InvalidArgumentError, match="released"):
        be.expand(NodeBatch(np.array([2]), np.array([1]), np.array([0]), np.array([2]), lambda: [[]]), pol)


def test_import_canopy_rs_does_not_import_torch():
    code = "import sys, canopy_rs; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
