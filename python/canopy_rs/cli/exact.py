"""``canopy-rs exact``: enumerate the whole canopy (:func:`canopy_rs.exact`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from canopy_rs.cli._args import add_output_args, add_run_args, positive_int
from canopy_rs.cli._context import MAX_PLOTTED_PROMPTS, BracketProgress, PromptJob, RunContext
from canopy_rs.cli._format import exact_table, multi_exact_table

HELP = "exact CE*_max and its companions"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("exact", help=HELP,
                       description="Enumerate the whole canopy under the policy: exact CE*_max, E[N], H(N), "
                       "H(Y|N), entropy rate, GenPPL, branching factor, rho(N, r_N), truncation.")
    add_run_args(p)
    p.add_argument("--max-nodes", type=positive_int, default=10_000_000, help="refuse trees larger than this")
    p.add_argument("--order", choices=["depth-first", "breadth-first", "best-first"], default="depth-first")
    p.add_argument("--nodes", action="store_true", help="also write the per-node table (nodes.csv)")
    add_output_args(p, seed=False)
    p.set_defaults(func=run)


def exact_record(res: Any) -> dict[str, Any]:
    """A result's dict for a record, without the per-node arrays (those go to nodes.csv)."""
    d = res.to_dict()
    d.pop("nodes", None)
    return d


def exact_figures(exact: dict, stem: str) -> list[Path]:
    """The figures of one prompt's exact canopy: its length distribution and per-depth entropy."""
    from canopy_rs import plots as pl

    return pl.save_figure(pl.plot_length_distribution(exact), stem + "length") + pl.save_figure(
        pl.plot_entropy_by_depth(exact), stem + "entropy_by_depth"
    )


def run(ctx: RunContext) -> int:
    import canopy_rs
    from canopy_rs.estimators.pooling import pool_exact
    from canopy_rs.io import node_rows

    a: argparse.Namespace = ctx.args

    def one(job: PromptJob) -> tuple[dict, dict]:
        prog = BracketProgress(not ctx.show_progress, "canopy")
        try:
            res = canopy_rs.exact(job.backend, **ctx.policy(), batch_size=a.batch_size, max_nodes=a.max_nodes,
                                  order=a.order, return_nodes=a.nodes, progress=prog, progress_interval=0.25)
        finally:
            prog.close()
        tables = {"nodes": node_rows(res.nodes, job.index)} if a.nodes and res.nodes is not None else {}
        return {"exact": exact_record(res)}, tables

    records = ctx.run_prompts(one, nodes=a.nodes)
    exacts = [r["exact"] for r in records]
    pooled = pool_exact(exacts) if len(records) > 1 else None
    body = exact_table(exacts[0]) if pooled is None else multi_exact_table(records, pooled)

    def plots() -> list[Path]:
        return [f for r in records[:MAX_PLOTTED_PROMPTS]
                for f in exact_figures(r["exact"], ctx.plot_stem(r, len(records)))]

    result = ctx.result(records, {"exact": pooled} if pooled else None)
    return ctx.finish(records, result, ctx.header(records) + "\n\n" + body, plots)
