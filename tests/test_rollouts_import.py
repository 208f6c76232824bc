"""Rollouts made elsewhere: transformers' ``generate`` (``Rollouts.from_generate``), vLLM's ``RequestOutput``s
(``Rollouts.from_vllm``; vLLM cannot be installed here, so the outputs are built with the shape vLLM documents:
``outputs[i].outputs[j].token_ids``, ``.logprobs`` as per-step ``{token_id: Logprob(logprob, rank,
decoded_token)}``, ``.finish_reason``) and ``canopy-rs sample --rollouts FILE``."""

from __future__ import annotations

import json
import math
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import canopy_rs
from canopy_rs._core import Policy, policy_support
from canopy_rs.errors import InvalidArgumentError
from canopy_rs.estimators import estimate
from canopy_rs.sampling import Rollouts, sample
from canopy_rs.testing import random_logits_fn

Logprob = namedtuple("Logprob", "logprob rank decoded_token")


# --- transformers generate ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_backend():
    pytest.importorskip("transformers")
    from tiny_models import tiny_llama, tiny_tokenizer

    hf, tok = tiny_llama(lm_head_scale=3.0), tiny_tokenizer()
    hf.eval()
    return hf, canopy_rs.TransformersModel(hf, tok, prompt="a b c", chat=False)


def _generate(hf, prompt_ids, m, seed, **policy):
    import torch

    torch.manual_seed(seed)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        return hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=5,
                           num_return_sequences=m, return_dict_in_generate=True, output_logits=True,
                           eos_token_id=0, pad_token_id=0, **policy)


def test_from_generate_matches_the_rust_policy_and_canopy_sample(tiny_backend) -> None:
    hf, backend = tiny_backend
    out = _generate(hf, backend.prompt_ids, 600, seed=0, top_k=4, temperature=1.0, top_p=1.0)
    ro = Rollouts.from_generate(out, max_new_tokens=5, eos_token_ids=[0], top_k=4)
    assert ro.policy == {"temperature": 1.0, "top_k": 4, "top_p": 1.0}
    # Lengths count the EOS; the padding generate writes after it is dropped.
    gen = out.sequences[:, -len(out.logits):].numpy()
    assert ro.eos.any() and (~ro.eos).any()
    for i in range(ro.num_rollouts):
        n = int(ro.lengths[i])
        assert list(ro.tokens[i, :n]) == list(gen[i, :n]) and (ro.tokens[i, n:] == -1).all()
        assert ro.eos[i] == (gen[i, n - 1] == 0) and (ro.eos[i] or n == 5)
        assert (ro.entropies[i, n:] == 0).all()
    # Each step's entropy and log q: the Rust policy on the same logits row.
    for i, t in ((0, 0), (1, 1), (5, 2), (7, 0)):
        if t >= ro.lengths[i]:
            continue
        row = out.logits[t][i:i + 1].float().numpy()
        off, toks, lps, h = policy_support(row, Policy(1.0, 4, 1.0))
        assert ro.entropies[i, t] == h[0]
        assert ro.logq[i, t] == lps[int(np.searchsorted(toks, gen[i, t]))]
    # The same statistics as canopy_rs.sample of the same model and policy (and the exact canopy).
    est, ref = estimate(ro), estimate(sample(backend, num_rollouts=600, max_new_tokens=5, top_k=4, seed=1))
    for f in ("ce_star", "expected_length", "entropy_rate"):
        a, b = getattr(est, f), getattr(ref, f)
        se = math.hypot(getattr(est, f + "_se"), getattr(ref, f + "_se"))
        assert abs(a - b) < 4 * se, (f, a, b, se)
    exact = canopy_rs.exact(backend, max_new_tokens=5, top_k=4)
    assert abs(est.ce_star - exact.ce_star) < 4 * est.ce_star_se
    assert abs(est.expected_length - exact.expected_length) < 4 * est.expected_length_se


