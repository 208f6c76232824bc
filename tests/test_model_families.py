"""Exact on every model family the transformers backend accepts; refused, with the reason, where it cannot be.

Tiny random float64 models of every cache layer type transformers ships for causal LMs: full attention,
sliding window, indexed (DSA), linear attention / short conv (LFM2), state-space (Mamba, Mamba-2), hybrids of
each (Bamba, Jamba, FalconH1, Zamba2, GraniteMoeHybrid, Qwen3-Next, NemotronH with its dummy layers, OLMo
hybrid, Qwen3.5, Inkling's sliding hybrid).

* Per-row expansion (the strategy for recurrent and hybrid models, forced on attention models to cover their
  cache layers) gives every field of ``exact`` equal, to 1e-9, to expanding each prefix alone through the
  model's own cached decoding (a fresh cache per prefix, so nothing can leak between branches), in two orders;
  rho(N, r_N), a ratio of small covariances, to 1e-7 (measured: at most 6e-9, NemotronH). Against full
  recomputation without a cache, also 1e-9 except where a kernel computes in float32 inside a float64 model
  (Mamba-2's scan: 2.6e-9), hence 1e-8 there.
* Row copies share no storage with their source; an unknown layer type or attribute is refused by name.
* The startup self-check runs for per-row too and fails closed: an injected leak makes the model refused,
  with the deviation in the message. Models that keep state outside transformers' cache are refused.
* The context window: prompt + ``max_new_tokens`` beyond it is refused before any expansion.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import canopy_rs  # noqa: E402
from canopy_rs.backends.transformers import TransformersModel  # noqa: E402
from canopy_rs.backends.transformers import cache_ops, per_row  # noqa: E402
from canopy_rs.backends.transformers.runner import ModelRunner  # noqa: E402
from canopy_rs.backends.transformers.self_check import CHECK_CHILDREN, CHECK_DEPTH  # noqa: E402
from canopy_rs.errors import CacheLayoutUnsupported, InvalidArgumentError, StrategyUnsupportedError  # noqa: E402

from test_transformers_backend import assert_results_equal  # noqa: E402

torch.set_num_threads(1)
PROMPT = [1, 4, 2, 6, 3]
EOS = [3, 5]
V = 32
POLICY = dict(temperature=0.9, top_k=3, top_p=0.97, max_new_tokens=4)
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, eos_token_id=EOS, bos_token_id=1, pad_token_id=0)
MAMBA2_HEADS = dict(mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=8)

# name: (config class, model class, config overrides, the strategy "auto" must choose)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, "cascade"),
    "mistral-sliding": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=4), "cascade"),
    "gemma3-mixed": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                     dict(head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"]), "cascade"),
    "deepseek-v32-indexed": ("DeepseekV32Config", "DeepseekV32ForCausalLM",
                             dict(moe_intermediate_size=16, n_shared_experts=1, n_routed_experts=2, kv_lora_rank=8,
                                  q_lora_rank=8, qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=4, n_group=1,
                                  topk_group=1, num_experts_per_tok=1, index_topk=64, index_head_dim=8,
                                  index_n_heads=2, head_dim=8, first_k_dense_replace=1, num_key_value_heads=4),
                             "per-row"),
    "mamba": ("MambaConfig", "MambaForCausalLM", dict(state_size=8, expand=2, conv_kernel=4), "per-row"),
    "mamba2": ("Mamba2Config", "Mamba2ForCausalLM",
               dict(state_size=8, expand=2, conv_kernel=4, num_heads=8, head_dim=8, n_groups=1, chunk_size=8), "per-row"),
    "lfm2-short-conv": ("Lfm2Config", "Lfm2ForCausalLM", dict(layer_types=["conv", "full_attention"]), "per-row"),
    "bamba": ("BambaConfig", "BambaForCausalLM", dict(attn_layer_indices=[1], mamba_expand=2, **MAMBA2_HEADS), "per-row"),
    "jamba": ("JambaConfig", "JambaForCausalLM",
              dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                   num_experts=2, mamba_d_state=8, mamba_expand=2, mamba_dt_rank=4), "per-row"),
    "falcon-h1": ("FalconH1Config", "FalconH1ForCausalLM", dict(mamba_d_ssm=64, mamba_expand=2, head_dim=8, **MAMBA2_HEADS),
                  "per-row"),
    "zamba2": ("Zamba2Config", "Zamba2ForCausalLM",
               dict(layers_block_type=["mamba", "hybrid"], mamba_d_state=8, mamba_headdim=8, n_mamba_heads=8,
                    mamba_ngroups=1, chunk_size=8, attention_head_dim=8), "per-row"),
    "granite-moe-hybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM",
                           dict(layer_types=["mamba", "attention"], num_local_experts=2, num_experts_per_tok=1,
                                **MAMBA2_HEADS), "per-row"),
    "qwen3-next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                   dict(layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
                        linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, head_dim=8,
                        num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16,
                        shared_expert_intermediate_size=16), "per-row"),
    "nemotron-h": ("NemotronHConfig", "NemotronHForCausalLM",
                   dict(layers_block_type=["mamba", "moe", "attention", "mlp"], head_dim=8, ssm_state_size=8,
                        mamba_num_heads=8, mamba_head_dim=8, n_groups=1, chunk_size=8, n_routed_experts=2,
                        num_experts_per_tok=1, moe_intermediate_size=16, moe_shared_expert_intermediate_size=16),
                   "per-row"),
    "olmo-hybrid": ("OlmoHybridConfig", "OlmoHybridForCausalLM", {}, "per-row"),
    "qwen3.5": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM",
                dict(layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4, linear_num_key_heads=2,
                     linear_key_head_dim=8, linear_value_head_dim=8, head_dim=8), "per-row"),
    "inkling-sliding-hybrid": ("InklingTextConfig", "InklingForCausalLM",
                               dict(head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8,
                                    sliding_window_size=6, d_rel=4, rel_extent=16, local_layer_ids=[0],
                                    moe_intermediate_size=16, n_routed_experts=2, num_experts_per_tok=1,
                                    n_shared_experts=1, eos_token_id=3), "per-row"),
}

_MODELS: dict = {}


def build(name: str, **overrides):
    cfg_name, model_name, extra, _ = FAMILIES[name]
    if not hasattr(transformers, cfg_name):
        pytest.skip(f"transformers {transformers.__version__} has no {cfg_name}")
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_name)(**{**BASE, **extra, **overrides})
    cfg._experts_implementation = "eager"  # the grouped-mm MoE kernels take no float64
    cls = getattr(transformers, model_name)
    # sdpa keeps attention in float64 (eager takes its softmax in float32); models without attention: eager.
    cfg._attn_implementation = "sdpa" if cls._supports_sdpa else "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(cfg).eval().double()


def model(name: str):
    if name not in _MODELS:
        _MODELS[name] = build(name)
    return _MODELS[name]


def eos_of(m) -> list[int]:
    e = m.config.eos_token_id
    return sorted(e) if isinstance(e, list) else [e]


def private_cache_logits_fn(m, prompt):
    """Each prefix decoded alone through the model's own cache (a fresh one per prefix, explicit positions as
    ``generate`` passes them): the model's cached numerics, with nothing shared between branches."""

    @torch.no_grad()
    def fn(prefixes):
        rows = []
        for p in prefixes:
            cache = transformers.DynamicCache(config=m.config)
            out = m(input_ids=torch.tensor([list(prompt)]), cache=cache, use_cache=True,
                    position_ids=torch.arange(len(prompt))[None])
            for i, t in enumerate(p):
                out = m(input_ids=torch.tensor([[t]]), cache=cache, use_cache=True,
                        position_ids=torch.tensor([[len(prompt) + i]]))
            rows.append(out.logits[0, -1].numpy())
        return np.stack(rows)

    return fn


