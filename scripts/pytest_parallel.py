#!/usr/bin/env python3
"""Run a pytest selection in several processes at once, without pytest-xdist (the GPU image has none).

On a GPU machine the tests' time goes mostly to Triton compiling each kernel configuration on first
use, one after another, on one CPU core; several processes sharing Triton's file cache compile them
on all cores while they share the GPU. The selection is collected once and dealt round-robin (so that
each process gets a mix of widths and dtypes); each process writes its log to --log-dir.

    python scripts/pytest_parallel.py -j 8 -m gpu tests/test_triton.py tests/test_cuda_host.py

With ``--own-process FILE`` (repeatable) each such file's tests run in a process of their own and
all the others in one more (``-j`` is then ignored): the CPU suite (``scripts/test.sh``) puts the
interpreter-bound Triton tests beside the rest, so that two cores finish it in about half the time;
a file's module fixtures (the sm_90a compile) then run once. ``--print-logs`` prints every process's
whole log at the end (a CI log needs the failures' tracebacks).

The exit code is 0 when every process passed, pytest's 5 when nothing was selected (an empty
selection is not a pass), else the first non-zero one.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def collect(paths, marker, keyword):
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *paths]
    if marker:
        cmd += ["-m", marker]
    if keyword:
        cmd += ["-k", keyword]
    done = subprocess.run(cmd, capture_output=True, text=True)
    ids = [line.strip() for line in done.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    if done.returncode not in (0, 5):
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"pytest_parallel: collecting {' '.join(paths)} failed (exit {done.returncode})")
    return ids


def deal(ids, jobs):
    """Round-robin: groups[i] = ids[i], ids[i + jobs], ... (no empty groups)."""
    return [ids[i::jobs] for i in range(min(jobs, len(ids)))]


def by_file(ids, own_files):
    """One group per file of ``own_files`` (its tests), then one of every other test; no empty groups."""
    own = [os.path.normpath(f) for f in own_files]
    groups = [[i for i in ids if os.path.normpath(i.split("::")[0]) == f] for f in own]
    groups.append([i for i in ids if os.path.normpath(i.split("::")[0]) not in own])
    return [g for g in groups if g]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1,
                        help="processes to run at once (default: one per CPU)")
    parser.add_argument("-m", "--marker", default=None, help="pytest -m expression")
    parser.add_argument("-k", "--keyword", default=None, help="pytest -k expression")
    parser.add_argument("--log-dir", default=os.environ.get("OUT", "."),
                        help="where each process's log goes (default: $OUT, else the current directory)")
    parser.add_argument("--own-process", action="append", default=[], metavar="FILE",
                        help="run this test file's tests in a process of their own (repeatable; -j is ignored)")
    parser.add_argument("--print-logs", action="store_true", help="print every process's whole log at the end")
    parser.add_argument("paths", nargs="+", help="test files or directories")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    ids = collect(args.paths, args.marker, args.keyword)
    if not ids:
        print("pytest_parallel: no tests selected", flush=True)
        return 5
    os.makedirs(args.log_dir, exist_ok=True)
    groups = by_file(ids, args.own_process) if args.own_process else deal(ids, args.jobs)
    print(f"pytest_parallel: {len(ids)} tests in {len(groups)} processes", flush=True)
    start = time.time()
    procs = []
    for i, group in enumerate(groups):
        log = open(os.path.join(args.log_dir, f"pytest_parallel_{i}.log"), "w")
        cmd = [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", *group]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
    rcs = []
    for i, (proc, log) in enumerate(procs):
        rcs.append(proc.wait())
        log.close()
        with open(log.name) as f:
            lines = f.read().splitlines()
        # The failures' short summary and the result line: what a reader of the combined log needs.
        summary = [line for line in lines if line.startswith(("FAILED", "ERROR", "SKIPPED", "XFAIL"))]
        print(f"-- process {i} (exit {rcs[-1]}): {lines[-1] if lines else '(no output)'}", flush=True)
        for line in summary:
            print("   " + line, flush=True)
    if args.print_logs:
        for i, (_, log) in enumerate(procs):
            with open(log.name) as f:
                print(f"---- process {i}: {log.name} ----\n{f.read()}", flush=True)
    print(f"pytest_parallel: {time.time() - start:.0f} s", flush=True)
    return next((rc for rc in rcs if rc != 0), 0)


if __name__ == "__main__":
    sys.exit(main())
