"""One canopy on a local Ray: 1 worker vs 2 (``ray.init(num_cpus=2)``) against the single-process run, on
the plain Python callable model of ``bench_streaming.py`` (vocabulary 8, top-k 4), and the driver's overhead
per shard.

    python benches/bench_ray_canopy.py [--depth 12] [--json benches/results/bench_ray_canopy.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import ray

import canopy_rs
from canopy_rs.drivers.ray_canopy import SHARDS_PER_WORKER, run_ray
from canopy_rs.drivers.shards import finish


class HashModel:
    """Each node's logits: a row of a fixed random pool chosen by the hash of its prefix."""

    def __init__(self) -> None:
        self.pool = np.random.default_rng(0).normal(0.0, 1.5, size=(4096, 8))

    def __call__(self, prefixes):
        return self.pool[[hash(tuple(p)) % 4096 for p in prefixes]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    kw = dict(vocab_size=8, eos_token_ids=[0], max_new_tokens=args.depth, top_k=4, batch_size=256)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}})
    rows = []
    t0 = time.perf_counter()
    one = canopy_rs.exact(HashModel(), max_nodes=10**10, **kw)
    rows.append({"mode": "local", "workers": 1, "seconds": time.perf_counter() - t0, "ce_star": one.ce_star})
    for workers in (1, 2, 1, 2):
        t0 = time.perf_counter()
        merged, _ = run_ray(HashModel(), dict(kw, max_nodes=10**10), num_workers=workers)
        res = finish(merged)
        rows.append({"mode": "ray", "workers": workers, "seconds": time.perf_counter() - t0, "ce_star": res.ce_star,
                     "shards": workers * SHARDS_PER_WORKER, "rows_evaluated": res.rows_evaluated})
    ray.shutdown()
    print(f"depth {args.depth}: {one.num_internal_nodes:,} internal nodes")
    print(f"{'mode':>6} {'workers':>7} {'seconds':>8} {'CE*':>20}")
    for r in rows:
        print(f"{r['mode']:>6} {r['workers']:>7} {r['seconds']:>8.1f} {r['ce_star']:>20.15f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                                         "date": time.strftime("%Y-%m-%d"), "depth": args.depth,
                                         "internal_nodes": one.num_internal_nodes, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
