"""The skip rules of tests/conftest.py: `gpu` tests skip without a CUDA device, `install` tests unless
asked for; every marker used is declared (pyproject.toml)."""
import re
from pathlib import Path

import pytest

import conftest

ROOT = Path(__file__).resolve().parents[1]


class FakeItem:
    def __init__(self, *marks):
        self.marks, self.added = set(marks), []

    def get_closest_marker(self, name):
        return name if name in self.marks else None

    def add_marker(self, mark):
        self.added.append(mark)


def skipped(item):
    return [m.kwargs["reason"] for m in item.added if m.name == "skip"]


def test_gpu_tests_skip_with_the_reason_only_without_a_cuda_device():
    gpu, plain = FakeItem("gpu"), FakeItem()
    conftest.skip_gpu_tests([gpu, plain], cuda_available=False)
    assert skipped(gpu) == [conftest.NO_CUDA_REASON] and skipped(plain) == []
    gpu = FakeItem("gpu")
    conftest.skip_gpu_tests([gpu], cuda_available=True)
    assert skipped(gpu) == []


def test_install_tests_run_only_when_asked():
    install, plain = FakeItem("install"), FakeItem()
    conftest.skip_install_tests([install, plain], opted_in=False)
    assert skipped(install) and "GK_INSTALL_TESTS=1" in skipped(install)[0] and skipped(plain) == []
    install = FakeItem("install")
    conftest.skip_install_tests([install], opted_in=True)
    assert skipped(install) == []


def test_the_collected_gpu_tests_carry_the_skip(request):
    """The hook ran on this session's own items: each collected `gpu` test has the skip (without CUDA)."""
    import torch

    gpu_items = [i for i in request.session.items if i.get_closest_marker("gpu") is not None]
    if torch.cuda.is_available() or not gpu_items:
        pytest.skip("a CUDA device is visible, or no gpu test was collected in this session")
    for item in gpu_items:
        assert any(m.name == "skip" for m in item.iter_markers()) or any(
            m.name == "skipif" and m.args and m.args[0] for m in item.iter_markers()), item.nodeid


def test_every_marker_used_in_tests_is_declared():
    declared = set(re.findall(r'^\s*"(\w+):', (ROOT / "pyproject.toml").read_text(), re.M))
    used = set()
    for path in (ROOT / "tests").glob("*.py"):
        used |= set(re.findall(r"pytest\.mark\.(\w+)", path.read_text()))
    builtin = {"parametrize", "skip", "skipif", "xfail", "usefixtures", "filterwarnings"}
    assert used - builtin <= declared, used - builtin - declared
    assert {"gpu", "install"} <= declared
