"""``canopy-rs study CONFIG``: the base-vs-fine-tuned study of a TOML/YAML config (:func:`canopy_rs.run_study`)."""

from __future__ import annotations

from typing import Any

from canopy_rs.cli._context import RunContext

HELP = "base-vs-fine-tuned study over prompt sets (TOML/YAML config), local or on Ray"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "study", help=HELP,
        description="Run a study config: every model x prompt unit (rollouts, semantic diversity, optional exact "
        "canopies), pooled tables, the paired base-vs-fine-tuned bootstrap, the mixed-model slope ratio, figures "
        "and report.md/report.html. Finished units in the output folder are reused (resume); see "
        "canopy_rs.study.config for the config layout.")
    p.add_argument("config", metavar="CONFIG", help="a .toml, .yaml or .yml study config, or `demo` (the shipped demo)")
    # dest study_out: canopy_rs.run_study locks the folder itself (the run context would lock an `out` first).
    p.add_argument("--out", dest="study_out", metavar="DIR", help="output folder (default: the config's `out`)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run units as Ray actors (put it after CONFIG); ADDRESS is a cluster (auto, ray://head:10001, ...); "
                   "without it a local Ray is started")
    p.add_argument("--fresh", action="store_true", help="recompute every unit instead of resuming")
    p.add_argument("--plan", action="store_true",
                   help="list the units, done and pending, with their keys, and exit (no model is loaded, nothing "
                   "is written)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=run)


def run(ctx: RunContext) -> int:
    # The study package (config, units, analysis, report) loads only when a study runs: the other commands
    # and `canopy-rs --help` never need it (tests/test_layering.py allows this one import by name).
    from canopy_rs.study import format_plan, plan_study, run_study

    a = ctx.args
    if a.plan:
        print(format_plan(plan_study(a.config, out=a.study_out, fresh=a.fresh)))
        return 0
    out = run_study(a.config, out=a.study_out, executor="ray" if a.ray is not None else None,
                ray_address=a.ray or None, fresh=a.fresh, quiet=a.quiet)
    print(out.report.read_text(encoding="utf-8"))
    return 0
