"""Cascade tree attention (``strategy="cascade"``) against its two references.

* Logits of every node of random trees, expanded in random mixed-depth batches with random release orders
  (so arena slots are freed and reused), equal the dense-mask tree engine's and sequential KV-cache decoding's
  to 1e-5 in float32: Llama and Qwen2 with GQA, Gemma 3 with a sliding window smaller than prompt + depth,
  GPT-2; prompts of 5 and 300 tokens.
* ``exact`` through cascade equals the naive recompute on every field (also in test_transformers_backend).
* A model whose attention bypasses transformers' registry makes ``auto`` fall back, with the reason.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import canopy_rs  # noqa: E402
from canopy_rs.backends.transformers import KVBudgetExceededError, TransformersModel, TreeAttentionUnsupported  # noqa: E402
from canopy_rs.backends.transformers.runner import ModelRunner  # noqa: E402
from canopy_rs.backends.transformers.attention import CASCADE_ATTENTION, cascade_forward  # noqa: E402
from canopy_rs.backends.transformers.cascade import CascadeEngine  # noqa: E402
from canopy_rs.backends.transformers.tree_attention import TreeAttentionEngine  # noqa: E402

from test_transformers_backend import assert_results_equal, naive_logits_fn, random_drive, sequential_kv_logits  # noqa: E402

torch.set_num_threads(1)
V = 32


def build(family: str, attn: str = "sdpa", dtype=torch.float32):
    torch.manual_seed(11)
    common = dict(vocab_size=V, max_position_embeddings=512, initializer_range=0.2)
    if family == "llama":
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, eos_token_id=[3, 5], **common)
        cls = transformers.LlamaForCausalLM
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                                       num_key_value_heads=2, eos_token_id=[0, 7], **common)
        cls = transformers.Qwen2ForCausalLM
    elif family == "gemma3":
        # Window 5: a 5-token prompt + depth up to 7 runs past it, so both the prompt part and the ancestor
        # part are cut by position.
        cfg = transformers.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, head_dim=8, sliding_window=5,
                                            layer_types=["sliding_attention", "full_attention"], eos_token_id=[3, 5], **common)
        cls = transformers.Gemma3ForCausalLM
    else:
        cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=512, eos_token_id=[2, 6],
                                      initializer_range=0.2)
        cls = transformers.GPT2LMHeadModel
    cfg._attn_implementation = attn
    return cls(cfg).eval().to(dtype)


def prompt_of(n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(n).integers(0, V, size=n)]


@pytest.mark.parametrize("prompt_len", [5, 300])
@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("gemma3", "sdpa"), ("gpt2", "eager")])
def test_cascade_equals_dense_mask_and_sequential_kv(family, attn, prompt_len):
    m = build(family, attn)
    prompt = prompt_of(prompt_len)
    runner = ModelRunner(m)
    cpu = torch.device("cpu")
    cascade = CascadeEngine(runner, cpu, initial_capacity=4)  # tiny arena: it grows several times
    kw = dict(max_depth=7, max_nodes=45, max_batch=7)
    with torch.inference_mode():
        got = random_drive(cascade, prompt, V, np.random.default_rng(5), **kw)
        dense = None
        if family != "gemma3":  # the dense engine is exact only inside a sliding window
            eng = TreeAttentionEngine(runner, cpu, torch.float32, "bool" if attn == "sdpa" else "float", compact_min=1, compact_fraction=0.0)
            dense = random_drive(eng, prompt, V, np.random.default_rng(5), **kw)
            assert eng.compactions > 0
    assert max(len(p) for p, _ in got.values()) >= 5
    if family == "gemma3":
        assert prompt_len + max(len(p) for p, _ in got.values()) > m.config.sliding_window
    for nid, (prefix, logits) in got.items():
        ref = sequential_kv_logits(m, prompt, prefix)
        torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5, msg=f"cascade node {nid} prefix {prefix}")
        if dense is not None:
            assert dense[nid][0] == prefix
            torch.testing.assert_close(logits, dense[nid][1], rtol=1e-5, atol=1e-5, msg=f"dense node {nid}")
    # Everything released: every slot is free again and was reused along the way.
    assert cascade.live_nodes == 0 and cascade.live_kv_tokens == prompt_len
    assert cascade.peak_live_kv_tokens < prompt_len + len(got) - 1
    # The user's attention implementation is back.
    assert m.config._attn_implementation == attn


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "gpt2"])
def test_exact_through_cascade_equals_naive_every_field(family):
    m = build(family, "sdpa", torch.float64)
    prompt = prompt_of(6)
    eos = list(m.config.eos_token_id)
    pol = dict(temperature=0.9, top_k=3, top_p=0.95, max_new_tokens=5)
    ref = canopy_rs.exact(naive_logits_fn(m, prompt), vocab_size=V, eos_token_ids=eos, **pol)
    be = TransformersModel(m, None, prompt=prompt)
    assert be.strategy == "cascade", be.strategy_reason
    for order, bs in (("breadth-first", 9), ("depth-first", 4), ("best-first", 1000)):
        res = canopy_rs.exact(be, batch_size=bs, order=order, **pol)
        assert_results_equal(res, ref)
        assert be.counters()["tokens_per_expanded_node"] == pytest.approx(1.0)


def test_gemma3_window_past_prompt_and_depth_via_auto():
    """Sliding-window layers are exact under cascade whatever prompt + depth: auto no longer falls back."""
    m = build("gemma3", "sdpa", torch.float64)
    prompt = prompt_of(9)  # already past the window (5)
    be = TransformersModel(m, None, prompt=prompt)
    assert be.strategy == "cascade"
    pol = dict(temperature=1.0, top_k=2, top_p=1.0, max_new_tokens=6)
    ref = canopy_rs.exact(naive_logits_fn(m, prompt), vocab_size=V, eos_token_ids=[3, 5], **pol)
    assert_results_equal(canopy_rs.exact(be, batch_size=5, **pol), ref)


def test_auto_falls_back_when_attention_bypasses_the_registry():
    """GPT-Neo computes attention inside its module, not through AttentionInterface."""
    torch.manual_seed(2)
    cfg = transformers.GPTNeoConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global"], 2]],
                                    max_position_embeddings=128, eos_token_id=2, bos_token_id=1)
    m = transformers.GPTNeoForCausalLM(cfg).eval().double()
    with pytest.raises(TreeAttentionUnsupported, match="AttentionInterface"):
        TransformersModel(m, None, prompt=[1, 4, 2, 6], strategy="cascade")
    with pytest.warns(RuntimeWarning, match="AttentionInterface"):
        be = TransformersModel(m, None, prompt=[1, 4, 2, 6])
    assert be.strategy != "cascade" and "AttentionInterface" in be.strategy_reason
    pol = dict(temperature=1.0, top_k=2, top_p=1.0, max_new_tokens=4)
    ref = canopy_rs.exact(naive_logits_fn(m, [1, 4, 2, 6]), vocab_size=V, eos_token_ids=[2], **pol)
    assert_results_equal(canopy_rs.exact(be, batch_size=4, **pol), ref)


def test_cascade_attention_outside_a_cascade_step_is_refused():
    m = build("llama")
    with cascade_forward(m):
        assert m.config._attn_implementation == CASCADE_ATTENTION
        with pytest.raises(canopy_rs.errors.EngineStateError, match="cascade expansion"):
            m(input_ids=torch.tensor([[1, 2]]), use_cache=False)
    assert m.config._attn_implementation == "sdpa"


def test_cascade_memory_budget_names_the_fix():
    m = build("llama")
    prompt = prompt_of(5)
    be = TransformersModel(m, None, prompt=prompt, strategy="cascade", max_live_kv_tokens=12)
    with pytest.raises(KVBudgetExceededError, match="max_live_kv_tokens=12; use order='depth-first', a smaller batch_size"):
        canopy_rs.exact(be, batch_size=16, max_new_tokens=4, top_k=3, order="breadth-first")
    with pytest.raises(KVBudgetExceededError, match="raise max_live_kv_tokens or shorten the prompt"):
        canopy_rs.exact(TransformersModel(m, None, prompt=prompt, strategy="cascade", max_live_kv_tokens=4), max_new_tokens=2)
    # Live KV is exactly prompt + live node columns: depth-first with batch 2 stays small.
    be = TransformersModel(m, None, prompt=prompt, strategy="cascade", max_live_kv_tokens=40)
    res = canopy_rs.exact(be, batch_size=2, max_new_tokens=5, top_k=3)
    assert res.peak_live_kv_tokens <= 40 and res.num_internal_nodes > 40


def test_float32_head_for_reduced_precision_models():
    """A bfloat16 model's final norm and LM head run in float32: the logits are float32 and equal a float32
    norm + head applied to the bfloat16 decoder's pre-norm hidden state."""
    m = build("llama", "sdpa", torch.bfloat16)
    runner = ModelRunner(m)
    assert runner.head.active and runner.head.covers == "final norm + LM head"
    ids = torch.tensor([prompt_of(7)])
    with torch.inference_mode():
        logits = runner(ids, None)[0, -1]
        captured = {}
        h = m.model.norm.register_forward_pre_hook(lambda mod, args: captured.__setitem__("x", args[0]))
        m(input_ids=ids, use_cache=False)
        h.remove()
        x = captured["x"][0, -1].float()
        ref = m.lm_head.weight.float() @ (m.model.norm.weight.float() * (x * torch.rsqrt(x.pow(2).mean() + m.config.rms_norm_eps)))
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    assert m.model.norm.weight.dtype == torch.bfloat16 and m.lm_head.weight.dtype == torch.bfloat16  # model untouched
    assert not ModelRunner(build("llama")).head.active  # nothing to do for float32