def test_from_generate_refuses_another_policy_and_missing_logits(tiny_backend) -> None:
    hf, backend = tiny_backend
    out = _generate(hf, backend.prompt_ids, 200, seed=2, top_k=0, temperature=1.0)  # the full vocabulary
    with pytest.raises(InvalidArgumentError, match=r"outside the support of the policy.*top_k"):
        Rollouts.from_generate(out, max_new_tokens=5, eos_token_ids=[0], top_k=1)
    with pytest.raises(InvalidArgumentError, match="output_logits=True"):
        Rollouts.from_generate(SimpleNamespace(sequences=out.sequences, logits=None), max_new_tokens=5,
                               eos_token_ids=[0])
    with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
        Rollouts.from_generate(out, max_new_tokens=7, eos_token_ids=[0]) if (~Rollouts.from_generate(
            out, max_new_tokens=5, eos_token_ids=[0]).eos).any() else pytest.skip("every rollout ended")


# --- vLLM -----------------------------------------------------------------------------------------------

V, K, T = 7, 3, 4
EOS = [0]


def _vllm_outputs(ro: Rollouts, fn, k: int = K, extra_sampled: bool = True, finish=None):
    """vLLM-shaped RequestOutput of the rollouts ``ro``: per step the top-``k`` raw log-probabilities of
    ``fn`` (log_softmax of the whole row, as vLLM returns them) plus the sampled token's."""
    comps = []
    for i, toks in enumerate(ro.token_lists()):
        steps = []
        for t, tok in enumerate(toks):
            x = np.asarray(fn([toks[:t]])[0], dtype=np.float64)
            lp = x - np.logaddexp.reduce(x)
            order = np.argsort(-lp)
            d = {int(j): Logprob(float(lp[j]), r + 1, f"<{j}>") for r, j in enumerate(order[:k])}
            if extra_sampled and tok not in d:
                d[tok] = Logprob(float(lp[tok]), int(np.nonzero(order == tok)[0][0]) + 1, f"<{tok}>")
            steps.append(d)
        reason = finish or ("stop" if ro.eos[i] else "length")
        comps.append(SimpleNamespace(index=i, text="", token_ids=list(toks), cumulative_logprob=None, logprobs=steps,
                                     finish_reason=reason, stop_reason=None))
    return SimpleNamespace(request_id="0", prompt="p", prompt_token_ids=[1, 2], outputs=comps, finished=True)


def test_from_vllm_top_k_logprobs_give_the_policy_exactly() -> None:
    fn = random_logits_fn(V, seed=3, scale=1.5, eos_bias=-0.3)
    ro = sample(fn, num_rollouts=200, seed=0, vocab_size=V, eos_token_ids=EOS, max_new_tokens=T, top_k=K)
    got = Rollouts.from_vllm(_vllm_outputs(ro, fn), top_k=K, max_new_tokens=T, eos_token_ids=EOS)
    assert got.policy == {"temperature": 1.0, "top_k": K, "top_p": 1.0}
    assert np.array_equal(got.tokens, ro.tokens) and np.array_equal(got.lengths, ro.lengths)
    assert np.array_equal(got.eos, ro.eos)
    np.testing.assert_allclose(got.entropies, ro.entropies, rtol=0, atol=1e-9)
    np.testing.assert_allclose(got.logq, ro.logq, rtol=0, atol=1e-9)
    assert estimate(got).ce_star == pytest.approx(estimate(ro).ce_star, abs=1e-9)
    # A list of RequestOutputs gives one Rollouts per prompt.
    both = Rollouts.from_vllm([_vllm_outputs(ro, fn)] * 2, top_k=K, max_new_tokens=T, eos_token_ids=EOS)
    assert len(both) == 2 and np.array_equal(both[1].tokens, ro.tokens)


