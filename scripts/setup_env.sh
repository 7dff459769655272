#!/usr/bin/env bash
# Set-up shared by scripts/test.sh and scripts/bench.sh: a virtual environment with torch, triton, the
# test tools and this package (with its C++ extension built when a compiler is present).
# Idempotent and offline-safe: anything already importable is not installed again, so it also runs on a
# GPU image that ships torch and triton but has no network.
# Source it; it leaves PY pointing at the environment's python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GK_VENV:-$ROOT/.venv}"

if [ ! -x "$VENV/bin/python" ]; then
  if python3 -c "import torch" 2>/dev/null; then
    # A machine that already has torch (e.g. a CUDA image): reuse it rather than download another.
    python3 -m venv --system-site-packages "$VENV" \
      || python3 -m venv --without-pip --system-site-packages "$VENV"  # no ensurepip: the system pip serves
  else
    python3 -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# One interpreter start for every probe (each import of torch costs seconds): the modules that fail to import.
MISSING=" $("$PY" -c '
import importlib, sys
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception:
        print(name, end=" ")
' torch numpy pytest ninja triton matplotlib pytest_benchmark 2>/dev/null) "
missing() { case "$MISSING" in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
pip_install() { echo "[setup] pip install $*"; "$PY" -m pip install -q "$@"; }

if missing torch; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip_install "torch>=2.4"
  else
    # Pinned: on these machines 2.13.0 is a CPU build on local disk; an unpinned torch would pull a
    # multi-GB CUDA build (PyPI's default Linux wheel).
    pip_install "torch==2.13.0"
  fi
fi
need=()
missing numpy && need+=(numpy)
missing pytest && need+=("pytest>=7")
missing ninja && need+=(ninja)
missing triton && need+=("triton==3.6.0")  # runs the Triton kernels on CPU under TRITON_INTERPRET=1
if [ ${#need[@]} -gt 0 ]; then
  # Not fatal: an offline machine may lack one of these and still run most of the suite; whatever
  # then fails to import fails its tests by name.
  pip_install "${need[@]}" || echo "[setup] WARNING: could not install ${need[*]}; tests that need them will fail" >&2
fi
# Optional: the benchmark's plot and the on-demand pytest-benchmark suite. An offline machine without
# them (e.g. a GPU image) still runs the tests and the benchmark, which then skips its plot.
for opt in matplotlib:matplotlib pytest_benchmark:pytest-benchmark; do
  if missing "${opt%%:*}"; then
    pip_install "${opt#*:}" || echo "[setup] could not install ${opt#*:} (optional); continuing without it"
  fi
done

# Build the package (and its C++ extension) against the torch installed above: only when this checkout's
# build is missing or stale (scripts/build_stamp.py: csrc/*, setup.py, pyproject.toml, the torch version
# or the checkout changed since the last successful build, or the extension went missing), or when
# GK_REBUILD=1. A fresh clone (CI's .ci/run) has no stamp, so it always builds.
STAMP="$VENV/.gemini_kernels_build"
if [ "${GK_REBUILD:-0}" = 1 ] || ! "$PY" "$ROOT/scripts/build_stamp.py" check "$STAMP"; then
  if [ "${GK_REBUILD:-0}" = 1 ]; then echo "[setup] building gemini_kernels (GK_REBUILD=1)"; fi
  rm -f "$STAMP"
  # A failed build (e.g. a compile error in csrc/) stops here, with the compiler output above.
  (cd "$ROOT" && "$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | { grep -vE '^\s*$|Warning|warn' || true; }) \
    || { echo "[setup] building gemini_kernels failed; the build output is above" >&2; exit 1; }
  "$PY" -c "import gemini_kernels" || { echo "[setup] gemini_kernels failed to build or import" >&2; exit 1; }
  "$PY" "$ROOT/scripts/build_stamp.py" write "$STAMP"
else
  echo "[setup] gemini_kernels is up to date with csrc/, setup.py, pyproject.toml and torch (GK_REBUILD=1 rebuilds)"
fi
"$PY" -c "import torch, gemini_kernels as gk; print(f'[setup] torch {torch.__version__}, cuda available: {torch.cuda.is_available()}, backends on cpu: {gk.available_backends(\"cpu\")}')"
