"""``canopy-rs compare``: estimators judged against the exact value (:func:`canopy_rs.compare`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from canopy_rs.cli._args import add_output_args, add_ray_arg, add_run_args, positive_int, positive_int_list, str_list
from canopy_rs.cli._context import MAX_PLOTTED_PROMPTS, PromptJob, RunContext
from canopy_rs.cli._format import short
from canopy_rs.cli.exact import exact_record
from canopy_rs.errors import InvalidArgumentError
from canopy_rs.estimators.comparison import BUILTIN_ESTIMATORS, ComparisonResult, compare
from canopy_rs.runs import write_csv

HELP = "estimators vs the exact value"
DEFAULT_ESTIMATORS = ["mc_rb", "mc_surprisal", "sbs", "hybrid"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("compare", help=HELP,
                       description="Run each estimator `repeats` times per budget and judge it against the "
                       "exact CE*_max: bias, SD, RMSE, coverage, cost; RMSE-vs-cost plot.")
    add_run_args(p)
    p.add_argument("--estimators", type=str_list, default=DEFAULT_ESTIMATORS,
                   help=f"comma-separated (default: {','.join(DEFAULT_ESTIMATORS)})")
    p.add_argument("--budgets", type=positive_int_list, default=[50, 100, 200],
                   help="model tokens per estimate, comma-separated (default: 50,100,200)")
    p.add_argument("--repeats", type=positive_int, default=10, help="(default: 10)")
    add_ray_arg(p, "the prompts are spread over them (one prompt runs on one worker)")
    add_output_args(p)
    p.set_defaults(func=run, prepare=prepare)


def prepare(args: Any) -> None:
    """Argument checks that need the estimator registry (run before anything is loaded)."""
    bad = [e for e in args.estimators if e not in BUILTIN_ESTIMATORS]
    if bad or not args.estimators:
        raise InvalidArgumentError(f"unknown estimator(s) {', '.join(bad) or '(none given)'}; "
                       f"choose from {', '.join(BUILTIN_ESTIMATORS)}")


def study_of(rec: dict) -> Any:
    """The :class:`ComparisonResult` of a prompt's record (fresh or resumed alike)."""
    d = rec["study"]
    return ComparisonResult(exact_ce_star=d["exact_ce_star"], exact=d.get("exact", {}), rows=d["rows"],
                       settings=d.get("settings", {}))


def prompt_record(ctx: RunContext, job: PromptJob) -> tuple[dict, dict]:
    a = ctx.args
    study = compare(job.backend, estimators=a.estimators, budgets=a.budgets, repeats=a.repeats, seed=job.seed or 0,
                    batch_size=a.batch_size, progress=ctx.show_progress, **ctx.policy())
    ex = study.exact if isinstance(study.exact, dict) else exact_record(study.exact)
    return {"seed": job.seed, "exact": ex, "study": study.to_dict()}, {}


def run(ctx: RunContext) -> int:
    a = ctx.args
    records = ctx.run_prompts(prompt_record, schema={"study": {"exact_ce_star": (int, float), "rows": list}, "exact": dict},
                              estimators=a.estimators, budgets=a.budgets, repeats=a.repeats)
    studies = [study_of(r) for r in records]
    parts = [ctx.header(records)]
    for r, st in zip(records, studies):
        if len(records) > 1:
            parts.append(f"\n[{r['index']}] {short(r['prompt'], 80)!r}")
        parts.append(st.format_table())

    def files() -> list[Path]:
        out: list[Path] = []
        for r, st in zip(records, studies):  # written atomically, as every file in --out
            stem = ctx.plot_stem(r, len(records))
            write_csv(stem + "study.csv", st.rows)
            out += [Path(stem + "study.csv"),
                    ctx.out.write_json(os.path.relpath(stem + "study.json", ctx.out.path), st.to_dict())]
        return out

    def plots() -> list[Path]:
        from canopy_rs import plots as pl  # imports matplotlib: only when drawing

        return [f for r, st in list(zip(records, studies))[:MAX_PLOTTED_PROMPTS]
                for f in pl.save_figure(pl.plot_rmse_vs_cost(st.rows, exact_ce_star=st.exact_ce_star),
                                        ctx.plot_stem(r, len(records)) + "rmse_vs_cost")]

    return ctx.finish(records, ctx.result(records), "\n\n".join(parts), plots, files)
