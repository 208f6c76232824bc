"""``canopy-rs demo``: the whole pipeline on the embedded model: the exact canopy (best-first, recording the
bracket as it closes), Monte Carlo estimates beside it, a table and plots."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional

from canopy_rs.api import bounded
from canopy_rs.cli._args import DEFAULT_ROLLOUTS, add_output_args, add_run_args, positive_int
from canopy_rs.cli._context import MAX_PLOTTED_PROMPTS, BracketProgress, PromptJob, RunContext
from canopy_rs.cli._format import estimate_table, format_table, num
from canopy_rs.cli.exact import EXACT_SCHEMA, exact_figures, exact_record
from canopy_rs.cli.sample import SAMPLE_SCHEMA, length_rate_figures, pool_estimates, sample_prompt
from canopy_rs.errors import CanopyError, InvalidArgumentError
from canopy_rs.estimators.pooling import pool_exact

HELP = "the whole pipeline on the embedded model"
# Far above any demo-sized canopy: the best-first run is meant to finish exactly.
EXACT_BUDGET_NODES = 10_000_000


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help=HELP,
                       description="A chat prompt to the embedded SmolLM2-135M-Instruct: the exact canopy at "
                       "a small depth and top-k (best-first, recording the bracket as it closes), Monte Carlo "
                       "estimates beside it, a table and plots.")
    add_run_args(p)
    p.add_argument("--num-rollouts", type=positive_int, default=DEFAULT_ROLLOUTS, help=f"(default: {DEFAULT_ROLLOUTS})")
    p.add_argument("--quick", action="store_true", help="a smaller setting (max-new-tokens 3, top-k 3, 50 rollouts)")
    add_output_args(p, out_default="canopy_out")
    p.set_defaults(func=run, prepare=prepare)


def prepare(args: Any) -> None:
    """``--quick`` is a setting: applied while parsing, so the record, the resume key and the result's
    configuration all show the values used."""
    if args.quick:
        args.max_new_tokens, args.top_k, args.num_rollouts = min(args.max_new_tokens, 3), 3, min(args.num_rollouts, 50)


def exact_with_bracket(ctx: RunContext, backend: Any) -> tuple[Any, list[dict]]:
    """The exact canopy, expanded best-first in small batches so the certified bracket can be recorded as
    it closes (one pass: the same nodes an exact run expands)."""
    pol = ctx.policy()
    # The top-k cap gives a tight bracket; a tie at the k-th logit can make a support wider than top-k, and
    # then the run is redone with the vocabulary-sized (assumption-free) cap.
    for cap in ([pol["top_k"], None] if pol["top_k"] else [None]):
        prog = BracketProgress(not ctx.show_progress, "canopy", record=True)
        try:
            res = bounded(backend, budget=EXACT_BUDGET_NODES, **pol, order="best-first", support_cap=cap,
                                    batch_size=ctx.args.batch_size or 32, progress=prog, progress_interval=0.0)
        except CanopyError as e:
            if cap is None:
                raise
            ctx.say(f"support wider than top-k ({e}); recomputing with the vocabulary-sized bound")
            continue
        finally:
            prog.close()
        if not res.is_exact:  # pragma: no cover - the budget is far above any demo tree
            raise InvalidArgumentError("the canopy did not fit the budget; lower --max-new-tokens or --top-k")
        return res, prog.snapshots
    raise AssertionError("unreachable")


def _pooled_table(records: list[dict]) -> tuple[dict, list[str]]:
    ex = pool_exact([r["exact"] for r in records])
    est = pool_estimates(records)
    rows = [[label, num(ex[ek]), num(est[sk])] for label, ek, sk in (
        ("CE*_max", "ce_star", "ce_star"),
        ("E[N]", "expected_length", "expected_length"),
        ("GenPPL", "gen_ppl", "gen_ppl"),
        ("branching factor", "branching_factor", "branching_factor"),
        ("rho(N, r_N)", "length_rate_corr", "length_rate_pearson"),
    )]
    lines = ["", f"pooled over {len(records)} prompts:", format_table(["quantity", "exact", "MC estimate"], rows)]
    return {"exact": ex, "estimate": est}, lines


def prompt_record(ctx: RunContext, job: PromptJob) -> tuple[dict, dict]:
    t = time.perf_counter()
    res, traj = exact_with_bracket(ctx, job.backend)
    ex = exact_record(res)
    ex["seconds"] = time.perf_counter() - t
    rec, rows = sample_prompt(ctx, job, ctx.args.num_rollouts)
    rec.update(exact=ex, bracket_trajectory=traj)
    return rec, {"rollouts": rows}


def run(ctx: RunContext) -> int:
    a = ctx.args
    records = ctx.run_prompts(prompt_record, schema={"exact": EXACT_SCHEMA, **SAMPLE_SCHEMA}, num_rollouts=a.num_rollouts,
                              demo=True)
    r0 = records[0]
    ex, est = r0["exact"], r0["estimate"]
    cost = r0.get("rollout_cost", {})
    # One cost unit throughout: model tokens forwarded, the prompt excluded (``model_tokens``).
    lines = [ctx.header(records),
             f"exact canopy: {ex['num_internal_nodes']:,} expanded nodes, {ex['num_leaves']:,} leaves, "
             f"{int(ex.get('model_tokens', 0)):,} model tokens, {num(ex.get('seconds'), 1)} s",
             f"Monte Carlo: {est['num_rollouts']} rollouts (seed {r0.get('seed')}), "
             f"{int(cost.get('model_tokens', 0)):,} model tokens, {num(cost.get('seconds'), 1)} s",
             f"best estimator for a budget of {r0['best']['budget']:,} model tokens: {r0['best']['estimator']} "
             f"({r0['best']['description']}), {int(r0['best']['cost'].get('model_tokens', 0)):,} model tokens"
             if r0.get("best") else "",
             "(model tokens: tokens run through the model, the prompt excluded)",
             "", estimate_table(est, ex, r0.get("best")), "",
             f"H(N) = {num(ex['length_entropy'])}  H(Y|N) = {num(ex['content_entropy'])}  "
             f"exp(CE*) = {math.exp(ex['ce_star']):.1f} effective leaves  "
             f"(CE* = E[N]E[r_N] + Cov(N, r_N) = {num(ex['length_driven'])} {ex['length_rate_cov']:+.4f})"]
    pooled: Optional[dict] = None
    if len(records) > 1:
        pooled, more = _pooled_table(records)
        lines += more

    def plots() -> list[Path]:
        from canopy_rs import plots as pl  # imports matplotlib: only when drawing

        files: list[Path] = []
        for r in records[:MAX_PLOTTED_PROMPTS]:
            stem = ctx.plot_stem(r, len(records))
            files += exact_figures(r["exact"], stem)
            files += length_rate_figures(r, stem, exact=r["exact"])
            if r.get("bracket_trajectory"):
                files += pl.save_figure(pl.plot_bracket_vs_budget(r["bracket_trajectory"], exact=r["exact"]),
                                        stem + "bracket")
        return files

    return ctx.finish(records, ctx.result(records, pooled), "\n".join(lines), plots)
