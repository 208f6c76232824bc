"""Benchmark the transformers backend: cascade vs dense-mask tree attention vs per-row caches.

Every section runs its strategies side by side in one process (the CPU here is shared, so compare ratios
within a run, not across runs) and writes one JSON file.

* ``scaling``: nodes/s and peak live KV vs canopy size (depth 6..10 at top-k 4, breadth-first: the order a
  GPU wants, and the worst case for live KV), per strategy, prompt 32 and 1,000 tokens. Runs other than
  cascade are time-capped (``bounded(..., Budget(seconds=...))`` in breadth-first order; marked ``partial``).
* ``ceiling``: the model's own limit: tokens/s of a plain batched decode step (F rows, one new token each, on
  a KV cache of the same context length) and expansion nodes/s divided by it (``efficiency``).
* ``batch``: nodes/s at several ``batch_size`` values and with none (the backend's ``preferred_batch_size``).
* ``precision`` (embedded SmolLM2 only): CE* and companions in float32 and bfloat16 per strategy.
* ``sample`` (GPU suite): ``canopy_rs.sample`` vs transformers' ``generate``, tokens/s.

Usage::

    python benches/bench_hf.py --suite cpu              # tiny Llama + embedded SmolLM2 (~15 min, 2-core CPU)
    python benches/bench_hf.py --suite gpu              # one shot on a GPU (< 8 min; random SmolLM2-135M config)
    python benches/bench_hf.py --suite gpu --device cpu --tiny   # check the GPU script on a CPU in seconds

Targets (docs/performance.md): cascade nodes/s at depth 10 >= 0.7x depth 8; prompt 1,000 >= 0.5x prompt 32; SmolLM2
fp32 >= 0.8x the plain-forward ceiling at depth 8, top-k 3; defaults within 20% of the best batch size;
GPU SmolLM2-135M bf16 depth 10 top-k 4 >= 300k nodes/s, sample() >= 1.5x generate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import transformers

import canopy_rs
from canopy_rs.backends.transformers import TransformersModel

TINY_LLAMA = dict(vocab_size=2000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
# SmolLM2-135M's architecture (random weights are enough for speed).
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, tie_word_embeddings=True,
                    rms_norm_eps=1e-5)
STRATEGIES = ("cascade", "tree", "per-row")


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def random_llama(cfg: dict, device: str, dtype: torch.dtype, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    c = transformers.LlamaConfig(max_position_embeddings=4096, eos_token_id=[2, 3], bos_token_id=1,
                                 initializer_range=0.05, **cfg)
    c._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(c).eval().to(device=device, dtype=dtype)


def make_prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    return [1] + np.random.default_rng(seed).integers(4, vocab, size=n - 1).tolist()


def backend(model, prompt, strategy, **kw) -> TransformersModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformersModel(model, None, prompt=prompt, strategy=strategy, self_check=False, **kw)


def expand_run(model, prompt, strategy, depth, top_k, *, device, cap_s=None, batch_size=None, order="breadth-first",
               eos=None) -> dict:
    """One canopy through one strategy: complete (``exact``) or time-capped (``bounded``, then partial)."""
    be = backend(model, prompt, strategy, **({} if eos is None else {"eos_token_ids": eos}))
    kw = dict(max_new_tokens=depth, top_k=top_k, batch_size=batch_size, order=order)
    sync(device)
    t = time.perf_counter()
    if cap_s is None:
        res = canopy_rs.exact(be, **kw)
        partial = False
    else:
        res = canopy_rs.bounded(be, budget=canopy_rs.Budget(seconds=cap_s), **kw)
        partial = not isinstance(res, canopy_rs.CanopyResult)
    sync(device)
    secs = time.perf_counter() - t
    c = be.counters()
    nodes = int(res.num_expanded if partial else res.num_internal_nodes)
    return {
        "strategy": strategy, "depth": depth, "top_k": top_k, "prompt_len": len(prompt), "order": order,
        "batch_size": batch_size if batch_size is not None else be.preferred_batch_size,
        "batch_size_given": batch_size is not None,
        "nodes": nodes, "seconds": secs, "nodes_per_s": nodes / secs, "partial": partial,
        "peak_live_kv_tokens": int(c["peak_live_kv_tokens"]), "kv_bytes_end": int(c["kv_bytes"]),
        "tokens_per_node_after_prompt": float(c["tokens_per_expanded_node"]),
        "model_calls": int(c["model_calls"]),
        "ce_star": None if partial else float(res.ce_star),
    }


@torch.inference_mode()
def plain_decode_ceiling(model, context: int, width: int, device: str, repeat: int = 3) -> dict:
    """tokens/s of transformers' own batched decode step: ``width`` rows, each one new token on a KV cache of
    ``context`` tokens (the prompt + depth a canopy node sees), no tree, no policy."""
    V = model.config.vocab_size
    ids = torch.tensor([make_prompt(context, V, seed=1)], device=device)
    cache = transformers.DynamicCache(config=model.config)
    model(input_ids=ids, cache=cache, use_cache=True)
    cache.batch_repeat_interleave(width)
    step = torch.randint(4, V, (width, 1), device=device)
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        model(input_ids=step, cache=cache, use_cache=True, logits_to_keep=1)
        sync(device)
        times.append(time.perf_counter() - t)
    best = min(times)
    return {"context": context, "width": width, "seconds_per_step": best, "tokens_per_s": width / best}


def section_scaling(name, model, prompts, depths, top_k, strategies, device, cap_s, full_cascade_depth) -> list[dict]:
    rows = []
    for P in prompts:
        prompt = make_prompt(P, model.config.vocab_size)
        for depth in depths:
            for strategy in strategies:
                cap = None if (strategy == "cascade" and depth <= full_cascade_depth) else cap_s
                try:
                    r = expand_run(model, prompt, strategy, depth, top_k, device=device, cap_s=cap)
                except (torch.OutOfMemoryError, MemoryError) as exc:  # per-row at a long prompt: record, go on
                    if torch.device(device).type == "cuda":
                        torch.cuda.empty_cache()
                    print(f"  {name} P={P} T={depth} {strategy}: {type(exc).__name__}", flush=True)
                    rows.append({"model": name, "strategy": strategy, "depth": depth, "top_k": top_k, "prompt_len": P,
                                 "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                    continue
                r["model"] = name
                rows.append(r)
                print_row(r)
    return rows


def section_ceiling(name, model, prompt_len, depth, top_k, device, width_cap) -> dict:
    prompt = make_prompt(prompt_len, model.config.vocab_size)
    r = expand_run(model, prompt, "cascade", depth, top_k, device=device)
    width = min(width_cap, max(1, round(r["nodes"] / r["model_calls"])))  # the expansion's mean rows per call
    ceil = plain_decode_ceiling(model, prompt_len + depth // 2, width, device)
    out = {"model": name, "expansion": r, "plain_decode": ceil, "efficiency": r["nodes_per_s"] / ceil["tokens_per_s"]}
    print(f"  ceiling {name} P={prompt_len} T={depth} k={top_k}: cascade {r['nodes_per_s']:.0f} nodes/s, plain decode "
          f"{ceil['tokens_per_s']:.0f} tok/s (width {width}, context {ceil['context']}) -> {out['efficiency']:.2f}x", flush=True)
    return out


def section_batch(name, model, prompt_len, depth, top_k, device, sizes) -> dict:
    prompt = make_prompt(prompt_len, model.config.vocab_size)
    runs = [expand_run(model, prompt, "cascade", depth, top_k, device=device, batch_size=b) for b in [None, *sizes]]
    best = max(runs, key=lambda r: r["nodes_per_s"])
    out = {"model": name, "runs": runs, "default_over_best": runs[0]["nodes_per_s"] / best["nodes_per_s"]}
    print(f"  batch sizes {name}: " + ", ".join(f"{r['batch_size']}{'' if r['batch_size_given'] else '(default)'}: "
                                              f"{r['nodes_per_s']:.0f}" for r in runs)
          + f" -> default/best {out['default_over_best']:.2f}", flush=True)
    return out


def section_precision(depth: int, top_k: int) -> list[dict]:
    """The embedded SmolLM2 (real weights), chat prompt: the canopy in float32 vs bfloat16 per strategy."""
    from canopy_rs.hf_models import load_model

    rows = []
    for dtype in ("float32", "bfloat16"):
        model, tok = load_model(dtype=dtype, device="cpu")
        for strategy in STRATEGIES:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                be = TransformersModel(model, tok, prompt="Write a haiku about the sea.", chat=True, strategy=strategy)
            t = time.perf_counter()
            res = canopy_rs.exact(be, max_new_tokens=depth, top_k=top_k)
            rows.append({"dtype": dtype, "strategy": strategy, "depth": depth, "top_k": top_k,
                         "head": be.runner.head.covers or "model dtype", "ce_star": res.ce_star,
                         "length_entropy": res.length_entropy, "expected_length": res.expected_length,
                         "nodes": res.num_internal_nodes, "seconds": time.perf_counter() - t})
            print(f"  precision {dtype:<8} {strategy:<8} CE*={res.ce_star:.6f} H(N)={res.length_entropy:.6f} "
                  f"E[N]={res.expected_length:.4f} nodes={res.num_internal_nodes}", flush=True)
        del model
    ref = {r["strategy"]: r for r in rows if r["dtype"] == "float32"}
    for r in rows:
        r["ce_star_minus_fp32"] = r["ce_star"] - ref[r["strategy"]]["ce_star"]
    return rows


@torch.inference_mode()
def section_sample(name, model, prompt_len, rollouts, tokens, top_k, device) -> dict:
    V = model.config.vocab_size
    prompt = make_prompt(prompt_len, V)
    out: dict[str, Any] = {"model": name, "rollouts": rollouts, "max_new_tokens": tokens, "top_k": top_k}
    eos = [0]  # token 0 is never drawn from the random prompt range: rollouts run to max_new_tokens mostly
    for strategy in ("cascade", "per-row"):
        be = backend(model, prompt, strategy, eos_token_ids=eos)
        sync(device)
        t = time.perf_counter()
        r = canopy_rs.sample(be, num_rollouts=rollouts, max_new_tokens=tokens, top_k=top_k, seed=0)
        sync(device)
        s = time.perf_counter() - t
        out[strategy] = {"seconds": s, "tokens": int(r.lengths.sum()), "tokens_per_s": float(r.lengths.sum()) / s}
    ids = torch.tensor([prompt], device=device).repeat(rollouts, 1)
    sync(device)
    t = time.perf_counter()
    g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=top_k, max_new_tokens=tokens,
                       min_new_tokens=tokens, eos_token_id=None, pad_token_id=0)
    sync(device)
    s = time.perf_counter() - t
    n = int((g.shape[1] - ids.shape[1]) * rollouts)
    out["generate"] = {"seconds": s, "tokens": n, "tokens_per_s": n / s}
    for k in ("cascade", "per-row"):
        out[k]["over_generate"] = out[k]["tokens_per_s"] / out["generate"]["tokens_per_s"]
    print(f"  sample {name}: " + ", ".join(f"{k} {out[k]['tokens_per_s']:.0f} tok/s" for k in ("cascade", "per-row", "generate")), flush=True)
    return out


def print_row(r: dict) -> None:
    ce = f"{r['ce_star']:.6f}" if r["ce_star"] is not None else "partial"
    print(f"  {r['model']:<18} P={r['prompt_len']:<5} T={r['depth']:<2} k={r['top_k']} {r['strategy']:<8} "
          f"nodes={r['nodes']:>7} {r['seconds']:>7.2f}s {r['nodes_per_s']:>9.0f} nodes/s peakKV={r['peak_live_kv_tokens']:>8} "
          f"rows/call={r['batch_size']:>5} CE*={ce}", flush=True)


def ratios(rows: list[dict], model: str) -> dict:
    """The two scaling targets from the cascade rows: depth 10 / depth 8 and prompt 1000 / prompt 32."""
    rate = {(r["prompt_len"], r["depth"]): r["nodes_per_s"] for r in rows
            if r["model"] == model and r["strategy"] == "cascade" and "error" not in r}
    out = {}
    for P in sorted({p for p, _ in rate}):
        if (P, 10) in rate and (P, 8) in rate:
            out[f"depth10_over_depth8_P{P}"] = rate[(P, 10)] / rate[(P, 8)]
    depths = sorted({d for _, d in rate})
    for d in depths:
        if (1000, d) in rate and (32, d) in rate:
            out[f"prompt1000_over_prompt32_T{d}"] = rate[(1000, d)] / rate[(32, d)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--device", default=None, help="default: cuda for --suite gpu, else cpu")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long version of the suite (checks the script)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the CPU here is shared)")
    ap.add_argument("--cap", type=float, default=None, help="seconds per time-capped run")
    ap.add_argument("--sections", default="llama,smollm2,precision",
                    help="CPU suite: which of llama, smollm2, precision to run (comma-separated)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if args.suite == "gpu" else "cpu")
    out_path = Path(args.out or Path(__file__).parent / "results" / f"bench_hf_{args.suite}{'_tiny' if args.tiny else ''}.json")
    t0 = time.perf_counter()
    report: dict[str, Any] = {"meta": {
        "suite": args.suite, "tiny": args.tiny, "device": device, "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
        "transformers": transformers.__version__, "canopy_rs": canopy_rs.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.device(device).type == "cuda" else None,
    }}

    def save() -> None:
        report["meta"]["seconds"] = time.perf_counter() - t0
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2))

    if args.suite == "cpu":
        tiny = args.tiny
        cap = args.cap or (2.0 if tiny else 15.0)
        sections = args.sections.split(",")
        scaling, targets = [], {}
        report["targets"] = targets
        if "llama" in sections:
            print("scaling: tiny Llama (2 x 64, vocab 2000), float32", flush=True)
            llama = random_llama(TINY_LLAMA, device, torch.float32)
            depths = (4, 5) if tiny else (6, 8, 10)
            scaling += section_scaling("tiny-llama", llama, (32, 1000) if not tiny else (8, 64), depths, 4, STRATEGIES, device,
                                       cap, full_cascade_depth=10)
            targets["tiny-llama"] = ratios(scaling, "tiny-llama")
            report["scaling"] = scaling
            save()
        # SmolLM2-135M is ~0.3 GFLOP per token: on the shared 2-core CPU its canopies stay small (depth <= 6).
        for dtype in (torch.float32, torch.bfloat16) if "smollm2" in sections else ():
            name = f"smollm2-135m-{str(dtype).split('.')[-1]}"
            print(f"scaling: SmolLM2-135M architecture (random weights), {dtype}", flush=True)
            smol = random_llama(SMOLLM2_135M, device, dtype)
            prompts = (8,) if tiny else ((32, 1000) if dtype == torch.float32 else (32,))
            scaling += section_scaling(name, smol, prompts, (3,) if tiny else (4, 5), 4, STRATEGIES, device, cap,
                                       full_cascade_depth=5)
            targets[name] = ratios(scaling, name)
            if dtype == torch.float32:
                report["ceiling"] = section_ceiling(name, smol, 8 if tiny else 32, 4 if tiny else 6, 3, device, 256)
                report["batch"] = section_batch(name, smol, 8 if tiny else 32, 3 if tiny else 6, 3, device,
                                                (16, 64) if tiny else (32, 96, 243))
            report["scaling"] = scaling
            save()
            del smol
        if "precision" in sections:
            print("precision: embedded SmolLM2-135M-Instruct, chat prompt", flush=True)
            try:
                report["precision"] = section_precision(3 if tiny else 5, 4)
            except Exception as exc:  # the embedded model is an optional install
                report["precision"] = {"skipped": f"{type(exc).__name__}: {exc}"}
    else:
        tiny = args.tiny
        cap = args.cap or (2.0 if tiny else 15.0)
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        cfg = dict(SMOLLM2_135M, num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=2000) if tiny else SMOLLM2_135M
        name = "smollm2-135m-random-bf16" if not tiny else "tiny-check"
        model = random_llama(cfg, device, dtype)
        print(f"GPU suite: {name} on {device}", flush=True)
        # Warm-up: kernels, allocator.
        expand_run(model, make_prompt(32, cfg["vocab_size"]), "cascade", 3, 4, device=device)
        scaling = section_scaling(name, model, (32, 1000) if not tiny else (8,), (6, 8, 10) if not tiny else (3, 4), 4,
                                  STRATEGIES, device, cap, full_cascade_depth=10)
        report["scaling"] = scaling
        report["targets"] = {name: ratios(scaling, name)}
        save()
        report["ceiling"] = section_ceiling(name, model, 32 if not tiny else 8, 8 if not tiny else 3, 4, device, 4096)
        report["batch"] = section_batch(name, model, 32 if not tiny else 8, 8 if not tiny else 3, 4, device,
                                        (1024, 2048, 4096, 8192) if not tiny else (16, 64))
        save()
        report["sample"] = section_sample(name, model, 32, 4096 if not tiny else 32, 32 if not tiny else 4, 50, device)
    save()
    print(f"\nwrote {out_path} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
