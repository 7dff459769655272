"""scripts/pytest_parallel.py: the GPU check's way of running tests in several processes."""
import os
import re
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "pytest_parallel.py")
TESTS = '''
import pytest

@pytest.mark.parametrize("i", range(4))
def test_passes(i):
    assert i < 4

@pytest.mark.gpu
def test_fails():
    assert False, "meant to fail"
'''


def _run(tmp_path, *args):
    (tmp_path / "test_sample.py").write_text(TESTS)
    logs = tmp_path / "logs"
    done = subprocess.run([sys.executable, SCRIPT, "--log-dir", str(logs), *args, str(tmp_path / "test_sample.py")],
                          capture_output=True, text=True, cwd=tmp_path)
    return done, logs


def test_every_test_runs_once_and_a_failure_fails_the_run(tmp_path):
    done, logs = _run(tmp_path, "-j", "2")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "5 tests in 2 processes" in done.stdout
    assert "FAILED" in done.stdout and "test_fails" in done.stdout
    texts = [(logs / f"pytest_parallel_{i}.log").read_text() for i in range(2)]
    passed = [int(n) for t in texts for n in re.findall(r"(\d+) passed", t)]
    failed = [int(n) for t in texts for n in re.findall(r"(\d+) failed", t)]
    assert sorted(passed) == [2, 2] and failed == [1]  # dealt 3 + 2: each test ran once


def test_selection_by_keyword_and_marker(tmp_path):
    done, _ = _run(tmp_path, "-j", "3", "-k", "passes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 tests in 3 processes" in done.stdout
    done, _ = _run(tmp_path, "-j", "2", "-m", "gpu")
    assert done.returncode == 1 and "1 tests in 1 processes" in done.stdout


def test_an_empty_selection_is_not_a_pass(tmp_path):
    done, _ = _run(tmp_path, "-k", "nothing_matches")
    assert done.returncode == 5 and "no tests selected" in done.stdout
    done, _ = _run(tmp_path, "-j", "0")
    assert done.returncode == 2 and "--jobs must be at least 1" in done.stderr


def test_own_process_files_run_apart_and_logs_are_printed(tmp_path):
    (tmp_path / "test_other.py").write_text("def test_one():\n    assert sum([1, 1]) == 2\n")
    (tmp_path / "test_sample.py").write_text(TESTS)
    logs = tmp_path / "logs"
    done = subprocess.run([sys.executable, SCRIPT, "--log-dir", str(logs), "--own-process", "test_other.py",
                           "--print-logs", "-k", "not fails", "test_sample.py", "test_other.py"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 tests in 2 processes" in done.stdout
    assert "1 passed" in (logs / "pytest_parallel_0.log").read_text()  # test_other.py alone
    assert "4 passed" in (logs / "pytest_parallel_1.log").read_text()
    assert done.stdout.count("---- process") == 2 and "4 passed" in done.stdout.split("---- process 1")[1]
