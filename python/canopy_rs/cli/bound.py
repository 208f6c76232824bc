"""``canopy-rs bound``: a certified bracket on CE*_max within a budget (:func:`canopy_rs.bounded`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from canopy_rs.api import bounded
from canopy_rs.cli._args import add_output_args, add_ray_arg, add_run_args, byte_size, positive_float, positive_int
from canopy_rs.cli._context import MAX_PLOTTED_PROMPTS, BracketProgress, PromptJob, RunContext
from canopy_rs.cli._format import format_table, num, short
from canopy_rs.cli.exact import exact_record
from canopy_rs.drivers.canopy import Budget
from canopy_rs.drivers.shards import finish
from canopy_rs.errors import InvalidArgumentError

HELP = "certified bracket on CE*_max within a budget"
DEFAULT_BUDGET_NODES = 1000


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bound", help=HELP,
                       description="Expand the canopy best-first until a budget is spent and report the "
                       "certified bracket [lower, upper] on CE*_max (the exact value if the tree fits).")
    add_run_args(p, max_new_tokens=8)
    g = p.add_argument_group("budget (at least one)")
    g.add_argument("--budget", type=positive_int, metavar="NODES", help=f"expanded nodes (default: {DEFAULT_BUDGET_NODES})")
    g.add_argument("--budget-tokens", type=positive_int, metavar="N", help="model tokens forwarded (prompt excluded)")
    g.add_argument("--budget-seconds", type=positive_float, metavar="S", help="wall seconds")
    g.add_argument("--budget-memory", type=byte_size, metavar="SIZE", help="engine + KV memory, e.g. 1G or 512M")
    p.add_argument("--support-cap", type=positive_int,
                   help="largest policy support the upper bound may assume (default: the vocabulary size, which "
                   "needs no assumption; --support-cap K with top-k K is tighter but assumes no ties at the "
                   "k-th logit in the unexpanded nodes; expanded nodes are checked)")
    p.add_argument("--order", choices=["best-first", "breadth-first", "depth-first", "beam"], default="best-first")
    p.add_argument("--beam-width", type=positive_int, metavar="B",
                   help="with --order beam: expand only the B most probable nodes of each depth (the bracket "
                   "stays certified; pruned nodes count as unexpanded)")
    p.add_argument("--max-nodes", type=positive_int, default=10_000_000)
    add_ray_arg(p, "one prompt's canopy is split into shards bracketed by Ray workers, the budget split over "
                   "them by reach mass; several prompts are spread over them", shards=True)
    add_output_args(p, seed=False)
    p.set_defaults(func=run)


def budget_of(args: Any) -> Budget:
    """The budget the flags give (--budget NODES by default)."""
    nodes = args.budget
    if not any((args.budget, args.budget_tokens, args.budget_seconds, args.budget_memory)):
        nodes = DEFAULT_BUDGET_NODES
    return Budget(nodes=nodes, tokens=args.budget_tokens, seconds=args.budget_seconds,
                  memory_bytes=args.budget_memory)


def bound_on_ray(ctx: RunContext, job: PromptJob, budget: Budget, prog: BracketProgress) -> Any:
    """One prompt's bracket as shards on Ray (:func:`canopy_rs.drivers.ray_canopy.run_ray`); each worker
    builds the prompt's backend once, from this run's arguments (the model is loaded there, not pickled).
    Ctrl-C gives the bracket reached, as a local run does."""
    from canopy_rs.drivers.ray_canopy import run_ray  # imports ray: only for --ray

    a = ctx.args
    kw = dict(ctx.policy(), batch_size=a.batch_size, max_nodes=a.max_nodes)
    merged, _ = run_ray(None, kw, model_factory=ctx.worker_backend_factory(job.prompt, {}), budget=budget,
                        order=a.order, support_cap=a.support_cap, ray_address=a.ray or None, progress=prog)
    return finish(merged)


def prompt_record(ctx: RunContext, job: PromptJob) -> tuple[dict, dict]:
    """One prompt's certified bracket within the budget (its shards on Ray with --ray and a single prompt)."""
    a = ctx.args
    budget = budget_of(a)
    # The library's default (the vocabulary size) keeps the bracket a proof; a smaller cap is an assumption
    # about the unexpanded nodes (top-k ties can exceed k), so it is only used when asked for.
    cap = a.support_cap
    on_ray = a.ray is not None and not ctx.on_worker
    # On Ray the shards return in any order, so the bar counts the mass covered rather than nodes.
    prog = BracketProgress(not ctx.show_progress, "bracket", record=True,
                           total_nodes=None if on_ray else budget.nodes)
    try:
        if on_ray:
            res = bound_on_ray(ctx, job, budget, prog)
        else:
            res = bounded(job.backend, budget=budget, **ctx.policy(), order=a.order, support_cap=cap,
                          beam_width=a.beam_width, batch_size=a.batch_size, max_nodes=a.max_nodes, progress=prog,
                          progress_interval=0.0)
    finally:
        prog.close()
    rec: dict[str, Any] = {"bounds": res.to_dict(), "bracket_trajectory": prog.snapshots, "support_cap": cap,
                           "budget": dataclasses.asdict(budget)}
    if res.is_exact:
        rec["exact"] = exact_record(res)
    return rec, {}


def run(ctx: RunContext) -> int:
    a = ctx.args
    budget = budget_of(a)
    cap = a.support_cap
    if (a.order == "beam") != (a.beam_width is not None):
        raise InvalidArgumentError("--beam-width B goes with --order beam (and only with it): give both or neither")
    if a.ray is not None and a.order == "beam" and not ctx.spreads_prompts():
        raise InvalidArgumentError("--order beam prunes each depth of the whole canopy, which --ray's shards of one "
                                   "prompt cannot share: drop --ray, or use another --order")

    records = ctx.run_prompts(prompt_record, schema={"bounds": dict},
                              budget=[budget.nodes, a.budget_tokens, a.budget_seconds, a.budget_memory],
                              support_cap=cap, order=a.order, beam_width=a.beam_width)
    rows = []
    for r in records:
        b = r["bounds"]
        # A canopy that fit is an exact result: its mass is all covered, its bracket closed.
        mass, expanded = b.get("explored_mass", b.get("total_mass")), b.get("num_expanded", b.get("num_internal_nodes"))
        e_lo, e_hi = (b.get("expected_length"),) * 2 if b.get("is_exact") else (
            b.get("expected_length_lower"), b.get("expected_length_upper"))
        rows.append([r["index"], short(r["prompt"], 32), num(b["ce_star_lower"]), num(b["ce_star_upper"]),
                     num(b["ce_star_upper"] - b["ce_star_lower"], 4), num(mass, 4),
                     f"{expanded:,}", "exact" if b.get("is_exact") else b.get("stopped_by", ""),
                     f"[{num(e_lo, 3)}, {num(e_hi, 3)}]"])
    table = ctx.header(records) + "\n\n" + format_table(
        ["#", "prompt", "CE* lower", "CE* upper", "width", "mass", "expanded", "stopped by", "E[N] bracket"], rows,
        "llrrrrrlr")

    def plots() -> list[Path]:
        from canopy_rs import plots as pl  # imports matplotlib: only when drawing

        files: list[Path] = []
        for r in records[:MAX_PLOTTED_PROMPTS]:
            traj = r.get("bracket_trajectory") or [r["bounds"]]
            fig = pl.plot_bracket_vs_budget(traj, exact=r.get("exact"))
            files += pl.save_figure(fig, ctx.plot_stem(r, len(records)) + "bracket")
        return files

    return ctx.finish(records, ctx.result(records), table, plots)
