"""``canopy-rs sample``: Monte Carlo rollouts and the paper's per-prompt metrics, pooled over prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from canopy_rs.cli._args import DEFAULT_ROLLOUTS, add_output_args, add_ray_arg, add_run_args, positive_int
from canopy_rs.cli._context import MAX_PLOTTED_PROMPTS, PromptJob, RunContext
from canopy_rs.cli._rollouts_file import check_args, run_file
from canopy_rs.cli._format import estimate_table, multi_estimate_table
from canopy_rs.errors import InvalidArgumentError
from canopy_rs.estimators import estimate, estimate_best, pool
from canopy_rs.runs import rollout_rows
from canopy_rs.sampling import sample

HELP = "Monte Carlo rollouts and the paper's metrics"
# What the tables and plots read from a resumed record (a checkpoint without it is recomputed).
SAMPLE_SCHEMA = {"estimate": {"ce_star": (int, float), "num_rollouts": int}, "best": (dict, type(None)),
                 "rollouts": {"lengths": list, "entropy_rates": list}, "rollout_cost": dict}


def add_parser(sub: Any) -> None:
    p = sub.add_parser("sample", help=HELP,
                       description="Sample rollouts from the policy and report per-prompt estimates (CE* with "
                       "SE, GenPPL, branching factor, rho(N, r_N), truncation), pooled across prompts.")
    add_run_args(p)
    p.add_argument("--num-rollouts", type=positive_int, default=DEFAULT_ROLLOUTS, help=f"(default: {DEFAULT_ROLLOUTS})")
    p.add_argument("--rollouts", metavar="FILE",
                   help="score rollouts made elsewhere instead of sampling: JSONL (tokens, entropies, optional "
                        "logq and eos per line; id groups prompts) or the rollouts.parquet/.csv canopy-rs writes; "
                        "give the --max-new-tokens (and --eos-token-ids) they were drawn with")
    add_ray_arg(p, "the prompts are spread over them (one prompt runs on one worker)")
    add_output_args(p)
    p.set_defaults(func=run, prepare=prepare)


def prepare(args: Any) -> None:
    if args.rollouts:
        if args.ray is not None:
            raise InvalidArgumentError("--rollouts scores rollouts already made, which needs no model: drop --ray")
        check_args(args)


def sample_prompt(ctx: RunContext, job: PromptJob, num_rollouts: int) -> tuple[dict, list[dict]]:
    """Rollouts of one prompt and their estimates: the record part and the rollout table's rows."""
    ro = sample(job.backend, num_rollouts=num_rollouts, seed=job.seed, batch_size=ctx.args.batch_size,
                progress=ctx.show_progress, **ctx.policy())
    # Beside the paper's estimator: the one the estimator study recommends, given the model tokens (prompt
    # excluded, the cost unit of every table) the rollouts used.
    best = estimate_best(job.backend, budget=max(1, int(ro.cost.get("model_tokens", 1))), seed=job.seed,
                         batch_size=ctx.args.batch_size, **ctx.policy())
    rec = {
        "seed": job.seed,
        "estimate": estimate(ro).to_dict(),
        "best": best.to_dict(),
        "rollouts": {"lengths": ro.lengths.tolist(), "entropy_rates": ro.entropy_rates.tolist()},
        "rollout_cost": dict(ro.cost),
    }
    return rec, rollout_rows(ro, job.index, ctx.tokenizer)


def prompt_record(ctx: RunContext, job: PromptJob) -> tuple[dict, dict]:
    rec, rows = sample_prompt(ctx, job, ctx.args.num_rollouts)
    return rec, {"rollouts": rows}


def pool_estimates(records: list[dict]) -> dict[str, Any]:
    return pool([r["estimate"] for r in records]).to_dict()


def length_rate_figures(rec: dict, stem: str, exact: Any = None) -> list[Path]:
    """The (N, r_N) scatter of one prompt's rollouts (with the exact rho when ``exact`` is given)."""
    from canopy_rs import plots as pl  # imports matplotlib: only when drawing

    ro = rec["rollouts"]
    fig = pl.plot_length_rate(lengths=ro["lengths"], rates=ro["entropy_rates"], exact=exact)
    return pl.save_figure(fig, stem + "length_rate")


def run(ctx: RunContext) -> int:
    a = ctx.args
    if a.rollouts:
        return run_file(ctx, length_rate_figures)

    records = ctx.run_prompts(prompt_record, schema=SAMPLE_SCHEMA, num_rollouts=a.num_rollouts)
    pooled = pool_estimates(records) if len(records) > 1 else None
    head = ctx.header(records) + f"\nrollouts: {a.num_rollouts} per prompt, seed {a.seed} (+ prompt index)"
    body = estimate_table(records[0]["estimate"], best=records[0].get("best")) if pooled is None else multi_estimate_table(records, pooled)

    def plots() -> list[Path]:
        return [f for r in records[:MAX_PLOTTED_PROMPTS]
                for f in length_rate_figures(r, ctx.plot_stem(r, len(records)))]

    return ctx.finish(records, ctx.result(records, {"estimate": pooled} if pooled else None),
                      head + "\n\n" + body, plots)
