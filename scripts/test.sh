#!/usr/bin/env bash
# Runs the test suite after setting everything up (scripts/setup_env.sh). Extra arguments go to pytest.
# GPU tests are marked `gpu` and skip, with the reason, on machines without a CUDA device.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
# No path here: pytest takes pyproject.toml's testpaths (tests/) when it is given none, and only the
# given ones otherwise (`bash scripts/test.sh tests/test_triton.py` runs that file, not the suite plus it).
if [ "$#" -eq 0 ] && [ "$(nproc 2>/dev/null || echo 1)" -ge 2 ] && [ -z "${GK_TESTS_IN_ONE_PROCESS:-}" ]; then
  # The whole suite on two or more cores: the Triton interpreter's tests (one core's worth, about half
  # the suite's time) in one process, everything else (the sm_90a compile check among it) in another.
  # Each process's whole log is printed at the end; GK_TESTS_IN_ONE_PROCESS=1 runs one pytest instead.
  LOGS="$(mktemp -d)"
  exec "$PY" scripts/pytest_parallel.py --own-process tests/test_triton.py --print-logs --log-dir "$LOGS" tests
fi
exec "$PY" -m pytest -ra "$@"
