"""Build script. Pure-Python metadata lives in pyproject.toml; this file only adds the C++ extension
when torch is importable at build time (see pyproject.toml for why torch is not a build requirement).

- CPU-only torch, or no nvcc: the host extension (csrc/*.cpp without fusion_cuda.cpp).
- torch with CUDA and nvcc found: host + CUDA kernels, for TORCH_CUDA_ARCH_LIST (default 8.0 and 9.0).
- torch not importable (e.g. an isolated build): the pure-Python package; build the extension with
  `pip install --no-build-isolation -e .` in an environment that has torch.
"""
import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
EXTENSION = "gemini_kernels._C"


def _compiler_is_gcc() -> bool:
    import shutil
    import subprocess

    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        return False
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    return "Free Software Foundation" in version and "clang" not in version


def extension_build():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print(
            f"gemini-kernels: torch is not importable at build time, so {EXTENSION} (backend='cuda') is not "
            "built; to build it, install torch and run `pip install --no-build-isolation -e .`",
            file=sys.stderr,
        )
        return [], {}

    csrc = os.path.join(HERE, "csrc")
    host_sources = sorted(
        os.path.relpath(p, HERE) for p in glob.glob(os.path.join(csrc, "*.cpp")) if not p.endswith("fusion_cuda.cpp")
    )
    # torch's CPU build runs at::parallel_for on OpenMP; the inline header needs -fopenmp to be parallel.
    # -fno-trapping-math and -fno-math-errno (torch's own flags) let the compiler if-convert and
    # vectorize the per-pixel loops of the host path.
    # -ffp-contract=off: GCC's default for GNU C++ fuses a * b + c into an fma in the AVX2+FMA row stages,
    # which then differ from the oracle where the rounding of the product matters (an overflowing
    # product stays finite; a saturated softmax's gradient does not cancel): csrc/fusion_math.h, mul_rn.
    # -fno-wrapv undoes the -fwrapv of Python's own CFLAGS, which setuptools passes first: with wrapping
    # signed ints GCC cannot count the iterations of the channel loops and leaves some of them scalar.
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-fno-wrapv", "-ffp-contract=off"]
    if _compiler_is_gcc():
        # The mix stages read and write a dozen rows; GCC's default of 10 alias checks keeps them scalar.
        cxx_flags.append("--param=vect-max-version-for-alias-checks=40")
    link_flags = ["-fopenmp"]
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda and not os.path.isfile(os.path.join(cpp_extension.CUDA_HOME, "include", "cuda_runtime_api.h")):
        # torch takes CUDA_HOME from the nvcc on PATH, which may be a wrapper script outside the toolkit.
        raise RuntimeError(
            f"gemini-kernels: CUDA_HOME={cpp_extension.CUDA_HOME} has no include/cuda_runtime_api.h; set "
            "CUDA_HOME to the CUDA toolkit's root (e.g. CUDA_HOME=/usr/local/cuda) and build again"
        )
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources = host_sources + ["csrc/fusion_cuda.cpp"] + sorted(
            os.path.relpath(p, HERE) for p in glob.glob(os.path.join(csrc, "*.cu"))
        )
        ext = cpp_extension.CUDAExtension(
            EXTENSION,
            sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link_flags,
        )
        print(f"gemini-kernels: building {EXTENSION} with CUDA kernels for "
              f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}", file=sys.stderr)
    else:
        ext = cpp_extension.CppExtension(
            EXTENSION, host_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
        why = "torch has no CUDA" if torch.version.cuda is None else "nvcc was not found (set CUDA_HOME)"
        print(f"gemini-kernels: building {EXTENSION} with the host path only ({why})", file=sys.stderr)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


class build_py_with_csrc(build_py):
    """Also ships csrc/ inside the package, as gemini_kernels/csrc/: an install built without torch (a
    plain, build-isolated `pip install .`) then compiles the host extension on first use
    (gemini_kernels/_jit_build.py)."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "gemini_kernels", "csrc")
        os.makedirs(target, exist_ok=True)
        for path in sorted(glob.glob(os.path.join(HERE, "csrc", "*"))):
            if os.path.isfile(path):
                self.copy_file(path, os.path.join(target, os.path.basename(path)))


ext_modules, cmdclass = extension_build()
setup(ext_modules=ext_modules, cmdclass={"build_py": build_py_with_csrc, **cmdclass})
