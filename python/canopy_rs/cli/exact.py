"""``canopy-rs exact``: enumerate the whole canopy (:func:`canopy_rs.exact`).

A canopy that cannot fit ends early with an error suggesting ``bound``: the node count is limited by
min(--max-nodes, --max-memory / bytes per node) and the live KV cache by --max-memory (a depth-first run
without --nodes streams, so its engine memory stays far below that; the node limit then bounds the work),
and when the policy
allows a canopy beyond that limit, a few short rollouts first estimate its size
(:func:`canopy_rs.drivers.size_probe.check_canopy_size`)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Optional

from canopy_rs.api import exact
from canopy_rs.cli._args import add_output_args, add_ray_arg, add_run_args, byte_size, positive_int
from canopy_rs.cli._context import MAX_PLOTTED_PROMPTS, BracketProgress, PromptJob, RunContext
from canopy_rs.cli._format import exact_table, multi_exact_table
from canopy_rs.drivers.shards import finish
from canopy_rs.drivers.size_probe import SizeEstimate, check_canopy_size
from canopy_rs.errors import Interrupted, InvalidArgumentError, KVBudgetExceededError, TreeTooLargeError
from canopy_rs.estimators.pooling import pool_exact
from canopy_rs.runs import node_rows

HELP = "exact CE*_max and its companions"
DEFAULT_MAX_MEMORY = 4 << 30
# Engine memory per stored node (its arena entry and frontier share); with --nodes, the per-node arrays too.
NODE_BYTES = 64
# What the tables read from a resumed record's exact part (a checkpoint without it is recomputed).
EXACT_SCHEMA = {"ce_star": (int, float), "expected_length": (int, float), "num_internal_nodes": int,
                "num_leaves": int}


def add_parser(sub: Any) -> None:
    p = sub.add_parser("exact", help=HELP,
                       description="Enumerate the whole canopy under the policy: exact CE*_max, E[N], H(N), "
                       "H(Y|N), entropy rate, GenPPL, branching factor, rho(N, r_N), truncation. A canopy "
                       "that cannot fit in --max-nodes / --max-memory is refused early: use `bound`.")
    add_run_args(p)
    p.add_argument("--max-nodes", type=positive_int, default=10_000_000, help="refuse trees larger than this")
    p.add_argument("--max-memory", type=byte_size, default=DEFAULT_MAX_MEMORY, metavar="SIZE",
                   help="memory for the canopy and the model's live KV cache, e.g. 8G (default: 4G)")
    p.add_argument("--order", choices=["depth-first", "breadth-first", "best-first"], default="depth-first")
    p.add_argument("--nodes", action="store_true", help="also write the per-node table (nodes.csv)")
    add_ray_arg(p, "one prompt's canopy is split into shards run by Ray workers; several prompts are spread "
                   "over them", shards=True)
    add_output_args(p, seed=False)
    p.set_defaults(func=run)


def exact_record(res: Any) -> dict[str, Any]:
    """A result's dict for a record, without the per-node arrays (those go to nodes.csv)."""
    d = res.to_dict()
    d.pop("nodes", None)
    return d


def exact_figures(exact: dict, stem: str) -> list[Path]:
    """The figures of one prompt's exact canopy: its length distribution and per-depth entropy."""
    from canopy_rs import plots as pl  # imports matplotlib: only when drawing

    return pl.save_figure(pl.plot_length_distribution(exact), stem + "length") + pl.save_figure(
        pl.plot_entropy_by_depth(exact), stem + "entropy_by_depth"
    )


def kv_bytes_per_token(hf_model: Any) -> int:
    """Bytes of KV cache one token takes in ``hf_model`` (keys and values of every layer)."""
    cfg = getattr(hf_model.config, "get_text_config", lambda: hf_model.config)()
    heads = getattr(cfg, "num_attention_heads", 1)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    itemsize = next(hf_model.parameters()).element_size()
    return int(2 * cfg.num_hidden_layers * kv_heads * head_dim * itemsize)


def _too_large(why: str) -> str:
    return (f"the canopy cannot be enumerated: {why}. Use `canopy-rs bound` for a certified bracket within a "
            "budget, or lower --max-new-tokens / --top-k (or raise --max-nodes / --max-memory)")


