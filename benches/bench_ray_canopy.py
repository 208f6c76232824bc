"""One canopy on a local Ray (``ray.init(num_cpus=2)``): 1 worker vs 2, side by side in alternating order,
against the single-process run, for the plain Python callable model of ``bench_streaming.py`` (vocabulary 8,
top-k 4) and the tests' tiny Llama (``tests/tiny_models.py``, one torch thread per process); each call's fixed
cost (actors started, model built there, the head split), and the driver's overhead per shard. Every row
records the load average (``os.getloadavg``) before and after it: on a shared machine a second worker is only
faster when a second core is free.

    python benches/bench_ray_canopy.py [--repeats 3] [--depth 12] [--llama-depth 11] [--json PATH]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import ray

import canopy_rs
from canopy_rs.drivers.ray_canopy import SHARDS_PER_WORKER, run_ray
from canopy_rs.drivers.shards import finish

TESTS = Path(__file__).resolve().parent.parent / "tests"


class HashModel:
    """Each node's logits: a row of a fixed random pool chosen by the hash of its prefix."""

    def __init__(self) -> None:
        self.pool = np.random.default_rng(0).normal(0.0, 1.5, size=(4096, 8))

    def __call__(self, prefixes):
        return self.pool[[hash(tuple(p)) % 4096 for p in prefixes]]


