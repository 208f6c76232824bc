"""Engine throughput on precomputed logits (no model): the Rust canopy engine vs a level-vectorised numpy
implementation of the same expansion, side by side in one run.

Each node's logits row is a row of a fixed random pool, chosen by a rolling hash of its prefix, so both
implementations expand the same tree and must agree on CE*. Reported per vocabulary size: nodes/s, GB/s of
logits consumed by the engine (bytes ingested / time inside the engine), and the end-to-end speedup
(both sides include the same row gather from the pool).

    python benches/bench_engine.py [--quick] [--json benches/results/bench_engine.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

import canopy_rs
from canopy_rs._core import Tree

HASH_MUL = 1_000_003


def child_keys(parent_keys: np.ndarray, tokens: np.ndarray, pool_size: int) -> np.ndarray:
    return (parent_keys * HASH_MUL + tokens + 1) % pool_size


def run_engine(pool: np.ndarray, eos: list[int], t: int, top_k: int, temperature: float, batch: int) -> dict:
    v = pool.shape[1]
    tree = Tree(v, eos, t, canopy_rs.Policy(temperature, top_k, 1.0), order="depth-first", max_nodes=50_000_000)
    keys = np.zeros(1 << 16, dtype=np.int64)
    ingest_s = 0.0
    bytes_in = 0
    start = time.perf_counter()
    while not tree.is_done:
        ids, parents, tokens, _ = tree.next_batch(batch)
        if ids.max() >= len(keys):
            keys = np.resize(keys, max(2 * len(keys), int(ids.max()) + 1))
        k = np.zeros(len(ids), dtype=np.int64) if parents[0] < 0 else child_keys(keys[parents], tokens, len(pool))
        keys[ids] = k
        logits = pool[k]
        t0 = time.perf_counter()
        tree.ingest_logits(logits)
        ingest_s += time.perf_counter() - t0
        bytes_in += logits.nbytes
        tree.take_released()
    total = time.perf_counter() - start
    r = tree.result()
    return {"ce_star": r["ce_star"], "nodes": r["num_internal_nodes"], "seconds": total, "engine_seconds": ingest_s, "bytes": bytes_in}


def run_numpy(pool: np.ndarray, eos: list[int], t: int, top_k: int, temperature: float, chunk: int) -> dict:
    """Level by level: gather the level's rows, top-k by partition, softmax over the kept set, entropy,
    children by nonzero, leaves folded into sums. float64 like the engine."""
    v = pool.shape[1]
    is_eos = np.zeros(v, dtype=bool)
    is_eos[eos] = True
    keys = np.zeros(1, dtype=np.int64)
    log_reach = np.zeros(1)
    ce = 0.0
    nodes = 0
    start = time.perf_counter()
    for depth in range(t):
        next_keys, next_lr = [], []
        for a in range(0, len(keys), chunk):
            k, lr = keys[a : a + chunk], log_reach[a : a + chunk]
            x = pool[k].astype(np.float64)
            thr = -np.partition(-x, top_k - 1, axis=1)[:, top_k - 1 : top_k]
            keep = x >= thr
            z = np.where(keep, x / temperature, -np.inf)
            m = z.max(axis=1, keepdims=True)
            logq = z - (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))
            q = np.exp(logq)
            h = -(q * np.where(keep, logq, 0.0)).sum(axis=1)
            ce += float((np.exp(lr) * h).sum())
            nodes += len(k)
            rows, cols = np.nonzero(keep)
            child_lr = lr[rows] + logq[rows, cols]
            internal = ~is_eos[cols] if depth + 1 < t else np.zeros(len(cols), dtype=bool)
            next_keys.append(child_keys(k[rows[internal]], cols[internal], len(pool)))
            next_lr.append(child_lr[internal])
        keys = np.concatenate(next_keys) if next_keys else np.zeros(0, dtype=np.int64)
        log_reach = np.concatenate(next_lr) if next_lr else np.zeros(0)
        if len(keys) == 0:
            break
    return {"ce_star": ce, "nodes": nodes, "seconds": time.perf_counter() - start}


CASES = [
    # vocab, top_k, depth, pool rows, engine batch
    (32, 4, 10, 4096, 4096),
    (1_000, 4, 7, 4096, 1024),
    (32_000, 4, 6, 256, 128),
]
QUICK_CASES = [(32, 4, 7, 1024, 1024), (1_000, 3, 5, 512, 256), (32_000, 2, 5, 64, 32)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small trees (a smoke run)")
    ap.add_argument("--repeats", type=int, default=3, help="best of N timings per side")
    ap.add_argument("--json", default="benches/results/bench_engine.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for v, top_k, t, pool_rows, batch in QUICK_CASES if args.quick else CASES:
        pool = rng.normal(0.0, 3.0, size=(pool_rows, v)).astype(np.float32)
        eos = [0]
        eng = min((run_engine(pool, eos, t, top_k, 1.0, batch) for _ in range(args.repeats)), key=lambda r: r["seconds"])
        ref = min((run_numpy(pool, eos, t, top_k, 1.0, batch) for _ in range(args.repeats)), key=lambda r: r["seconds"])
        assert eng["nodes"] == ref["nodes"], (eng["nodes"], ref["nodes"])
        assert abs(eng["ce_star"] - ref["ce_star"]) <= 1e-9 * max(1.0, ref["ce_star"]), (eng["ce_star"], ref["ce_star"])
        rows.append(
            {
                "vocab": v,
                "top_k": top_k,
                "depth": t,
                "internal_nodes": eng["nodes"],
                "engine_nodes_per_s": eng["nodes"] / eng["seconds"],
                "engine_gb_per_s": eng["bytes"] / eng["engine_seconds"] / 1e9,
                "numpy_nodes_per_s": ref["nodes"] / ref["seconds"],
                "speedup": ref["seconds"] / eng["seconds"],
                "engine_seconds": eng["seconds"],
                "numpy_seconds": ref["seconds"],
                "ce_star": eng["ce_star"],
            }
        )
    print(f"{'vocab':>7} {'top_k':>5} {'depth':>5} {'nodes':>9} {'engine nodes/s':>15} {'engine GB/s':>11} "
          f"{'numpy nodes/s':>14} {'speedup':>8}")
    for r in rows:
        print(f"{r['vocab']:>7} {r['top_k']:>5} {r['depth']:>5} {r['internal_nodes']:>9,} {r['engine_nodes_per_s']:>15,.0f} "
              f"{r['engine_gb_per_s']:>11.2f} {r['numpy_nodes_per_s']:>14,.0f} {r['speedup']:>7.1f}x")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.machine(), "cpus": os.cpu_count(), "canopy_rs": canopy_rs.__version__}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
