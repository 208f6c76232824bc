"""Peak memory of exact enumeration: streaming (depth-first, the default) vs the arena (``streaming=False``),
and one canopy split into shards, on a plain Python callable model.

The model: vocabulary 8, EOS id 0, top-k 4; each node's logits row is a row of a fixed random pool chosen by
the hash of its prefix. Each configuration runs in a fresh subprocess, which reports its peak resident set
(VmHWM from /proc/self/status, so the Rust arena counts) before and after the enumeration.

    python benches/bench_streaming.py [--depths 10 11 12 13] [--json benches/results/bench_streaming.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
import numpy as np
import canopy_rs

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0

depth, mode = int(sys.argv[1]), sys.argv[2]
pool = np.random.default_rng(0).normal(0.0, 1.5, size=(4096, 8))
model = lambda prefixes: pool[[hash(tuple(p)) % 4096 for p in prefixes]]
kw = dict(vocab_size=8, eos_token_ids=[0], max_new_tokens=depth, top_k=4, batch_size=256, max_nodes=10**10)
before = hwm()
t0 = time.perf_counter()
if mode == "shards":
    from canopy_rs.drivers.shards import finish, merge_partials, run_shard, split_canopy
    kw.pop("max_nodes")
    head, shards = split_canopy(model, depth=2, **kw)
    res = finish(merge_partials([head] + [run_shard(model, s, **kw) for s in shards]))
else:
    res = canopy_rs.exact(model, streaming=(mode == "streaming"), **kw)
print(json.dumps({"depth": depth, "mode": mode, "ce_star": res.ce_star, "internal_nodes": res.num_internal_nodes,
                  "leaves": res.num_leaves, "seconds": time.perf_counter() - t0, "hwm_before": before,
                  "hwm_after": hwm()}))
"""


def run(depth: int, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(depth), mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[10, 11, 12])
    ap.add_argument("--modes", nargs="+", default=["arena", "streaming", "shards"])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    print(f"{'depth':>5} {'mode':>9} {'internal':>11} {'seconds':>8} {'peak MB':>8} {'+run MB':>8} {'CE*':>20}")
    for d in args.depths:
        for m in args.modes:
            r = run(d, m)
            rows.append(r)
            mb = 1 << 20
            print(f"{d:>5} {m:>9} {r['internal_nodes']:>11,} {r['seconds']:>8.1f} {r['hwm_after'] / mb:>8.1f} "
                  f"{(r['hwm_after'] - r['hwm_before']) / mb:>8.1f} {r['ce_star']:>20.15f}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                     "python": sys.version.split()[0]},
                                         "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