def no_cache_logits_fn(m, prompt):
    @torch.no_grad()
    def fn(prefixes):
        return np.stack([m(input_ids=torch.tensor([list(prompt) + list(p)]), use_cache=False).logits[0, -1].numpy()
                         for p in prefixes])

    return fn


@pytest.mark.parametrize("name", list(FAMILIES))
def test_per_row_exact_on_every_family(name):
    m = model(name)
    eos = eos_of(m)
    be = TransformersModel(m, None, prompt=PROMPT, strategy="per-row")
    assert "121 nodes" in be.self_check_details["per-row"]
    private = canopy_rs.exact(private_cache_logits_fn(m, PROMPT), vocab_size=V, eos_token_ids=eos, **POLICY)
    for kwargs in (dict(batch_size=5, order="breadth-first"), dict()):
        res = canopy_rs.exact(be, **kwargs, **POLICY)
        assert_results_equal(res, private, tol=1e-9, corr_tol=1e-7)
        assert be.counters()["tokens_per_expanded_node"] == pytest.approx(1.0)
    full = canopy_rs.exact(no_cache_logits_fn(m, PROMPT), vocab_size=V, eos_token_ids=eos, **POLICY)
    assert_results_equal(res, full, tol=1e-8, corr_tol=1e-7)
    assert private.num_internal_nodes > 20  # a real branching canopy, not a chain


