"""scripts/gpu_checks.sh, checked without a GPU: every pytest selection it makes picks GPU tests.

A GPU is lent rarely and briefly, and the script is run once in it. A test renamed since the script
was written must not make a step select nothing (pytest's exit code 5, a failed step) or, worse, make
one alternative of a `-k` expression select nothing while the others still run (fewer cases under the
sanitizer, and no error to say so). So each `-k` expression is expanded into its alternatives (each an
`and` of keywords) and each alternative must select at least one of the `gpu` tests collected from the
files of its command, with pytest's matching: a keyword matches a test when it is a case-insensitive
substring of the test's name (parameters included), its class's or its file's.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_checks.sh"


def pytest_commands():
    """(test files, -k expression or None, whether the files are named) of every command of the script
    that runs pytest; `-m gpu tests` is every test file, unnamed."""
    text = re.sub(r"\\\n\s*", " ", SCRIPT.read_text())  # continuation lines joined
    commands = []
    for line in text.splitlines():
        line = re.sub(r"(^|\s)#.*", "", line)  # comments
        if not re.search(r"\b(pytest|ptest)\b", line) or "-m gpu" not in line:
            continue
        files = re.findall(r"\btests/\w+\.py\b", line)
        named = bool(files)
        if not named and re.search(r"-m gpu tests\b", line):
            files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py"))
        keywords = re.search(r'-k "([^"]+)"', line)
        commands.append((tuple(files), keywords.group(1) if keywords else None, named))
    return commands


def alternatives(expression):
    """The expression as a list of alternatives, each a list of keywords that must all match
    (`and`, `or` and parentheses; `not` is refused, as it would need more than this)."""
    tokens = re.findall(r"\(|\)|[^\s()]+", expression)
    position = 0

    def parse_or():
        nonlocal position
        result = parse_and()
        while position < len(tokens) and tokens[position] == "or":
            position += 1
            result = result + parse_and()
        return result

    def parse_and():
        nonlocal position
        result = parse_atom()
        while position < len(tokens) and tokens[position] == "and":
            position += 1
            right = parse_atom()
            result = [a + b for a in result for b in right]
        return result

    def parse_atom():
        nonlocal position
        token = tokens[position]
        position += 1
        if token == "(":
            result = parse_or()
            assert tokens[position] == ")", expression
            position += 1
            return result
        assert token not in ("and", "or", ")", "not"), f"unsupported at {token!r}: {expression}"
        return [[token]]

    result = parse_or()
    assert position == len(tokens), expression
    return result


def test_alternatives_expand_and_over_or():
    assert alternatives("(a and (b or c)) or d") == [["a", "b"], ["a", "c"], ["d"]]
    with pytest.raises(AssertionError):
        alternatives("a and not b")


@pytest.fixture(scope="module")
def gpu_test_ids():
    files = sorted({f for files, _, _ in pytest_commands() for f in files})
    for f in files:
        assert (ROOT / f).is_file(), f"scripts/gpu_checks.sh names {f}, which does not exist"
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           *files], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [line for line in proc.stdout.splitlines() if "::" in line]


def keywords_of(node_id):
    path, *names = node_id.split("::")
    return [Path(path).name, *names]


def test_the_script_runs_pytest_on_gpu_tests():
    commands = pytest_commands()
    assert len(commands) >= 6, commands  # tests; sanitizer x3 and quick: triton, cuda, sanitizer x3
    assert sum(k is not None for _, k, _ in commands) >= 4, commands


def test_every_selection_of_the_script_picks_gpu_tests(gpu_test_ids):
    missing = []
    for files, expression, named in pytest_commands():
        ids = [i for i in gpu_test_ids if i.split("::")[0] in files]
        for f in files if named else ():
            if not any(i.split("::")[0] == f for i in ids):
                missing.append(f"{f}: no gpu test")
        if not ids:
            missing.append(f"the command over {', '.join(files)}")
        if expression is None:
            continue
        for keywords in alternatives(expression):
            if not any(all(any(k.lower() in name.lower() for name in keywords_of(i)) for k in keywords) for i in ids):
                missing.append(f"{' and '.join(keywords)} (in {', '.join(files)})")
    assert not missing, "selects no gpu test:\n" + "\n".join(missing)
