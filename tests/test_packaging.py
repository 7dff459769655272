"""Packaging: the licence, an sdist that carries everything setup.py compiles (csrc/), and (opt-in,
GK_INSTALL_TESTS=1) a plain `pip install .` into a fresh venv."""
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_license_file_and_metadata():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Permission is hereby granted, free of charge" in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'license = {text = "MIT"}' in pyproject


@pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs the source tree")
def test_sdist_contains_csrc_and_license(tmp_path):
    """`setup.py sdist` offline, on a copy of the tree (nothing is written into the checkout): every
    file of csrc/ (headers and .cu included, which setuptools does not find by itself) and the
    licence are in the tarball, and its metadata names the licence."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", ".pytest_cache", "runs", ".whl",
        "out"))
    done = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (tarball,) = (tmp_path / "dist").glob("gemini_kernels-*.tar.gz")
    with tarfile.open(tarball) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        top = tar.getnames()[0].split("/")[0]
        pkg_info = tar.extractfile(f"{top}/PKG-INFO").read().decode()
    csrc = sorted(p.name for p in (ROOT / "csrc").iterdir() if p.is_file())
    assert any(n.endswith(".h") for n in csrc) and any(n.endswith(".cu") for n in csrc)
    missing = [f"csrc/{n}" for n in csrc if f"csrc/{n}" not in names]
    assert not missing, f"the sdist lacks {missing}"
    for needed in ("LICENSE", "README.md", "pyproject.toml", "setup.py", "src/gemini_kernels/__init__.py",
                   "models/gemini_seg/train.py"):
        assert needed in names, f"the sdist lacks {needed}"
    assert "License: MIT" in pkg_info or "License-Expression: MIT" in pkg_info, pkg_info[:1000]


def test_readme_says_how_to_install_and_to_activate_the_environment():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    assert "pip install --no-build-isolation -e ." in section and "\npip install .  " in section
    assert "NOT compiled" in section and "python -m gemini_kernels" in section  # what a plain install loses
    assert "source .venv/bin/activate" in section


FRESH_VENV_CHILD = """
import sys, gemini_kernels as gk
assert "site-packages" in gk.__file__, gk.__file__  # the installed copy, not the checkout
print("backends", " ".join(gk.available_backends("cpu")))
"""


@pytest.mark.install  # minutes (torch into a new venv, an isolated build, a first-use compile): opt-in
@pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs the source tree")
def test_plain_pip_install_into_a_fresh_venv_gets_the_compiled_cpu_backend(tmp_path):
    """Issue 12: `pip install .` (build isolation, so no torch at build time and no gemini_kernels._C)
    into a new venv with nothing but torch==2.13.0: available_backends("cpu") includes "cpu_cpp", the
    host C++ path, compiled on first use, and the first use says so."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    # The machine's pip settings (where torch's file lies) stay; nothing of the test's own environment
    # (its venv, an import path, the GK_ switches) may leak into the new one.
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME") and not k.startswith("GK_")}
    outer = os.path.dirname(sys.executable)
    path = [d for d in env.get("PATH", "").split(os.pathsep) if d and os.path.abspath(d) != outer]
    env.update(PATH=os.pathsep.join([str(venv / "bin"), *path]),  # as `source venv/bin/activate` would
               PIP_DISABLE_PIP_VERSION_CHECK="1", GK_CACHE_DIR=str(tmp_path / "cache"))

    def pip(*args, timeout):
        done = subprocess.run([py, "-m", "pip", "install", "-q", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    pip("torch==2.13.0", timeout=900)  # pinned: the CPU build on this machine's disk (see setup_env.sh)
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", ".pytest_cache", "runs", ".whl",
        "out"))
    pip(str(src), timeout=900)  # plain: build isolation, as a user types it
    installed = subprocess.run([py, "-c", "import importlib.util as u; print(u.find_spec('gemini_kernels._C'))"],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert installed.stdout.strip() == "None", installed.stdout + installed.stderr  # no extension installed

    done = subprocess.run([py, "-c", FRESH_VENV_CHILD], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    backends = done.stdout.split("backends", 1)[1].split()
    assert "cpu_cpp" in backends and "torch" in backends, done.stdout + done.stderr[-4000:]
    assert "compiling its host C++ path once into" in done.stderr
