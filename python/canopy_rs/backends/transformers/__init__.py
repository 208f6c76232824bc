"""The transformers backend: any causal LM plus a prompt, expanded with shared-prefix KV reuse.

    model = canopy_rs.TransformersModel(hf_model, tokenizer, prompt="...", chat=False)
    res = canopy_rs.exact(model, max_new_tokens=6, top_k=4)

Three expansion strategies (engines, :class:`._engine.KVEngine`) behind the
:class:`canopy_rs.protocol.Backend` interface; all forward exactly one token per expanded node after the
prompt:

* ``"cascade"`` (:mod:`.cascade`, :mod:`.attention`): the prompt KV is stored once and each expanded node
  owns one column of a KV arena; each query attends the prompt densely plus its own ancestors gathered by
  index, the two parts combined exactly through their log-sum-exps. Cost per node O(prompt + depth) and live
  KV = prompt + live nodes, whatever the canopy's size or order. Runs on every model whose attention modules
  dispatch through transformers' ``AttentionInterface`` (Llama, Qwen2/3, Mistral, Gemma 3, GPT-2, ...),
  sliding-window layers included (exact at any prompt + depth), whatever ``attn_implementation`` the model
  was loaded with (the prompt goes through it).
* ``"tree"`` (:mod:`.tree_attention`, the dense-mask reference): one flattened cache row; each forward feeds
  the batch with a custom 4D mask over every live column (cost per node O(prompt + live columns)). Needs
  ``"sdpa"`` or ``"eager"``; sliding-window models only while prompt + depth <= the window.
* ``"per-row"`` (:mod:`.per_row`): one cache row per expanded node, children gathered from their parents'
  rows (the prompt KV copied per row). Works for every model (linear-attention / recurrent, hybrid, flash).

``strategy="auto"`` takes the cheapest that passes a startup self-check (:mod:`.self_check`: logits of a
121-node branching tree vs full recomputation, run for every strategy considered, per-row included): cascade,
else dense tree attention, else per-row, with a warning and ``strategy_reason`` naming why each cheaper one was
rejected. A model no strategy passes is refused (:class:`canopy_rs.errors.StrategyUnsupportedError`).

Modules: :mod:`.model` (the backend class), :mod:`.runner` (the forward call, float32 head),
:mod:`.model_config` (vocabulary, EOS ids, context window), :mod:`.prompt` (prompt rendering),
:mod:`.cache_ops` (cache layouts and per-branch row copies), :mod:`.self_check`, and the engines
:mod:`._engine`, :mod:`.cascade` / :mod:`.attention`, :mod:`.tree_attention`, :mod:`.per_row`.

The decoding policy (temperature -> top-k -> top-p -> renormalise) runs where it is cheapest: on a GPU on the
model's device (:func:`canopy_rs.backends.torch_policy.policy_support_numpy`, float64 after top-k; the support rows cross
to the host in one transfer, the step's only synchronisation); on the CPU the float32 logits are handed to the Rust core zero-copy
(:class:`NextTokenLogits`). Reduced-precision models run their final norm and LM head in float32
(:class:`.runner.Float32Head`), so the logits, and the top-k sets, carry float32 rounding only.
"""

from canopy_rs.errors import KVBudgetExceededError, StrategyUnsupportedError, TreeAttentionUnsupported

from .model import STRATEGIES, TransformersModel

__all__ = [
    "TransformersModel",
    "STRATEGIES",
    "KVBudgetExceededError",
    "StrategyUnsupportedError",
    "TreeAttentionUnsupported",
]