def llama_backend(path: str) -> Any:
    """The tiny Llama's backend, built where it runs (a Ray worker loads the model itself)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)  # one core per worker, as the single process gets
    return canopy_rs.TransformersModel(LlamaForCausalLM.from_pretrained(path), None, prompt=[2, 3, 4])


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def timed(fn: Callable[[], Any]) -> tuple[float, Any, list[float], list[float]]:
    before = load()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out, before, load()


def on_ray(model: Any, factory: Optional[Callable[[], Any]], kw: dict, workers: int, **extra: Any) -> Any:
    merged, complete = run_ray(model, dict(kw), model_factory=factory, num_workers=workers, **extra)
    assert complete
    return finish(merged)


def compare(name: str, local: Callable[[], Any], model: Any, factory: Optional[Callable[[], Any]], kw: dict,
            repeats: int) -> dict:
    """Single process, then 1 and 2 Ray workers in alternating order, ``repeats`` times; and the fixed cost
    of one Ray call (the same workers on a one-token canopy)."""
    rows = []
    ref = None
    for r in range(repeats):
        dt, res, l0, l1 = timed(local)
        ref = res
        rows.append({"mode": "local", "workers": 1, "seconds": dt, "ce_star": res.ce_star, "load_before": l0,
                     "load_after": l1})
        for workers in ((1, 2) if r % 2 == 0 else (2, 1)):
            dt, res, l0, l1 = timed(lambda: on_ray(model, factory, kw, workers))
            rows.append({"mode": "ray", "workers": workers, "seconds": dt, "ce_star": res.ce_star,
                         "rows_evaluated": res.info.rows_evaluated, "load_before": l0, "load_after": l1})
        print(f"  {name} repeat {r + 1}: " + ", ".join(f"{x['mode']}/{x['workers']} {x['seconds']:.1f} s"
                                                        for x in rows[-3:]), flush=True)
    fixed = {}
    for workers in (1, 2):
        dt, _, l0, l1 = timed(lambda: on_ray(model, factory, dict(kw, max_new_tokens=1), workers))
        fixed[workers] = {"seconds": dt, "load_before": l0, "load_after": l1}
    med = {key: statistics.median(x["seconds"] for x in rows if (x["mode"], x["workers"]) == key)
           for key in (("local", 1), ("ray", 1), ("ray", 2))}
    # float32 logits depend on the batch they were computed in: the Llama agrees to ~1e-6, not bit for bit.
    assert all(abs(x["ce_star"] - ref.ce_star) <= 1e-5 * max(1.0, abs(ref.ce_star)) for x in rows), "CE* differs"
    return {"model": name, "policy": kw, "internal_nodes": ref.num_internal_nodes, "rows": rows,
            "fixed_cost": fixed, "median_seconds": {f"{m}/{w}": v for (m, w), v in med.items()},
            "speedup_2_vs_1": med[("ray", 1)] / med[("ray", 2)],
            "speedup_2_vs_1_without_fixed_cost": (med[("ray", 1)] - fixed[1]["seconds"])
                                                 / max(1e-9, med[("ray", 2)] - fixed[2]["seconds"])}


def shard_overhead(kw: dict, repeats: int) -> dict:
    """The driver's cost per shard: one worker, few shards vs many on the same canopy,
    (t_many - t_few) / (shards_many - shards_few), median over repeats."""
    per = []
    runs = []
    for _ in range(repeats):
        got = {}
        for spw in (SHARDS_PER_WORKER, 128):
            shards = []
            dt, res, l0, l1 = timed(lambda: on_ray(HashModel(), None, kw, 1, shards_per_worker=spw,
                                                   progress=lambda b: shards.append(1)))
            n = len(shards) - 1  # one report after the head, one per shard
            got[spw] = (dt, n)
            runs.append({"shards_per_worker": spw, "shards": n, "seconds": dt, "rows_evaluated": res.info.rows_evaluated,
                         "load_before": l0, "load_after": l1})
        (t_few, n_few), (t_many, n_many) = got[SHARDS_PER_WORKER], got[128]
        per.append((t_many - t_few) / max(1, n_many - n_few))
    return {"policy": kw, "runs": runs, "seconds_per_shard": per, "median_seconds_per_shard": statistics.median(per)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--depth", type=int, default=12, help="the callable's max_new_tokens")
    ap.add_argument("--llama-depth", type=int, default=11, help="the tiny Llama's max_new_tokens (0: skip it)")
    ap.add_argument("--overhead-depth", type=int, default=9)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}})
    report: dict[str, Any] = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                              "date": time.strftime("%Y-%m-%d %H:%M"), "uptime_before": uptime(), "sections": []}
    try:
        kw = dict(vocab_size=8, eos_token_ids=[0], max_new_tokens=args.depth, top_k=4, batch_size=256,
                  max_nodes=10**10)
        print(f"callable, depth {args.depth}", flush=True)
        report["sections"].append(compare("callable", lambda: canopy_rs.exact(HashModel(), **kw), HashModel(), None,
                                          kw, args.repeats))
        if args.llama_depth:
            sys.path.insert(0, str(TESTS))
            import torch
            from tiny_models import make_tiny_model

            torch.set_num_threads(1)
            path = str(make_tiny_model(Path(os.environ.get("TMPDIR", "/tmp")) / "bench_ray_canopy_tiny_llama"))
            lkw = dict(max_new_tokens=args.llama_depth, top_k=4, max_nodes=10**10)
            print(f"tiny Llama, depth {args.llama_depth}", flush=True)
            report["sections"].append(compare("tiny-llama", lambda: canopy_rs.exact(llama_backend(path), **lkw), None,
                                              functools.partial(llama_backend, path), lkw, args.repeats))
        okw = dict(kw, max_new_tokens=args.overhead_depth)
        print(f"overhead per shard, callable depth {args.overhead_depth}", flush=True)
        report["shard_overhead"] = shard_overhead(okw, args.repeats)
    finally:
        ray.shutdown()
    report["uptime_after"] = uptime()
    print(report["uptime_before"])
    print(f"{'model':>11} {'nodes':>10} {'local s':>8} {'ray 1 s':>8} {'ray 2 s':>8} {'2 vs 1':>7} {'fixed 1/2 s':>12}")
    for s in report["sections"]:
        m, f = s["median_seconds"], s["fixed_cost"]
        print(f"{s['model']:>11} {s['internal_nodes']:>10,} {m['local/1']:>8.1f} {m['ray/1']:>8.1f} {m['ray/2']:>8.1f} "
              f"{s['speedup_2_vs_1']:>6.2f}x {f[1]['seconds']:>5.1f}/{f[2]['seconds']:<5.1f}")
    o = report["shard_overhead"]
    print(f"driver overhead per shard: {o['median_seconds_per_shard'] * 1e3:.1f} ms (median of {o['seconds_per_shard']})")
    print(report["uptime_after"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=float))


if __name__ == "__main__":
    main()
