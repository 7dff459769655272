"""Packaging: the licence, and an sdist that carries everything setup.py compiles (csrc/)."""
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
