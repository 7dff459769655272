#!/usr/bin/env bash
# Runs the test suite after setting everything up (scripts/setup_env.sh). Extra arguments go to pytest.
# GPU tests are marked `gpu` and skip, with the reason, on machines without a CUDA device.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
# No path here: pytest takes pyproject.toml's testpaths (tests/) when it is given none, and only the
# given ones otherwise (`bash scripts/test.sh tests/test_api.py` runs that file, not the suite plus it).
exec "$PY" -m pytest -ra "$@"
