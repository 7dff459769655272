"""Moved to bench/model_speed.py, beside the benchmark harness whose timing loop it uses. This path
still runs it (``python models/bench_speed.py ...``) for the scripts and the test that name it."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from model_speed import *  # noqa: E402,F401,F403
from model_speed import main  # noqa: E402,F401

if __name__ == "__main__":
    main()
