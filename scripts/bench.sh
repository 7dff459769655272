#!/usr/bin/env bash
# The main job: the benchmark harness on whatever device is present (a small default on CPU).
# Extra arguments go to bench/run.py (see `bash scripts/bench.sh --help`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
exec "$PY" bench/run.py "$@"