@pytest.mark.parametrize("name", list(FAMILIES))
def test_auto_chooses_the_cheapest_checked_strategy(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        be = TransformersModel(model(name), None, prompt=PROMPT)
    assert be.strategy == FAMILIES[name][3], be.strategy_reason
    assert be.strategy in be.self_check_details


def _layer_types(m) -> set[str]:
    return {type(layer).__name__ for layer in cache_ops.new_cache(m).layers}


def test_the_families_cover_every_declared_layer_type():
    seen: set[str] = set()
    for name in FAMILIES:
        if hasattr(transformers, FAMILIES[name][0]):
            seen |= _layer_types(model(name))
    assert set(cache_ops.LAYER_RULES) <= seen, set(cache_ops.LAYER_RULES) - seen


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _prefilled(m, rows: int = 1):
    runner = ModelRunner(m)
    cache = cache_ops.new_cache(m)
    ids = torch.tensor([PROMPT] * rows)
    with torch.inference_mode():
        runner(ids, cache, position_ids=torch.arange(len(PROMPT))[None].expand(rows, -1))
    return runner, cache


@pytest.mark.parametrize("name", ["llama", "mistral-sliding", "lfm2-short-conv", "falcon-h1", "nemotron-h",
                                  "deepseek-v32-indexed", "inkling-sliding-hybrid"])
def test_row_copies_share_no_storage(name):
    m = model(name)
    _, cache = _prefilled(m, rows=2)
    copy = cache_ops.select_cache_rows(cache, torch.tensor([1, 1, 0]))
    source = {t.untyped_storage().data_ptr() for layer in cache.layers for t in _tensors(vars(layer)) if t.numel()}
    for i, layer in enumerate(copy.layers):
        assert type(layer) is type(cache.layers[i]) and vars(layer).keys() == vars(cache.layers[i]).keys()
        for t in _tensors(vars(layer)):
            assert not t.numel() or t.untyped_storage().data_ptr() not in source, f"layer {i} shares a tensor"
        for name_, value in vars(layer).items():
            if isinstance(value, (dict, list)):
                assert value is not vars(cache.layers[i])[name_], f"layer {i}.{name_} is the same container"
    joined = cache_ops.concat_caches([copy, cache_ops.select_cache_rows(cache, torch.tensor([0]))])
    for layer in joined.layers:
        for name_, rule in cache_ops.LAYER_RULES[type(layer).__name__].items():
            for t in _tensors(vars(layer).get(name_)):
                if rule == cache_ops.ROWS and t.ndim:
                    assert t.shape[0] == 4


def test_unknown_layer_state_is_refused_by_name():
    _, cache = _prefilled(model("lfm2-short-conv"))
    cache.layers[0].tokens_seen = torch.zeros(())  # state a future transformers might add
    with pytest.raises(CacheLayoutUnsupported, match="tokens_seen"):
        cache_ops.select_cache_rows(cache, torch.tensor([0]))
    _, cache = _prefilled(model("llama"))
    cache.layers[1] = transformers.cache_utils.StaticLayer(max_cache_len=16)
    with pytest.raises(CacheLayoutUnsupported, match="StaticLayer"):
        cache_ops.select_cache_rows(cache, torch.tensor([0]))

    class MyLayer(transformers.cache_utils.DynamicLayer):  # a subclass may hold more state: not trusted by name
        pass

    _, cache = _prefilled(model("llama"))
    cache.layers[0].__class__ = MyLayer
    with pytest.raises(CacheLayoutUnsupported, match="MyLayer"):
        cache_ops.select_cache_rows(cache, torch.tensor([0]))


def test_joining_caches_of_different_lengths_is_refused():
    m = model("mistral-sliding")
    runner, cache = _prefilled(m)
    a = cache_ops.select_cache_rows(cache, torch.tensor([0]))
    b = cache_ops.select_cache_rows(cache, torch.tensor([0]))
    with torch.inference_mode():
        runner(torch.tensor([[7]]), b, position_ids=torch.tensor([[len(PROMPT)]]))
    with pytest.raises(CacheLayoutUnsupported, match="differs between the caches"):
        cache_ops.concat_caches([a, b])


@pytest.mark.parametrize(
    "cfg_name, model_name, extra, match",
    [
        ("RwkvConfig", "RwkvForCausalLM", {}, "takes no cache argument"),
        ("xLSTMConfig", "xLSTMForCausalLM", {}, "cache class of its own"),
        ("MiniMaxConfig", "MiniMaxForCausalLM",
         dict(layer_types=["linear_attention", "full_attention"], num_local_experts=2, num_experts_per_tok=1, head_dim=8),
         "cache class of its own"),
        # Keeps its recurrent state on the modules, not in the cache: the self-check sees the branches mix.
        ("RecurrentGemmaConfig", "RecurrentGemmaForCausalLM",
         dict(lru_width=32, block_types=["recurrent", "attention"], attention_window_size=16, head_dim=8),
         r"per-row: startup self-check failed: per-row logits differ from full recomputation by \d"),
        # Sparse attention over 4 keys: transformers' cached decoding itself differs from recomputation.
        ("DeepseekV32Config", "DeepseekV32ForCausalLM", {**FAMILIES["deepseek-v32-indexed"][2], "index_topk": 4},
         r"per-row logits differ from full recomputation by \d"),
    ],
)
def test_models_no_strategy_can_branch_are_refused(cfg_name, model_name, extra, match):
    if not hasattr(transformers, cfg_name):
        pytest.skip(f"transformers without {cfg_name}")
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_name)(**{**BASE, **extra})
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    m = getattr(transformers, model_name)(cfg).eval().double()
    with pytest.raises(StrategyUnsupportedError, match=match) as err:
        TransformersModel(m, None, prompt=PROMPT)
    assert "logits_fn" in str(err.value)  # says what still works


