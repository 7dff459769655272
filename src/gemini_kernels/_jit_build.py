"""Compiles the host C++ extension on first use, when the install has none.

A plain ``pip install .`` builds in an isolated environment without torch, so setup.py skips
``gemini_kernels._C`` and backend="cuda" would be lost. :func:`build_host_extension` compiles the host
path (csrc/*.cpp without fusion_cuda.cpp: the CPU kernels, no CUDA kernels) with
``torch.utils.cpp_extension.load`` and ninja, once per torch and Python version, into
``~/.cache/gemini_kernels/`` (``$GK_CACHE_DIR`` or ``$XDG_CACHE_HOME`` move it), and registers the
result as ``gemini_kernels._C``; ``GK_NO_JIT_BUILD=1`` turns this off. The sources come from the
package (setup.py ships csrc/ as ``gemini_kernels/csrc/``) or, in a checkout, from the repository's csrc/.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import List, Optional

PACKAGE_DIR = Path(__file__).resolve().parent
EXTENSION = "gemini_kernels._C"
# As setup.py's host build: OpenMP for at::parallel_for; torch's own math flags; -fno-wrapv so that GCC
# can count (and vectorize) the channel loops; -ffp-contract=off so that products are rounded as the
# oracle rounds them (setup.py says where it matters).
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-fno-wrapv", "-ffp-contract=off"]
LD_FLAGS = ["-fopenmp"]


def source_dirs() -> List[Path]:
    """Where the C++ sources may be, in order: inside the installed package, then a checkout's csrc/."""
    return [PACKAGE_DIR / "csrc", PACKAGE_DIR.parents[1] / "csrc"]


def host_sources(dirs: Optional[List[Path]] = None) -> List[Path]:
    """The host extension's sources: csrc/*.cpp except fusion_cuda.cpp (which needs the CUDA toolkit)."""
    dirs = source_dirs() if dirs is None else dirs
    for d in dirs:
        sources = sorted(p for p in d.glob("*.cpp") if p.name != "fusion_cuda.cpp")
        if sources and (d / "fusion_math.h").is_file():
            return sources
    raise RuntimeError(
        f"cannot compile {EXTENSION} on first use: its C++ sources (fusion_api.cpp, fusion_host.cpp, "
        f"fusion_math.h) are in none of {', '.join(str(d) for d in dirs)}; reinstall gemini-kernels from a "
        "source tree, or build it there with `pip install --no-build-isolation -e .`")


def cache_dir() -> Path:
    import torch

    root = os.environ.get("GK_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "gemini_kernels")
    tag = re.sub(r"[^A-Za-z0-9.+_-]", "_", f"torch-{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}")
    return Path(root) / tag


def _compiler() -> str:
    name = os.environ.get("CXX", "c++")
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(
            f"cannot compile {EXTENSION} on first use: no C++ compiler ({name!r}{' from $CXX' if 'CXX' in os.environ else ''}"
            " is not on PATH); install one (e.g. `apt-get install g++`) or set CXX")
    return path


def _is_gcc(compiler: str) -> bool:
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "Free Software Foundation" in version and "clang" not in version


def build_host_extension(verbose: bool = False) -> ModuleType:
    """Compiles (or loads the cached build of) the host extension and registers it as
    ``gemini_kernels._C``, which registers ``torch.ops.gemini_kernels.fusion_forward`` / ``_backward``.
    Raises RuntimeError naming what is missing (the sources, a C++ compiler, ninja)."""
    if sys.modules.get(EXTENSION) is not None:  # None: an import of it already failed, or was blocked
        return sys.modules[EXTENSION]
    if os.environ.get("GK_NO_JIT_BUILD", "") not in ("", "0"):
        raise RuntimeError(f"{EXTENSION} is not installed and compiling it on first use is disabled "
                           "(GK_NO_JIT_BUILD=1)")
    sources = host_sources()
    compiler = _compiler()
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise RuntimeError(f"cannot compile {EXTENSION} on first use: ninja is not installed (pip install ninja)")
    build_dir = cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    if not any(build_dir.glob("_C*.so")) and not any(build_dir.glob("_C*.pyd")):
        print(f"gemini_kernels: {EXTENSION} is not installed (a build without torch); compiling its host C++ "
              f"path once into {build_dir} (about a minute)", file=sys.stderr, flush=True)
    flags = CXX_FLAGS + (["--param=vect-max-version-for-alias-checks=40"] if _is_gcc(compiler) else [])
    module = cpp_extension.load(name="_C", sources=[str(s) for s in sources], extra_cflags=flags,
                                extra_ldflags=LD_FLAGS, extra_include_paths=[str(sources[0].parent)],
                                build_directory=str(build_dir), verbose=verbose)
    sys.modules[EXTENSION] = module
    import gemini_kernels

    gemini_kernels._C = module  # `from .. import _C` in ops/cuda_fusion.py finds it
    return module
