import os

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter, which must be chosen before
# triton is first imported (tests import it lazily, through the backend registry).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

NO_CUDA_REASON = "needs a CUDA device; none is visible"


def skip_gpu_tests(items, cuda_available: bool) -> None:
    """The one skip rule for tests marked ``gpu``: skipped, with the reason, where no CUDA device is
    visible, so that the same command runs them on a GPU machine and reports them skipped elsewhere."""
    if cuda_available:
        return
    skip = pytest.mark.skip(reason=NO_CUDA_REASON)
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


INSTALL_OPT_IN = "GK_INSTALL_TESTS"


def skip_install_tests(items, opted_in: bool) -> None:
    """Tests marked ``install`` build and install the package into a new virtual environment (minutes,
    more than CI's budget allows): they run only when asked, with GK_INSTALL_TESTS=1."""
    if opted_in:
        return
    skip = pytest.mark.skip(reason=f"installs into a fresh venv (minutes); set {INSTALL_OPT_IN}=1 to run it")
    for item in items:
        if item.get_closest_marker("install") is not None:
            item.add_marker(skip)


def pytest_collection_modifyitems(config, items):
    skip_gpu_tests(items, torch.cuda.is_available())
    skip_install_tests(items, os.environ.get(INSTALL_OPT_IN, "") not in ("", "0"))