def test_from_vllm_refuses_what_the_logprobs_cannot_give() -> None:
    fn = random_logits_fn(V, seed=3, scale=1.5, eos_bias=-0.3)
    ro = sample(fn, num_rollouts=100, seed=0, vocab_size=V, eos_token_ids=EOS, max_new_tokens=T, top_k=K)
    out = _vllm_outputs(ro, fn)
    kw = dict(max_new_tokens=T, eos_token_ids=EOS)
    with pytest.raises(InvalidArgumentError, match="top_k=K"):
        Rollouts.from_vllm(out, top_k=None, **kw)
    with pytest.raises(InvalidArgumentError, match="temperature 1 and top-p 1"):
        Rollouts.from_vllm(out, top_k=K, temperature=0.7, **kw)
    with pytest.raises(InvalidArgumentError, match="temperature 1 and top-p 1"):
        Rollouts.from_vllm(out, top_k=K, top_p=0.9, **kw)
    with pytest.raises(InvalidArgumentError, match="fewer than top_k"):
        Rollouts.from_vllm(_vllm_outputs(ro, fn, k=2, extra_sampled=False), top_k=K, **kw)
    # Sampled from top-3 but judged as top-2: some sampled token lies outside the top 2 (support wider).
    with pytest.raises(InvalidArgumentError, match="not among the top 2"):
        Rollouts.from_vllm(out, top_k=2, **kw)
    with pytest.raises(InvalidArgumentError, match="stop string"):
        Rollouts.from_vllm(_vllm_outputs(ro, fn, finish="stop"), top_k=K, **kw)


# --- canopy-rs sample --rollouts FILE -------------------------------------------------------------------


def test_cli_sample_scores_rollouts_from_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from canopy_rs.cli import main

    fn = random_logits_fn(V, seed=3, scale=1.5, eos_bias=-0.3)
    ros = [sample(fn, num_rollouts=50, seed=s, vocab_size=V, eos_token_ids=EOS, max_new_tokens=T, top_k=K)
           for s in (0, 1)]
    path = tmp_path / "rollouts.jsonl"
    with open(path, "w") as f:
        for pid, ro in zip(("p0", "p1"), ros):
            d = ro.to_dict()
            for toks, ent, lq in zip(d["tokens"], d["entropies"], d["logq"]):
                f.write(json.dumps({"id": pid, "tokens": toks, "entropies": ent, "logq": lq}) + "\n")
    out = tmp_path / "out"
    assert main(["sample", "--rollouts", str(path), "--max-new-tokens", str(T), "--eos-token-ids", "0",
                 "--out", str(out), "--format", "json", "-q", "--no-plots"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [p["id"] for p in res["prompts"]] == ["p0", "p1"]
    for p, ro in zip(res["prompts"], ros):
        e = estimate(ro)
        assert p["estimate"]["ce_star"] == pytest.approx(e.ce_star, rel=1e-12)
        assert p["estimate"]["ce_star_surprisal"] == pytest.approx(e.ce_star_surprisal, rel=1e-12)
        assert p["estimate"]["num_rollouts"] == 50
    assert res["pooled"]["estimate"]["num_prompts"] == 2
    assert (out / "result.json").is_file() and (out / "rollouts.csv").is_file()

    # The table canopy-rs itself writes (rollouts.csv here; rollouts.parquet the same) scores the same.
    table = out / ("rollouts.parquet" if (out / "rollouts.parquet").is_file() else "rollouts.csv")
    assert main(["sample", "--rollouts", str(table), "--max-new-tokens", str(T), "--format", "json", "-q"]) == 0
    res2 = json.loads(capsys.readouterr().out)
    for p, ro in zip(res2["prompts"], ros):
        e = estimate(ro)
        for f in ("ce_star", "ce_star_se", "expected_length", "entropy_rate", "truncation_rate"):
            assert p["estimate"][f] == pytest.approx(getattr(e, f), rel=1e-9), f

    # Refusals: a rollout longer than the cap, a line without tokens, a model flag alongside.
    assert main(["sample", "--rollouts", str(path), "--max-new-tokens", "2", "--eos-token-ids", "0", "-q"]) == 2
    assert "--max-new-tokens" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"entropies": [0.1]}\n')
    assert main(["sample", "--rollouts", str(bad), "--eos-token-ids", "0", "-q"]) == 2
    assert "tokens" in capsys.readouterr().err
    assert main(["sample", "--rollouts", str(path), "--model", "x/y", "-q"]) == 2
    assert "--rollouts" in capsys.readouterr().err
