"""The ``canopy-rs`` command line, run in-process (``main([...])``) on a tiny random Llama saved to disk, and
once on the embedded SmolLM2 gguf (skipped when it is not on this machine: `canopy-rs demo` fetches it)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import re
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from canopy_rs.cli import main  # noqa: E402
from canopy_rs.prompts import read_prompts  # noqa: E402
from canopy_rs.models import find_embedded_gguf  # noqa: E402
from tiny_models import make_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny_llama")))


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


POLICY = ["--max-new-tokens", "3", "--top-k", "3"]


# --------------------------------------------------------------------------------------------------


def test_help_and_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("exact", "bound", "sample", "compare", "demo", "bench"):
        assert cmd in out
    with pytest.raises(SystemExit) as e:
        main(["exact", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--temperature", "--top-k", "--top-p", "--max-new-tokens", "--device", "--dtype", "--chat",
                 "--no-chat", "--prompts", "--out", "--format", "--quiet", "--model", "--gguf", "--nodes"):
        assert flag in out
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert "canopy-rs" in capsys.readouterr().out


def test_exact_matches_python_api(tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import canopy_rs
    from canopy_rs.hf_models import load_model

    out = tmp_path / "out"
    rc, stdout, err = _run(capsys, "exact", "--model", tiny, "--prompt", "a b c", *POLICY, "--out", str(out),
                           "--nodes", "-q")
    assert rc == 0, err
    assert err == ""  # --quiet: nothing on stderr
    assert "CE*_max" in stdout and "P(no EOS by the cap)" in stdout
    res = json.loads((out / "result.json").read_text())
    rec = res["prompts"][0]
    hf, tok = load_model(tiny)
    ref = canopy_rs.exact(canopy_rs.TransformersModel(hf, tok, prompt="a b c"), max_new_tokens=3, top_k=3)
    assert rec["exact"]["ce_star"] == pytest.approx(ref.ce_star, rel=1e-6)
    assert rec["exact"]["expected_length"] == pytest.approx(ref.expected_length, rel=1e-6)
    # configuration, versions and model recorded for reproduction
    assert res["config"]["max_new_tokens"] == 3 and res["config"]["top_k"] == 3
    assert res["policy"] == {"max_new_tokens": 3, "temperature": 1.0, "top_k": 3, "top_p": 1.0}
    assert res["versions"]["canopy_rs"] and res["versions"]["torch"] and res["versions"]["transformers"]
    assert res["model"]["kind"] == "directory" and res["model"]["architecture"] == "LlamaForCausalLM"
    assert rec["eos_token_ids"] == [0]
    # tables and plots
    with open(out / "prompts.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and float(rows[0]["exact_ce_star"]) == pytest.approx(ref.ce_star, rel=1e-6)
    with open(out / "nodes.csv") as f:
        nodes = list(csv.DictReader(f))
    assert len(nodes) == ref.num_internal_nodes + ref.num_leaves
    leaf_mass = sum(float(r["reach"]) for r in nodes if r["is_leaf"] == "True")
    assert leaf_mass == pytest.approx(1.0, abs=1e-9)
    for name in ("length", "entropy_by_depth"):
        for ext in ("png", "svg"):
            assert (out / f"{name}.{ext}").stat().st_size > 1000
    assert "result.json" in res["files"] and "length.png" in res["files"]


def test_json_format_and_no_out(tiny: str, capsys: pytest.CaptureFixture) -> None:
    rc, stdout, _ = _run(capsys, "exact", "--model", tiny, "--prompt", "d e", *POLICY, "--format", "json", "-q")
    assert rc == 0
    d = json.loads(stdout)  # strict JSON (no NaN tokens)
    assert d["command"] == "exact" and d["num_prompts"] == 1
    assert d["prompts"][0]["exact"]["ce_star"] > 0
    assert "files" not in d


def test_sample_resume_and_pooling(tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "p1", "prompt": "a b c"}\n{"id": "p2", "text": "d e"}\n')
    out = tmp_path / "out"
    args = ["sample", "--model", tiny, "--prompts", str(prompts), *POLICY, "--num-rollouts", "30", "--seed", "7",
            "--out", str(out)]
    rc, stdout1, err1 = _run(capsys, *args)
    assert rc == 0, err1
    assert "pooled (2 prompts)" in stdout1
    assert "rollouts" in err1  # progress bar on stderr
    res1 = json.loads((out / "result.json").read_text())
    assert [r["id"] for r in res1["prompts"]] == ["p1", "p2"]
    assert [r["seed"] for r in res1["prompts"]] == [7, 8]
    assert res1["pooled"]["estimate"]["num_prompts"] == 2
    rollouts1 = (out / "rollouts.csv").read_text()
    assert len(rollouts1.strip().splitlines()) == 1 + 60
    assert (out / "p000_length_rate.png").exists() and (out / "p001_length_rate.png").exists()

    # Same --out again: both prompts are skipped (no model load), outputs identical.
    rc, stdout2, err2 = _run(capsys, *args)
    assert rc == 0
    assert err2.count("already done") == 2 and "loading" not in err2
    res2 = json.loads((out / "result.json").read_text())
    assert all(r.get("resumed") for r in res2["prompts"])
    assert (out / "rollouts.csv").read_text() == rollouts1
    assert res2["pooled"]["estimate"]["ce_star"] == res1["pooled"]["estimate"]["ce_star"]
    assert stdout2 == stdout1

    # A third prompt: only it is computed.
    with prompts.open("a") as f:
        f.write('"f g"\n')
    rc, _, err3 = _run(capsys, *args)
    assert rc == 0
    assert err3.count("already done") == 2 and "loading" in err3
    res3 = json.loads((out / "result.json").read_text())
    assert len(res3["prompts"]) == 3 and not res3["prompts"][2].get("resumed")

    # A different setting is a different run: recomputed, not reused.
    rc, _, err4 = _run(capsys, *[a if a != "7" else "8" for a in args])
    assert rc == 0 and "already done" not in err4


def test_bound_and_bracket_plot(tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    rc, stdout, err = _run(capsys, "bound", "--model", tiny, "--prompt", "a b c", "--max-new-tokens", "6",
                           "--top-k", "3", "--budget", "12", "--batch-size", "2", "--out", str(out), "-q")
    assert rc == 0, err
    rec = json.loads((out / "result.json").read_text())["prompts"][0]
    b = rec["bounds"]
    assert b["is_exact"] is False and b["stopped_by"] == "nodes"
    assert 0 < b["ce_star_lower"] < b["ce_star_upper"]
    traj = rec["bracket_trajectory"]
    assert len(traj) >= 3
    assert all(t2["ce_star_lower"] >= t1["ce_star_lower"] - 1e-12 for t1, t2 in zip(traj, traj[1:]))
    assert all(t2["ce_star_upper"] <= t1["ce_star_upper"] + 1e-12 for t1, t2 in zip(traj, traj[1:]))
    assert (out / "bracket.png").exists() and (out / "bracket.svg").exists()
    assert "CE* lower" in stdout


def test_bound_beam(tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["bound", "--model", tiny, "--prompt", "a b c", "--max-new-tokens", "4", "--top-k", "3", "-q"]
    rc, _, err = _run(capsys, *args, "--order", "beam")
    assert rc == 2 and "--beam-width" in err
    rc, _, err = _run(capsys, *args, "--beam-width", "2")
    assert rc == 2 and "--order beam" in err
    out = tmp_path / "beam"
    rc, stdout, err = _run(capsys, *args, "--order", "beam", "--beam-width", "2", "--out", str(out))
    assert rc == 0, err
    rec = json.loads((out / "result.json").read_text())["prompts"][0]
    b = rec["bounds"]
    # Two nodes per depth over four depths: at most 8 expanded, and the rest stay in the certified bracket.
    assert b["stopped_by"] == "beam" and b["num_expanded"] <= 8
    assert 0 < b["ce_star_lower"] < b["ce_star_upper"]


def test_demo_and_compare_on_tiny(tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    rc, stdout, err = _run(capsys, "demo", "--model", tiny, "--prompt", "a b c", "--quick", "--out", str(out), "-q")
    assert rc == 0, err
    assert "MC estimate" in stdout and "exact" in stdout
    res = json.loads((out / "result.json").read_text())
    rec = res["prompts"][0]
    assert rec["exact"]["ce_star"] > 0 and rec["estimate"]["num_rollouts"] == 50
    assert res["policy"]["max_new_tokens"] == 3 and res["policy"]["top_k"] == 3
    # The best-first bracket closes on the exact value.
    last = rec["bracket_trajectory"][-1]
    assert last["ce_star_lower"] == pytest.approx(rec["exact"]["ce_star"], rel=1e-9)
    for name in ("length", "entropy_by_depth", "length_rate", "bracket"):
        assert (out / f"{name}.png").exists() and (out / f"{name}.svg").exists()

    out = tmp_path / "cmp"
    rc, stdout, err = _run(capsys, "compare", "--model", tiny, "--prompt", "a b c", *POLICY, "--estimators",
                           "mc_rb,hybrid", "--budgets", "10,20", "--repeats", "2", "--out", str(out), "-q")
    assert rc == 0, err
    assert "mc_rb" in stdout and "hybrid" in stdout
    assert (out / "study.csv").exists() and (out / "study.json").exists()
    assert (out / "rmse_vs_cost.png").exists()
    rc, _, err = _run(capsys, "compare", "--model", tiny, "--estimators", "nope", "-q")
    assert rc == 2 and "unknown estimator" in err


def test_bench_engine(capsys: pytest.CaptureFixture) -> None:
    rc, stdout, _ = _run(capsys, "bench", "--engine", "--vocab-size", "64", "--max-new-tokens", "3", "--top-k", "3",
                         "--format", "json", "-q")
    assert rc == 0
    d = json.loads(stdout)
    assert d["expanded_nodes"] > 0 and d["nodes_per_second"] > 0
    rc, stdout, _ = _run(capsys, "bench", "--list")
    assert rc == 0


def test_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, _, err = _run(capsys, "exact", "--model", str(tmp_path / "missing"), "-q")
    assert rc == 2 and "not a local directory" in err
    rc, _, err = _run(capsys, "exact", "--prompts", str(tmp_path / "missing.jsonl"), "-q")
    assert rc == 2 and "no such file" in err
    with pytest.raises(SystemExit) as e:
        main(["exact", "--top-p", "x"])
    assert e.value.code == 2
    capsys.readouterr()


def test_read_prompts(tmp_path: Path) -> None:
    p = tmp_path / "p.txt"
    p.write_text("first prompt\n\nsecond one\n")
    assert [x["prompt"] for x in read_prompts(p)] == ["first prompt", "second one"]
    j = tmp_path / "p.jsonl"
    j.write_text('{"prompt_id": 5, "question": "q?"}\n"plain"\n')
    assert read_prompts(j) == [{"id": "5", "prompt": "q?"}, {"id": "1", "prompt": "plain"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"other": 1}\n')
    with pytest.raises(ValueError, match="no prompt field"):
        read_prompts(bad)


HAVE_EMBEDDED = importlib.util.find_spec("gguf") is not None and find_embedded_gguf() is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_EMBEDDED, reason="needs the embedded model: `canopy-rs demo` fetches it")
def test_demo_embedded_smollm2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The default model end to end (~20-40 s on 2 CPU cores: mostly loading the gguf)."""
    out = tmp_path / "demo"
    rc, stdout, err = _run(capsys, "demo", "--quick", "--max-new-tokens", "2", "--num-rollouts", "20",
                           "--device", "cpu", "--out", str(out), "-q")
    assert rc == 0, err
    assert "SmolLM2-135M-Instruct" in stdout and "MC estimate" in stdout
    res = json.loads((out / "result.json").read_text())
    assert res["model"]["kind"] == "embedded" and res["model"]["chat"] is True
    assert res["model"]["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    rec = res["prompts"][0]
    assert 2 in rec["eos_token_ids"]  # <|im_end|>
    ex = rec["exact"]
    assert ex["ce_star"] == pytest.approx(ex["ce_star_leaves"], abs=1e-6)
    assert math.isclose(ex["total_mass"], 1.0, abs_tol=1e-6)
    assert (out / "length.png").exists() and (out / "bracket.png").exists()


def test_parquet_tables_when_pyarrow(tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pa = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "sample", "--model", tiny, "--prompt", "a b", *POLICY, "--num-rollouts", "5",
                      "--out", str(out), "--no-plots", "-q")
    assert rc == 0, err
    t = pa.read_table(out / "rollouts.parquet")
    assert t.num_rows == 5 and "entropy_rate" in t.column_names


# --------------------------------------------------------------------------------------------------
# The command line under abuse: each mistake a new user makes ends in one line, early, and leaves no mess.


def _one_line_error(rc: int, err: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("canopy-rs: error: "), err
    return lines[0]


def test_damaged_checkpoint_is_recomputed(tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    args = ["sample", "--model", tiny, "--prompt", "a b c", *POLICY, "--num-rollouts", "30", "--out", str(out),
            "--no-plots"]
    rc, _, err = _run(capsys, *args)
    assert rc == 0, err
    first = (out / "rollouts.csv").read_text()
    assert len(first.splitlines()) == 31
    (ckpt,) = (out / "runs").glob("*/rollouts.csv")
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])  # a finished prompt's table cut in half
    rc, _, err = _run(capsys, *args)
    assert rc == 0, err
    assert "damaged" in err and "rollouts.csv" in err and "recomputing" in err and "already done" not in err
    assert (out / "rollouts.csv").read_text() == first  # recomputed (same seed), not the cut table
    assert ckpt.read_bytes() == data
    res = json.loads((out / "result.json").read_text())
    assert res["prompts"][0]["estimate"]["num_rollouts"] == 30 and not res["prompts"][0].get("resumed")
    rc, _, err = _run(capsys, *args)
    assert rc == 0 and "already done" in err and "warning" not in err  # a good checkpoint is trusted


def test_one_line_errors_before_the_model_loads(tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import torch

    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    line = _one_line_error(*_run(capsys, "exact", "--model", tiny, "--prompts", str(bad))[::2])
    assert str(bad) in line and "UTF-8" in line
    if not torch.cuda.is_available():
        rc, _, err = _run(capsys, "exact", "--model", tiny, "--device", "cuda")
        assert "no CUDA GPU" in _one_line_error(rc, err) and "loading" not in err
    line = _one_line_error(*_run(capsys, "exact", "--model", tiny, "--device", "gpu0")[::2])
    assert "not a torch device" in line
    afile = tmp_path / "result.txt"
    afile.write_text("keep me")
    rc, _, err = _run(capsys, "exact", "--model", tiny, "--prompt", "a", "--out", str(afile))
    assert "not a directory" in _one_line_error(rc, err) and "loading" not in err
    assert afile.read_text() == "keep me"


@pytest.mark.parametrize("bad", [["--top-p", "0"], ["--top-p", "1.5"], ["--temperature", "0"],
                                 ["--temperature", "nan"], ["--temperature", "-1"], ["--top-k", "-1"],
                                 ["--max-new-tokens", "0"], ["--batch-size", "0"], ["--eos-token-ids", "-3"],
                                 ["--limit", "0"], ["--seed", "-1"]])
def test_every_argument_is_checked_while_parsing(bad: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # A model path that does not exist: the check must come first, so the error names the argument.
    with pytest.raises(SystemExit) as e:
        main(["sample", "--model", str(tmp_path / "missing"), *bad])
    assert e.value.code == 2
    assert f"argument {bad[0]}" in capsys.readouterr().err


def test_compare_and_bound_values_checked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for argv in (["bound", "--budget-seconds", "nan"], ["bound", "--budget", "0"], ["compare", "--budgets", "0,10"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    capsys.readouterr()
    line = _one_line_error(*_run(capsys, "compare", "--model", str(tmp_path / "missing"), "--estimators", "mc_rb,x")[::2])
    assert "unknown estimator(s) x" in line


def test_bench_list_says_where_it_looked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, out, err = _run(capsys, "bench", "--list", "--dir", str(tmp_path))
    assert rc == 1 and out == ""
    assert str(tmp_path) in err and "not installed with the wheel" in err
    benches = tmp_path / "benches"
    benches.mkdir()
    (benches / "bench_thing.py").write_text("print('ok')\n")
    rc, out, _ = _run(capsys, "bench", "--list", "--dir", str(benches))
    assert rc == 0 and out.split()[0] == "thing"


def test_outputs_respect_the_umask(tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import os
    import stat

    out = tmp_path / "out"
    old = os.umask(0o027)
    try:
        rc, _, err = _run(capsys, "sample", "--model", tiny, "--prompt", "a b", *POLICY, "--num-rollouts", "5",
                          "--out", str(out), "-q")
    finally:
        os.umask(old)
    assert rc == 0, err
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"result.json", "rollouts.csv", "prompts.csv", "length_rate.png", "record.json"}
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
    assert set(modes.values()) == {0o640}, modes
    assert not list(out.glob(".canopy-rs.lock")) and not list(out.rglob("*.tmp"))


def test_failed_run_leaves_no_out_folder(tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "new" / "out"
    out.parent.mkdir()
    rc, _, err = _run(capsys, "exact", "--model", tiny, "--prompt", "a b", *POLICY, "--max-nodes", "3",
                      "--out", str(out), "-q")
    assert rc == 2 and "cannot be enumerated" in err
    assert not out.exists()


def test_two_runs_on_one_out_folder(tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from canopy_rs.runs import RunDir

    out = tmp_path / "out"
    with RunDir(out):  # another run holds the folder
        rc, _, err = _run(capsys, "exact", "--model", tiny, "--prompt", "a b", *POLICY, "--out", str(out))
        line = _one_line_error(rc, err)
        assert "in use by another canopy-rs run" in line and f"pid {__import__('os').getpid()}" in line
        assert "loading" not in err
    rc, _, err = _run(capsys, "exact", "--model", tiny, "--prompt", "a b", *POLICY, "--out", str(out), "-q")
    assert rc == 0, err


def test_exact_refuses_a_canopy_that_cannot_fit_quickly(tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import time

    t = time.perf_counter()
    # (--context-length: past the tiny model's 64 positions, so that the size probe, not the window, refuses.)
    rc, _, err = _run(capsys, "exact", "--model", tiny, "--prompt", "a b", "--top-k", "3", "--temperature", "4",
                      "--max-new-tokens", "100000", "--context-length", "200000", "--out", str(tmp_path / "out"))
    # stderr also has the status lines ("loading ..."); the error itself is one line.
    line = _one_line_error(rc, "\n".join(ln for ln in err.splitlines() if ln.startswith("canopy-rs")))
    assert time.perf_counter() - t < 60
    assert "cannot be enumerated" in line and "canopy-rs bound" in line and "10^" in line
    assert not (tmp_path / "out").exists()
    # A canopy within the limits is enumerated after the same check.
    rc, _, err = _run(capsys, "exact", "--model", tiny, "--prompt", "a b", "--top-k", "3", "--max-new-tokens", "8",
                      "--max-memory", "64K", "-q")
    assert rc == 2 and "cannot be enumerated" in err and "--max-memory" in err  # 1,024 nodes at most
    rc, _, err = _run(capsys, "exact", "--model", tiny, "--prompt", "a b", "--top-k", "3", "--max-new-tokens", "8", "-q")
    assert rc == 0, err


def test_context_window_is_a_limit(tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The tiny Llama declares 64 positions: prompt + --max-new-tokens beyond them is one line naming the
    numbers and the flag, for every command that expands; --context-length widens the window."""
    prompt = ["--prompt", "a b c", "--no-chat"]  # 3 tokens
    for cmd in ("exact", "sample", "bound"):
        rc, _, err = _run(capsys, cmd, "--model", tiny, *prompt, "--max-new-tokens", "62", "--top-k", "1")
        assert rc == 2 and "Traceback" not in err, err
        line = err.strip().splitlines()[-1]  # after the model load: its progress lines come first
        assert line.startswith("canopy-rs: error: "), err
        assert "65 positions" in line and "context window (64" in line and "--context-length" in line, line
    rc, out, err = _run(capsys, "exact", "--model", tiny, *prompt, "--max-new-tokens", "61", "--top-k", "1",
                        "--format", "json")
    assert rc == 0, err
    rc, out, err = _run(capsys, "exact", "--model", tiny, *prompt, "--max-new-tokens", "62", "--top-k", "1",
                        "--context-length", "80", "--format", "json")
    assert rc == 0, err
    with pytest.raises(SystemExit) as e:
        main(["exact", "--model", tiny, "--context-length", "0"])
    assert e.value.code == 2 and "argument --context-length" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Every file tells the truth (issue 17): one consistent run folder, one cost unit, checks before slow work.


def test_rerun_with_other_settings_leaves_no_stale_files(tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")  # not the tool's: never touched
    rc, _, err = _run(capsys, "exact", "--model", tiny, "--prompt", "a b c", *POLICY, "--nodes", "--out", str(out), "-q")
    assert rc == 0, err
    assert (out / "nodes.csv").exists() and (out / "length.png").exists()
    # Other settings, no --nodes, no plots: the earlier run's nodes table and figures go.
    rc, _, err = _run(capsys, "exact", "--model", tiny, "--prompt", "a b c", "--max-new-tokens", "2", "--top-k", "2",
                      "--no-plots", "--out", str(out))
    assert rc == 0, err
    assert "removed" in err and "nodes.csv" in err
    res = json.loads((out / "result.json").read_text())
    top = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith("."))
    assert top == sorted(res["files"] + ["notes.txt"]), (top, res["files"])
    assert not (out / "nodes.csv").exists() and not list(out.glob("*.png")) and not list(out.glob("*.svg"))
    with open(out / "prompts.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["exact_ce_star"]) == res["prompts"][0]["exact"]["ce_star"]
    # --fresh clears what the tool owns (files and checkpoints), and only that.
    assert len(list((out / "runs").iterdir())) == 2
    rc, _, err = _run(capsys, "exact", "--model", tiny, "--prompt", "a b c", *POLICY, "--no-plots", "--fresh",
                      "--out", str(out))
    assert rc == 0, err
    assert "--fresh: removed" in err
    assert len(list((out / "runs").iterdir())) == 1 and (out / "notes.txt").read_text() == "the user's"
    assert json.loads((out / ".canopy-rs-files.json").read_text())["files"] == json.loads(
        (out / "result.json").read_text())["files"]


def test_duplicate_prompt_texts_are_two_prompts(tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prompts = tmp_path / "dup.jsonl"
    prompts.write_text('{"id": "a", "prompt": "a b"}\n{"id": "b", "prompt": "a b"}\n')
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "exact", "--model", tiny, "--prompts", str(prompts), *POLICY, "--out", str(out), "-q")
    assert rc == 0, err
    res = json.loads((out / "result.json").read_text())
    recs = res["prompts"]
    assert [r["id"] for r in recs] == ["a", "b"] and [r["index"] for r in recs] == [0, 1]
    assert not any(r.get("resumed") for r in recs) and recs[0]["key"] != recs[1]["key"]
    assert len(res["files"]) == len(set(res["files"]))
    for i in (0, 1):
        assert f"p00{i}_length.png" in res["files"] and (out / f"p00{i}_length.png").exists()
    assert recs[0]["exact"]["ce_star"] == recs[1]["exact"]["ce_star"]
    rc, _, err = _run(capsys, "exact", "--model", tiny, "--prompts", str(prompts), *POLICY, "--out", str(out))
    assert rc == 0 and err.count("already done") == 2
    assert [r["id"] for r in json.loads((out / "result.json").read_text())["prompts"]] == ["a", "b"]


def test_checkpoint_record_of_the_wrong_shape_is_recomputed(tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    args = ["exact", "--model", tiny, "--prompt", "a b c", *POLICY, "--nodes", "--no-plots", "--out", str(out)]
    rc, _, err = _run(capsys, *args, "-q")
    assert rc == 0, err
    first = json.loads((out / "result.json").read_text())["prompts"][0]["exact"]["ce_star"]
    (record,) = (out / "runs").glob("*/record.json")
    for bad in ({"complete": True, "checksums": {"nodes.csv": None}},
                {"complete": True, "checksums": {}},  # no fields at all
                {"complete": True, "checksums": {"../x": {"bytes": 1, "sha256": "0"}}},
                [1, 2]):
        record.write_text(json.dumps(bad))
        rc, _, err = _run(capsys, *args)
        assert rc == 0, err
        assert "Traceback" not in err and "damaged" in err and "recomputing" in err, err
        assert json.loads((out / "result.json").read_text())["prompts"][0]["exact"]["ce_star"] == first


def test_model_and_flags_checked_before_anything_loads(tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = _run(capsys, "exact", "--model", str(empty), "--prompt", "a")
    line = _one_line_error(rc, err)
    assert "loading" not in err and "empty" in line and "config.json" in line
    (empty / "config.json").write_text("{}")
    line = _one_line_error(*_run(capsys, "exact", "--model", str(empty), "--prompt", "a")[::2])
    assert "no weights" in line
    (empty / "model.gguf").write_bytes(b"not a gguf")
    line = _one_line_error(*_run(capsys, "exact", "--model", str(empty / "model.gguf"), "--prompt", "a")[::2])
    assert "not a gguf file" in line
    # --eos-token-ids against the vocabulary config.json declares (16 tokens), in the flag's words.
    rc, _, err = _run(capsys, "sample", "--model", tiny, "--prompt", "a", "--eos-token-ids", "0,999999")
    line = _one_line_error(rc, err)
    assert "--eos-token-ids" in line and "999999" in line and "0 to 15" in line
    assert "eos_token_ids=" not in err and "loading" not in err
    with pytest.raises(SystemExit):
        main(["exact", "--eos-token-ids", ","])
    assert "argument --eos-token-ids" in capsys.readouterr().err
    # One size syntax for every memory flag.
    from canopy_rs.cli import build_parser

    for argv, field in ((["bound", "--budget-memory", "1G"], "budget_memory"),
                        (["exact", "--max-memory", "1G"], "max_memory")):
        assert getattr(build_parser().parse_args(argv), field) == 1 << 30
    assert build_parser().parse_args(["bound", "--budget-memory", "512M"]).budget_memory == 512 << 20
    with pytest.raises(SystemExit):
        main(["bound", "--budget-memory", "lots"])
    assert "argument --budget-memory" in capsys.readouterr().err


def test_demo_counts_cost_in_one_unit(tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    rc, stdout, err = _run(capsys, "demo", "--model", tiny, "--prompt", "a b c", "--quick", "--out", str(out), "-q")
    assert rc == 0, err
    rec = json.loads((out / "result.json").read_text())["prompts"][0]
    ex, cost, best = rec["exact"], rec["rollout_cost"], rec["best"]
    assert ex["model_tokens"] == ex["tokens_forwarded"] - ex["prompt_tokens"]
    assert cost["model_tokens"] == cost["tokens_forwarded"] - cost["prompt_tokens"]
    assert best["cost"]["model_tokens"] == best["cost"]["tokens_forwarded"] - best["cost"]["prompt_tokens"]
    assert best["budget"] == cost["model_tokens"]  # the recommended estimator got what the rollouts used
    lines = stdout.splitlines()
    exact_line = next(ln for ln in lines if ln.startswith("exact canopy:"))
    mc_line = next(ln for ln in lines if ln.startswith("Monte Carlo:"))
    best_line = next(ln for ln in lines if ln.startswith("best estimator"))
    assert f"{int(ex['model_tokens']):,} model tokens" in exact_line
    assert f"{int(cost['model_tokens']):,} model tokens" in mc_line
    assert best_line.endswith(f"{int(best['cost']['model_tokens']):,} model tokens")
    assert f"budget of {best['budget']:,} model tokens" in best_line
    row = next(ln for ln in lines if ln.startswith(f"CE*_max, {best['estimator']}"))
    assert f"({int(best['cost']['model_tokens']):,} model tokens)" in row
    # no cost is printed in another unit (rows, or tokens with the prompt's)
    assert re.findall(r"[\d,]+ [a-z]* ?tokens\b", stdout) == re.findall(r"[\d,]+ model tokens\b", stdout), stdout


def test_sample_table_numbers_are_in_the_files(tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    rc, stdout, err = _run(capsys, "sample", "--model", tiny, "--prompt", "a b", *POLICY, "--num-rollouts", "12",
                           "--out", str(out), "-q")
    assert rc == 0, err
    rec = json.loads((out / "result.json").read_text())["prompts"][0]
    with open(out / "prompts.csv") as f:
        (row,) = list(csv.DictReader(f))
    best = rec["best"]
    assert row["best_estimator"] == best["estimator"]
    assert float(row["best_ce_star"]) == best["ce_star"] and float(row["best_ce_star_se"]) == best["ce_star_se"]
    assert float(row["best_model_tokens"]) == best["cost"]["model_tokens"]
    assert float(row["rollouts_model_tokens"]) == rec["rollout_cost"]["model_tokens"]
    shown = next(ln for ln in stdout.splitlines() if ln.startswith(f"CE*_max, {best['estimator']}")).split()
    assert f"{best['ce_star']:.4f}" in shown and f"{best['ce_star_se']:.4f}" in shown


def test_figures_are_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from canopy_rs.plots import figure as fig_mod

    renames: list[tuple[str, str]] = []
    real = os.replace

    def spy(src: str, dst: str) -> None:
        renames.append((str(src), str(dst)))
        real(src, dst)

    monkeypatch.setattr(fig_mod.os, "replace", spy)
    (tmp_path / "x.png").write_text("old")
    fig = fig_mod.new_figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    paths = fig_mod.save_figure(fig, tmp_path / "x")
    assert [str(p) for p in paths] == [str(tmp_path / "x.png"), str(tmp_path / "x.svg")]
    assert [d for _, d in renames] == [str(p) for p in paths]
    assert all(Path(s).parent == tmp_path and s.endswith(".tmp") for s, _ in renames)
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob("*.tmp"))


def test_size_probe_and_progress_bars_show_totals(tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # top-k 3 to depth 8 may exceed the 1,024 nodes 64K allows: the probe runs, says so, and shows progress.
    rc, _, err = _run(capsys, "exact", "--model", tiny, "--prompt", "a b", "--top-k", "3", "--max-new-tokens", "8",
                      "--max-memory", "64K")
    assert rc == 2 and "cannot be enumerated" in err
    assert "size check:" in err and "rollouts" in err
    probe = err[err.index("size check:"):]
    assert "%|" in probe  # the probe's rollouts bar has a total (and so a percentage and an ETA)
    # bound with a node budget: a bar towards it; exact: towards all of the probability mass.
    rc, _, err = _run(capsys, "bound", "--model", tiny, "--prompt", "a b", *POLICY, "--budget", "5")
    assert rc == 0, err
    assert re.search(r"bracket: .*/5 ", err), err
    rc, _, err = _run(capsys, "exact", "--model", tiny, "--prompt", "a b", *POLICY)
    assert rc == 0, err
    assert "mass covered" in err and "/1000" in err, err
