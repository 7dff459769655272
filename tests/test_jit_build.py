"""gemini_kernels/_jit_build.py: the host extension compiled on first use, for an install without one
(a plain, build-isolated `pip install .`)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gemini_kernels import _jit_build

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import sys, time, torch
    import gemini_kernels as gk
    from gemini_kernels._jit_build import build_host_extension
    assert "gemini_kernels._C" not in sys.modules  # the installed one, if any, is never imported here
    start = time.time()
    module = build_host_extension()
    from gemini_kernels.ops import cuda_fusion
    assert cuda_fusion.unavailable_reason(torch.device("cpu")) is None, cuda_fusion.unavailable_reason("cpu")
    g = torch.Generator().manual_seed(0)
    x0, x1 = (torch.randn(2, 5, 64, dtype=torch.float64, generator=g) for _ in range(2))
    params = gk.random_params(64, dtype=torch.float64, generator=g)
    got = gk.gemini_fusion(x0, x1, params, 8, backend="cuda")
    want = gk.gemini_fusion_reference(x0, x1, params, 8)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(got, want))
    print(module.__file__, f"{time.time() - start:.1f}")
""")


def child(cache: Path):
    env = dict(os.environ, GK_CACHE_DIR=str(cache))
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.mark.slow  # one compile of the host path (about a minute), then one cached load
@pytest.mark.skipif(not (ROOT / "csrc").is_dir() and not (Path(_jit_build.__file__).parent / "csrc").is_dir(),
                    reason="no C++ sources")
def test_the_host_extension_is_compiled_once_and_runs_the_cuda_backend_on_cpu(tmp_path):
    first = child(tmp_path / "cache")
    assert f"compiling its host C++ path once into {tmp_path / 'cache'}" in first.stderr
    so_file = Path(first.stdout.split()[0])
    assert so_file.is_relative_to(tmp_path / "cache") and so_file.name.startswith("_C")
    assert "torch-" in so_file.parent.name  # one build per torch (and Python) version

    second = child(tmp_path / "cache")  # cached: no compile, no line
    assert "compiling" not in second.stderr and second.stdout.split()[0] == str(so_file)


def test_missing_sources_compiler_or_ninja_are_named(monkeypatch, tmp_path):
    monkeypatch.delitem(sys.modules, "gemini_kernels._C", raising=False)  # as in an install without it
    monkeypatch.setattr(_jit_build, "source_dirs", lambda: [tmp_path / "csrc"])
    with pytest.raises(RuntimeError, match=r"C\+\+ sources .* are in none of " + str(tmp_path / "csrc")):
        _jit_build.build_host_extension()

    monkeypatch.undo()
    monkeypatch.delitem(sys.modules, "gemini_kernels._C", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(_jit_build.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"no C\+\+ compiler \('c\+\+' is not on PATH\)"):
        _jit_build.build_host_extension()

    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "gemini_kernels._C", None)  # an import that failed: not a module
    monkeypatch.setenv("GK_NO_JIT_BUILD", "1")
    with pytest.raises(RuntimeError, match=r"compiling it on first use is disabled \(GK_NO_JIT_BUILD=1\)"):
        _jit_build.build_host_extension()

    monkeypatch.undo()
    monkeypatch.delitem(sys.modules, "gemini_kernels._C", raising=False)
    from torch.utils import cpp_extension
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"ninja is not installed \(pip install ninja\)"):
        _jit_build.build_host_extension()


def test_a_built_package_carries_the_sources(tmp_path):
    """setup.py's build_py puts csrc/ in the package, where _jit_build looks first."""
    src = tmp_path / "src"
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes((ROOT / name).read_bytes())
    import shutil
    for name in ("csrc", "src", "models"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info"))
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(tmp_path / "lib")], cwd=src,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    shipped = tmp_path / "lib" / "gemini_kernels" / "csrc"
    assert _jit_build.host_sources([shipped]) == sorted(
        shipped / p.name for p in (ROOT / "csrc").glob("*.cpp") if p.name != "fusion_cuda.cpp")
    assert (shipped / "fusion_math.h").is_file()
