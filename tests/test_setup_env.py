"""scripts/setup_env.sh rebuilds the package only when its build is stale (scripts/build_stamp.py)."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gemini_kernels

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
FROM_THIS_CHECKOUT = Path(gemini_kernels.__file__).resolve().is_relative_to(ROOT / "src")


@pytest.fixture(scope="module")
def build_stamp():
    spec = importlib.util.spec_from_file_location("build_stamp", SCRIPTS / "build_stamp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_stamp_names_what_changed_since_the_last_build(build_stamp, tmp_path):
    root = tmp_path / "checkout"
    shutil.copytree(ROOT / "csrc", root / "csrc")
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(ROOT / name, root / name)
    stamp = tmp_path / "venv" / ".gemini_kernels_build"
    assert build_stamp.stale(stamp, root) == [f"no build recorded in {stamp}"]

    build_stamp.write(stamp, root)
    assert build_stamp.stale(stamp, root) == []
    with (root / "csrc" / "fusion_host.cpp").open("a") as f:
        f.write("\n// edited\n")
    (root / "csrc" / "new_kernel.cu").write_text("")
    assert build_stamp.stale(stamp, root) == ["csrc/fusion_host.cpp changed", "csrc/new_kernel.cu added"]

    build_stamp.write(stamp, root)
    recorded = json.loads(stamp.read_text())
    recorded["inputs"]["torch"] = "2.4.0 (CUDA None)"  # built against another torch
    stamp.write_text(json.dumps(recorded))
    assert build_stamp.stale(stamp, root) == ["torch changed"]
    assert build_stamp.stale(stamp, tmp_path / "elsewhere") != []  # another checkout: its own build


@pytest.mark.skipif(not FROM_THIS_CHECKOUT, reason="gemini_kernels is not installed from this checkout")
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_setup_env_does_not_rebuild_an_up_to_date_build(build_stamp, tmp_path):
    """The set-up of scripts/test.sh and scripts/bench.sh, on an environment whose build is current:
    no pip install -e (which took a minute on every call, --help included)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"  # this interpreter, under another environment directory
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    stamp = venv / ".gemini_kernels_build"
    subprocess.run([str(python), str(SCRIPTS / "build_stamp.py"), "write", str(stamp)], check=True)
    env = {k: v for k, v in os.environ.items() if k != "GK_REBUILD"}
    env.update(GK_VENV=str(venv), PIP_NO_INDEX="1")  # nothing is fetched: everything is installed
    done = subprocess.run(["bash", str(SCRIPTS / "setup_env.sh")], env=env, capture_output=True, text=True,
                          timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "building gemini_kernels" not in output and "gemini_kernels is up to date" in output, output[-3000:]

    stamp.unlink()  # no build recorded: the check says so, and setup_env.sh would build
    check = subprocess.run([str(python), str(SCRIPTS / "build_stamp.py"), "check", str(stamp)],
                           capture_output=True, text=True)
    assert check.returncode == 1 and "building gemini_kernels: no build recorded" in check.stderr


@pytest.mark.skipif(not FROM_THIS_CHECKOUT, reason="gemini_kernels is not installed from this checkout")
def test_a_vanished_extension_or_another_checkout_means_a_rebuild(build_stamp, tmp_path):
    stamp = tmp_path / ".gemini_kernels_build"
    stamp.write_text(json.dumps({"inputs": {}, "extension": str(tmp_path / "_C.so")}))
    assert build_stamp.installed(stamp) == [f"the extension built last time, {tmp_path / '_C.so'}, is gone"]
    stamp.write_text(json.dumps({"inputs": {}, "extension": ""}))  # built without the extension
    assert build_stamp.installed(stamp) == []
    assert build_stamp.installed(stamp, tmp_path)[0].startswith(f"gemini_kernels is not installed from {tmp_path}")
