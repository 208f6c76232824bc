#!/usr/bin/env bash
# Checks python/canopy_rs/_core.pyi against the compiled extension with mypy's stubtest.
# Usage: .ci/stubtest.sh   (Python: $PYTHON, else .venv/bin/python, else python3; needs mypy installed)
# The extension must be importable (maturin develop, or the editable install in .venv).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
PY="$(command -v "$PY")"
args=(canopy_rs._core)
ALLOW="$ROOT/.ci/stubtest_allowlist.txt"
if [ -f "$ALLOW" ]; then args+=(--allowlist "$ALLOW"); fi
# From a neutral directory, so the installed package is what gets checked.
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
"$PY" -m mypy.stubtest "${args[@]}"
