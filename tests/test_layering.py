"""The package's layering, read from every module's imports (ast), so that it stays true.

Bottom to top (a module may import its own layer and the layers below, never one above):

    0  canopy_rs._core (compiled)
    1  errors, stats, results, protocol, prompts, parquet
    2  backends/, models, hf_models, sbert, plots/ (figures draw the data they are given)
    3  drivers/, api (exact, bounded), sampling (sample), testing (check_backend)
    4  estimators/, semantic
    5  study/, runs (run folders)
    6  cli/, __main__
    7  canopy_rs (the package ``__init__``: the public face, imported by no module of the package)

Also: no module imports the package ``__init__`` (``import canopy_rs``), no module imports another
folder's private module (``_core``, the compiled core, excepted), and a module imports the package's own
modules at its top; a function-local import is allowed only for a module that imports a heavy optional
dependency at its top (torch, transformers, matplotlib, ray, statsmodels, pandas, pyarrow,
sentence-transformers), so that ``import canopy_rs`` and ``canopy-rs --help`` do not load it, or when
:data:`ALLOWED_LOCAL` names it with its reason.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
from typing import Iterator, Optional

import pytest

import canopy_rs

ROOT = pathlib.Path(canopy_rs.__file__).parent

LAYERS = {
    "canopy_rs._core": 0,
    "canopy_rs.errors": 1,
    "canopy_rs.stats": 1,
    "canopy_rs.files": 1,
    "canopy_rs.text": 1,
    "canopy_rs.results": 1,
    "canopy_rs.protocol": 1,
    "canopy_rs.prompts": 1,
    "canopy_rs.parquet": 1,
    "canopy_rs.backends": 2,
    "canopy_rs.models": 2,
    "canopy_rs.hf_models": 2,
    "canopy_rs.sbert": 2,
    "canopy_rs.plots": 2,
    "canopy_rs.drivers": 3,
    "canopy_rs.api": 3,
    "canopy_rs.sampling": 3,
    "canopy_rs.testing": 3,
    "canopy_rs.estimators": 4,
    "canopy_rs.semantic": 4,
    "canopy_rs.study": 5,
    "canopy_rs.runs": 5,
    "canopy_rs.cli": 6,
    "canopy_rs.__main__": 6,
}

# Modules that import a heavy optional dependency at their top, and why a function may import them.
HEAVY = {
    "canopy_rs.backends.transformers": "torch and transformers: only when a transformers model is driven",
    "canopy_rs.backends.torch_policy": "torch: only for the transformers backend",
    "canopy_rs.hf_models": "torch and transformers: only when a model is loaded or a device checked",
    "canopy_rs.sbert": "sentence-transformers: only when an encoder folder is loaded",
    "canopy_rs.plots": "matplotlib: only when a figure is drawn",
    "canopy_rs.parquet": "pyarrow: only when a Parquet table is written",
    "canopy_rs.drivers.prompts": "torch and transformers (through hf_models): only when map_prompts runs",
    "canopy_rs.drivers.ray_pool": "ray: only for executor='ray' and --ray",
    "canopy_rs.drivers.ray_canopy": "ray (through ray_pool): only for exact/bounded(..., executor='ray')",
    "canopy_rs.study.ray_executor": "ray (through ray_pool): only for the study's executor='ray'",
    "canopy_rs.study.mixed_model": "pandas and statsmodels: only when the study fits its model",
}
# Function-local imports of other modules of the package, each with its reason (keep this list short).
ALLOWED_LOCAL = {
    ("canopy_rs.cli.study", "canopy_rs.study"): "the study package loads only when `canopy-rs study` runs, so "
                                                "`canopy-rs --help` and the other commands do not pay for it",
}
HEAVY_DEPENDENCIES = ("torch", "transformers", "matplotlib", "ray", "statsmodels", "pandas", "pyarrow",
                      "sentence_transformers")


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    rel = pathlib.Path(*name.split("."))
    base = ROOT.parent / rel
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists() or name == "canopy_rs._core"


def _match(name: str, table: dict) -> Optional[str]:
    """The longest key of ``table`` that is ``name`` or a package above it."""
    best = None
    for k in table:
        if (name == k or name.startswith(k + ".")) and (best is None or len(k) > len(best)):
            best = k
    return best


def _layer(name: str) -> int:
    if name == "canopy_rs":
        return 7
    key = _match(name, LAYERS)
    assert key is not None, f"{name} has no layer: add it to LAYERS in tests/test_layering.py"
    return LAYERS[key]


def _imports(path: pathlib.Path) -> Iterator[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` for every import of a ``canopy_rs`` module, and
    ``("<third-party>:NAME", ...)`` for the heavy optional dependencies."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]

    def walk(node: ast.AST, local: bool) -> Iterator[tuple[str, int, bool]]:
        for ch in ast.iter_child_nodes(node):
            inner = local or isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(ch, ast.Import):
                for a in ch.names:
                    if a.name == "canopy_rs" or a.name.startswith("canopy_rs."):
                        yield a.name, ch.lineno, local
                    elif a.name.split(".")[0] in HEAVY_DEPENDENCIES:
                        yield "<third-party>:" + a.name, ch.lineno, local
            elif isinstance(ch, ast.ImportFrom):
                if ch.level:
                    base = package.split(".")
                    base = base[: len(base) - (ch.level - 1)]
                    mod = ".".join(base + ([ch.module] if ch.module else []))
                else:
                    mod = ch.module or ""
                if mod == "canopy_rs" or mod.startswith("canopy_rs."):
                    for a in ch.names:
                        sub = f"{mod}.{a.name}"
                        yield (sub if _is_module(sub) else mod), ch.lineno, local
                elif mod.split(".")[0] in HEAVY_DEPENDENCIES:
                    yield "<third-party>:" + mod, ch.lineno, local
            yield from walk(ch, inner)

    yield from walk(ast.parse(path.read_text(encoding="utf-8")), False)


MODULES = sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def _each_import():
    for path in MODULES:
        me = _module_name(path)
        for target, line, local in _imports(path):
            yield me, f"{path.relative_to(ROOT)}:{line}", target, local


def test_every_module_has_a_layer():
    for path in MODULES:
        _layer(_module_name(path))


def test_no_module_imports_a_layer_above_it():
    offenders = [f"{where}: {me} (layer {_layer(me)}) imports {t} (layer {_layer(t)})"
                 for me, where, t, _ in _each_import()
                 if not t.startswith("<") and t != "canopy_rs" and _layer(t) > _layer(me)]
    assert not offenders, "\n".join(offenders)


def test_no_module_imports_the_package_init():
    offenders = [f"{where}: imports canopy_rs itself" for me, where, t, _ in _each_import() if t == "canopy_rs"]
    assert not offenders, "\n".join(offenders)


def test_no_module_imports_another_folders_private_module():
    offenders = []
    for me, where, t, _ in _each_import():
        if t.startswith("<") or t == "canopy_rs._core":
            continue
        parts = t.split(".")
        for i, part in enumerate(parts):
            if part.startswith("_") and not part.startswith("__"):
                folder = ".".join(parts[:i])
                own = me if (ROOT.parent / pathlib.Path(*me.split("."))).is_dir() else me.rpartition(".")[0]
                if own != folder and not own.startswith(folder + "."):
                    offenders.append(f"{where}: {me} imports {t}, private to {folder}")
    assert not offenders, "\n".join(offenders)


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("canopy_rs")):
                for alias in node.names:
                    # Private *modules* of the package (``from . import _buckets``) are fine; private names are not.
                    is_module = (ROOT / (node.module or "").replace("canopy_rs.", "").replace(".", "/")
                                 / f"{alias.name}.py").exists() or alias.name == "_core"
                    if alias.name.startswith("_") and not alias.name.startswith("__") and not is_module:
                        offenders.append(f"{path.relative_to(ROOT)}: {node.module}.{alias.name}")
    assert not offenders, offenders


def test_imports_of_the_package_are_at_the_top_unless_they_load_a_heavy_dependency():
    offenders = [f"{where}: {t} imported inside a function" for me, where, t, local in _each_import()
                 if local and not t.startswith("<") and _match(t, HEAVY) is None and (me, t) not in ALLOWED_LOCAL]
    assert not offenders, "\n".join(offenders)


def test_heavy_dependencies_are_imported_at_the_top_of_the_modules_that_wrap_them():
    offenders = []
    for me, where, t, local in _each_import():
        if t.startswith("<third-party>:"):
            if local:
                offenders.append(f"{where}: {t[14:]} imported inside a function")
            elif _match(me, HEAVY) is None:
                offenders.append(f"{where}: {t[14:]} imported by {me}, which is not a heavy-dependency module")
        elif not local and _match(t, HEAVY) is not None and _match(me, HEAVY) is None:
            offenders.append(f"{where}: {me} imports {t} at its top (it would load {HEAVY[_match(t, HEAVY)]})")
    assert not offenders, "\n".join(offenders)


def test_backends_never_import_the_layers_above_them():
    # One-way layering: a backend that needs shared driver code gets it from a module in the backend layer
    # (backends.output), never from the drivers.
    above = ("canopy_rs.drivers", "canopy_rs.api", "canopy_rs.sampling", "canopy_rs.estimators",
             "canopy_rs.study", "canopy_rs.cli")
    offenders = [f"{where}: {t}" for me, where, t, _ in _each_import()
                 if me.startswith("canopy_rs.backends") and t.startswith(above)]
    assert not offenders, offenders


@pytest.mark.parametrize("code", [
    "import canopy_rs",
    "import canopy_rs.cli",
    "import canopy_rs.study.config",
])
def test_light_imports_load_no_heavy_dependency(code):
    check = (f"import sys; {code}; heavy = [m for m in {HEAVY_DEPENDENCIES!r} if m in sys.modules]; "
             "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", check], check=True)