def test_self_check_fails_closed_on_a_leak(monkeypatch):
    """Forwarding rows without their positions (the bug that made hybrid models wrong) is caught at startup:
    the per-row strategy is refused, with the deviation."""
    real_call = ModelRunner.__call__

    def without_positions(self, input_ids, cache, **kw):
        if cache is not None and input_ids.shape[1] == 1:
            kw.pop("position_ids", None)
        return real_call(self, input_ids, cache, **kw)

    monkeypatch.setattr(ModelRunner, "__call__", without_positions)
    with pytest.raises(StrategyUnsupportedError, match=r"per-row logits differ from full recomputation by \d.*tolerance 1e-06"):
        TransformersModel(model("bamba"), None, prompt=PROMPT, strategy="per-row")


def test_self_check_tree_exercises_copies_joins_and_compaction(monkeypatch):
    joins, compactions, depths, batches = [], [], set(), []
    real_concat, real_compact, real_expand = per_row.concat_caches, per_row.PerRowEngine._compact, per_row.PerRowEngine.expand

    def concat(caches):
        joins.append(len(caches))
        return real_concat(caches)

    def compact(self, cid):
        compactions.append(cid)
        return real_compact(self, cid)

    def expand(self, node_ids, parent_ids, tokens, d):
        depths.update(d.tolist())
        batches.append(len(set(d.tolist())))
        return real_expand(self, node_ids, parent_ids, tokens, d)

    monkeypatch.setattr(per_row, "concat_caches", concat)
    monkeypatch.setattr(per_row.PerRowEngine, "_compact", compact)
    monkeypatch.setattr(per_row.PerRowEngine, "expand", expand)
    TransformersModel(model("lfm2-short-conv"), None, prompt=PROMPT, strategy="per-row")
    assert CHECK_DEPTH >= 4 and CHECK_CHILDREN >= 3
    assert depths == set(range(1, CHECK_DEPTH + 1))
    assert max(joins) > 1 and compactions and max(batches) > 1  # joins, compaction, mixed-depth calls


# ------------------------------------------------------------------------------------------------------
# The context window


def test_context_window_is_refused_before_expansion():
    m = model("llama")  # max_position_embeddings = 128, prompt 5 tokens
    be = TransformersModel(m, None, prompt=PROMPT)
    assert be.context_length == 128 and be.context_source == "config.max_position_embeddings"
    be.check_max_new_tokens(123)  # 5 + 123 = 128 fits
    for run in (lambda: canopy_rs.exact(be, max_new_tokens=124, top_k=2),
                lambda: canopy_rs.bounded(be, budget=10, max_new_tokens=124, top_k=2),
                lambda: canopy_rs.sample(be, num_rollouts=2, max_new_tokens=124, top_k=2)):
        with pytest.raises(InvalidArgumentError, match=r"129 positions.*context window \(128, from "
                                                       r"config.max_position_embeddings\).*max_new_tokens <= 123.*context_length"):
            run()
    assert be.counters()["rows_evaluated"] == 0  # refused before any expansion
    wide = TransformersModel(m, None, prompt=PROMPT, context_length=4096, self_check=False)
    wide.check_max_new_tokens(124)
    assert wide.with_prompt([1, 2]).context_length == 4096
    with pytest.raises(InvalidArgumentError, match=r"prompt \(128 tokens\) fills the model's context window"):
        TransformersModel(m, None, prompt=[1] * 128)
    with pytest.raises(InvalidArgumentError, match="context_length"):
        TransformersModel(m, None, prompt=PROMPT, context_length=0)
    # A state-space model declares no window: nothing to refuse.
    with pytest.warns(RuntimeWarning, match="per-row"):
        ssm = TransformersModel(build("mamba", max_position_embeddings=None), None, prompt=PROMPT)
    assert ssm.context_length is None
    ssm.check_max_new_tokens(10**6)
