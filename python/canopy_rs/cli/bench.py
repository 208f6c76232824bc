"""``canopy-rs bench``: the repository's benches/ scripts, or a quick built-in engine throughput check."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from canopy_rs.api import exact
from canopy_rs.cli._args import positive_int
from canopy_rs.cli._context import RunContext
from canopy_rs.cli._format import format_table, num
from canopy_rs.errors import InvalidArgumentError
from canopy_rs.runs import dumps
from canopy_rs.testing import random_logits_fn

HELP = "run benches/ scripts or a quick engine throughput check"
BENCHES_ENV = "CANOPY_RS_BENCHES"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help=HELP,
                       description="With names, runs benches/bench_<name>.py (the scripts live in the source "
                       f"repository, not in the wheel: found with --dir, ${BENCHES_ENV}, or in ./benches or the "
                       "nearest folder above with a benches/); extra arguments after `--` are passed on. Without names (or with "
                       "--engine), a quick built-in throughput check of the engine on a synthetic model.")
    p.add_argument("names", nargs="*", help="bench names (e.g. engine bounds hf), or `all`")
    p.add_argument("--list", action="store_true", help="list the available benches")
    p.add_argument("--dir", help=f"the benches directory (default: ${BENCHES_ENV}, else ./benches or the nearest one above)")
    p.add_argument("--quick", action="store_true", help="pass --quick to the scripts (a smoke run)")
    p.add_argument("--engine", action="store_true", help="the built-in engine throughput check")
    p.add_argument("--vocab-size", type=positive_int, default=4096, help="engine check: vocabulary (default: 4096)")
    p.add_argument("--max-new-tokens", type=positive_int, default=6, help="engine check: depth (default: 6)")
    p.add_argument("--top-k", type=positive_int, default=6, help="engine check: top-k (default: 6)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=run)


def bench_candidates(given: Optional[str]) -> list[Path]:
    """Where bench scripts are looked for, in order."""
    if given:
        return [Path(given)]
    out = [Path(os.environ[BENCHES_ENV])] if os.environ.get(BENCHES_ENV) else []
    # A source checkout: ./benches, or the benches/ of the nearest folder above that has one (the installed
    # package's own location says nothing about where a checkout is).
    here = Path.cwd()
    out.append(here / "benches")
    return out + [p / "benches" for p in here.parents if (p / "benches").is_dir()][:1]


def find_benches(given: Optional[str]) -> tuple[Optional[Path], list[Path]]:
    """The first candidate directory holding ``bench_*.py`` scripts (or None) and every place looked at."""
    looked = bench_candidates(given)
    for d in looked:
        if d.is_dir() and any(d.glob("bench_*.py")):
            return d, looked
    return None, looked


def _not_found(looked: list[Path]) -> str:
    return (f"no bench scripts (bench_*.py) found; looked in {', '.join(str(p) for p in looked)}. They live in "
            f"the source repository's benches/ and are not installed with the wheel: run from a clone, or pass "
            f"--dir DIR (or set ${BENCHES_ENV}); `canopy-rs bench --engine` runs the built-in check")


def engine_check(vocab_size: int, max_new_tokens: int, top_k: int, progress: bool) -> dict[str, Any]:
    """Throughput of the engine alone on a synthetic model (hashed random logits)."""
    fn = random_logits_fn(vocab_size, seed=0, scale=2.0, eos_bias=-1.0)
    model_s = [0.0]

    def timed(prefixes: list[list[int]]) -> np.ndarray:
        t = time.perf_counter()
        out = fn(prefixes)
        model_s[0] += time.perf_counter() - t
        return out

    t = time.perf_counter()
    res = exact(timed, vocab_size=vocab_size, eos_token_ids=[0], max_new_tokens=max_new_tokens,
                top_k=top_k, progress=progress)
    wall = time.perf_counter() - t
    engine_s = max(wall - model_s[0], 1e-9)
    n = res.num_internal_nodes
    return {
        "vocab_size": vocab_size, "max_new_tokens": max_new_tokens, "top_k": top_k,
        "expanded_nodes": n, "leaves": res.num_leaves, "ce_star": res.ce_star,
        "wall_seconds": wall, "model_seconds": model_s[0], "engine_seconds": engine_s,
        "nodes_per_second": n / max(wall, 1e-9), "engine_nodes_per_second": n / engine_s,
        "engine_logits_gb_per_second": n * vocab_size * 4 / engine_s / 1e9,
    }


def run(ctx: RunContext) -> int:
    a = ctx.args
    d, looked = find_benches(a.dir)
    avail = sorted(p.stem[len("bench_"):] for p in d.glob("bench_*.py")) if d else []
    if a.list:
        if d is None:
            print(f"canopy-rs bench: {_not_found(looked)}", file=sys.stderr)
            return 1
        for n in avail:
            print(f"{n:12s} {d / f'bench_{n}.py'}")
        return 0
    if a.engine or not a.names:
        r = engine_check(a.vocab_size, a.max_new_tokens, a.top_k, ctx.show_progress)
        if a.format == "json":
            print(dumps(r))
        else:
            print(format_table(["engine check", "value"], [
                ["tree", f"V={r['vocab_size']}, top-k {r['top_k']}, depth {r['max_new_tokens']}"],
                ["expanded nodes / leaves", f"{r['expanded_nodes']:,} / {r['leaves']:,}"],
                ["CE*", num(r["ce_star"], 6)],
                ["wall seconds (model + engine)", num(r["wall_seconds"], 3)],
                ["nodes/s end to end", f"{r['nodes_per_second']:,.0f}"],
                ["nodes/s engine only", f"{r['engine_nodes_per_second']:,.0f}"],
                ["logits ingested GB/s", num(r["engine_logits_gb_per_second"], 2)],
            ]))
        if not a.names:
            return 0
    if d is None:
        raise InvalidArgumentError(_not_found(looked))
    names = avail if a.names == ["all"] else a.names
    missing = [n for n in names if n not in avail]
    if missing:
        raise InvalidArgumentError(f"unknown bench(es) {', '.join(missing)}; available: {', '.join(avail)}")
    rc = 0
    for n in names:
        cmd = [sys.executable, str(d / f"bench_{n}.py")] + (["--quick"] if a.quick else []) + list(ctx.extra)
        ctx.say("$ " + " ".join(cmd))
        rc = subprocess.call(cmd, cwd=str(d.parent)) or rc
    return rc