def test_results_record_dtype_and_strategy():
    m = build("llama", "sdpa", torch.bfloat16)
    be = TransformersModel(m, None, prompt=prompt_of(4))
    want = {"dtype": "bfloat16", "logits_dtype": "float32", "strategy": "cascade"}
    res = canopy_rs.exact(be, max_new_tokens=3, top_k=2)
    bnd = canopy_rs.bounded(be, budget=2, max_new_tokens=3, top_k=2)
    ro = canopy_rs.sample(be, num_rollouts=3, max_new_tokens=3, top_k=2, seed=0)
    for info in (res.info, bnd.info):
        assert {k: getattr(info, k) for k in want} == want
    assert ro.backend == want and ro.to_dict()["backend"] == want
    assert {k: res.to_dict()[k] for k in want} == want
    # A plain callable reports none.
    plain = canopy_rs.exact(lambda p: np.zeros((len(p), 4)), vocab_size=4, eos_token_ids=[0], max_new_tokens=2)
    assert plain.info.dtype is None and plain.info.strategy is None


def test_backend_sizes_its_own_calls():
    """No batch_size: the drivers use the backend's preferred_batch_size, derived from memory per row
    (per-row rows carry the whole prefix's KV, so they are fewer)."""
    m = build("llama")
    prompt = prompt_of(300)
    cascade = TransformersModel(m, None, prompt=prompt, strategy="cascade")
    rows = TransformersModel(m, None, prompt=prompt, strategy="per-row")
    assert rows.memory_per_row_bytes > cascade.memory_per_row_bytes
    assert rows.memory_per_row_bytes >= cascade.kv_bytes_per_token() * 300
    assert 16 <= rows.preferred_batch_size <= cascade.preferred_batch_size <= 1024
    cascade.cpu_call_budget_bytes = 20 * cascade.memory_per_row_bytes
    assert cascade.preferred_batch_size == 20
    pol = dict(max_new_tokens=4, top_k=4, order="breadth-first")
    res = canopy_rs.exact(cascade, **pol)
    assert res.model_calls == canopy_rs.exact(cascade, batch_size=20, **pol).model_calls > 4