def check_size(ctx: RunContext, backend: Any, node_limit: int) -> Optional[SizeEstimate]:
    """Refuses, early, a canopy far larger than ``node_limit`` nodes (:func:`check_canopy_size`), saying
    what it does and showing the probe's progress (it can take a while on a large model); returns what the
    probe saw."""
    try:
        probe = check_canopy_size(backend, node_limit=node_limit, batch_size=ctx.args.batch_size,
                                  progress=ctx.show_progress, status=ctx.say, **ctx.policy())
    except TreeTooLargeError as e:
        raise TreeTooLargeError(_too_large(f"{e} (--max-nodes, --max-memory)")) from None
    if probe is not None:
        ctx.say(f"size check: {probe.describe()}; enumerating (up to {node_limit:,})")
    return probe


def exact_on_ray(ctx: RunContext, job: PromptJob, options: dict[str, Any], limit: int,
                 probe: Optional[SizeEstimate]) -> Any:
    """One prompt's canopy as shards on Ray (:func:`canopy_rs.drivers.ray_canopy.run_ray`); each worker
    builds the prompt's backend once, from this run's arguments (the model is loaded there, not pickled)."""
    from canopy_rs.drivers.ray_canopy import run_ray  # imports ray: only for --ray

    a = ctx.args
    kw = dict(ctx.policy(), batch_size=a.batch_size, max_nodes=limit)
    # A shard is split again past a few times its share of the probe's estimate (one is not run, or gives
    # none, when the policy allows no canopy over the limit).
    estimate = None if probe is None else math.exp(min(probe.log_nodes, 700.0))
    prog = BracketProgress(not ctx.show_progress, "canopy")  # over the mass covered: shards return in any order
    try:
        merged, complete = run_ray(None, kw, model_factory=ctx.worker_backend_factory(job.prompt, options),
                                   ray_address=a.ray or None, size_estimate=estimate, progress=prog)
    finally:
        prog.close()
    res = finish(merged)
    if not complete:
        raise Interrupted(res)
    return res


def node_limit(args: argparse.Namespace) -> int:
    """The most nodes the run may reach: --max-nodes, and --max-memory over the bytes a node takes."""
    return min(args.max_nodes, args.max_memory // NODE_BYTES)


def backend_options(ctx: RunContext, model: Any) -> dict[str, Any]:
    """The live KV cache gets what the engine's nodes can leave of --max-memory."""
    a = ctx.args
    kv = max(a.max_memory - node_limit(a) * NODE_BYTES, a.max_memory // 2)
    return {"max_live_kv_tokens": max(1, kv // kv_bytes_per_token(model))}


def prompt_record(ctx: RunContext, job: PromptJob) -> tuple[dict, dict]:
    """One prompt's exact canopy (its shards on Ray with --ray and a single prompt)."""
    a = ctx.args
    limit = node_limit(a)
    probe = check_size(ctx, job.backend, limit)
    if a.ray is not None and not ctx.on_worker:
        res = exact_on_ray(ctx, job, backend_options(ctx, ctx.load()[0]), limit, probe)
        return {"exact": exact_record(res)}, {}
    prog = BracketProgress(not ctx.show_progress, "canopy")
    try:
        res = exact(job.backend, **ctx.policy(), batch_size=a.batch_size, max_nodes=limit,
                    order=a.order, return_nodes=a.nodes, progress=prog, progress_interval=0.25)
    except (TreeTooLargeError, KVBudgetExceededError) as e:
        seen = f" (size check: {probe.describe()})" if probe is not None and isinstance(e, TreeTooLargeError) else ""
        raise type(e)(_too_large(str(e).rstrip(".") + seen)) from None
    finally:
        prog.close()
    tables = {"nodes": node_rows(res.nodes, job.index)} if a.nodes and res.nodes is not None else {}
    return {"exact": exact_record(res)}, tables


def run(ctx: RunContext) -> int:
    a: argparse.Namespace = ctx.args
    if a.ray is not None and a.nodes:
        raise InvalidArgumentError("--nodes writes every node of one process's canopy: drop --ray (or --nodes)")
    records = ctx.run_prompts(prompt_record, backend_options=backend_options, schema={"exact": EXACT_SCHEMA}, nodes=a.nodes)
    exacts = [r["exact"] for r in records]
    pooled = pool_exact(exacts) if len(records) > 1 else None
    body = exact_table(exacts[0]) if pooled is None else multi_exact_table(records, pooled)

    def plots() -> list[Path]:
        return [f for r in records[:MAX_PLOTTED_PROMPTS]
                for f in exact_figures(r["exact"], ctx.plot_stem(r, len(records)))]

    result = ctx.result(records, {"exact": pooled} if pooled else None)
    return ctx.finish(records, result, ctx.header(records) + "\n\n" + body, plots)
