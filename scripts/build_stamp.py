"""Whether this checkout's build (the editable install and its C++ extension) is up to date.

scripts/setup_env.sh rebuilds only when it is not, instead of on every call (~60 s):

    python scripts/build_stamp.py check STAMP   # exit 0: up to date; 1: rebuild (the reason on stderr)
    python scripts/build_stamp.py write STAMP   # after a successful build

The stamp (``$VENV/.gemini_kernels_build``) records a hash of every input of the build (csrc/*,
setup.py, pyproject.toml, the torch version, the compiler-related environment and the checkout's path)
and the file of the extension, if it was importable. The build is stale when an input changed, when
``gemini_kernels`` is not installed from this checkout, or when the extension file the stamp recorded
is gone (e.g. after ``git clean``). ``GK_REBUILD=1`` makes setup_env.sh rebuild anyway. The check
imports neither torch nor the package, so an up-to-date set-up costs a fraction of a second here.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def inputs(root: Path = ROOT) -> dict:
    """Name -> hash of everything the build depends on."""
    root = Path(root).resolve()
    found = {}
    files = sorted((root / "csrc").glob("*")) + [root / "setup.py", root / "pyproject.toml"]
    for path in files:
        if path.is_file():
            found[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    found["torch"] = _torch_version()
    found["python"] = sys.version.split()[0]
    found["checkout"] = str(root)
    for var in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST", "CXX"):
        found[f"${var}"] = os.environ.get(var, "")
    found["nvcc"] = shutil.which("nvcc") or ""
    return found


def _torch_version() -> str:
    # The installed distribution's version ("2.13.0+cpu", "2.5.1+cu124"): no import of torch (seconds).
    from importlib import metadata

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:  # a torch without metadata (e.g. on PYTHONPATH)
        import torch

        return f"{torch.__version__} (CUDA {torch.version.cuda})"


def stale(stamp: Path, root: Path = ROOT) -> list:
    """Why the inputs differ from those recorded in ``stamp`` (empty when they do not)."""
    try:
        recorded = json.loads(Path(stamp).read_text())["inputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"no build recorded in {stamp}"]
    now = inputs(root)
    return [f"{name} changed" if name in recorded and name in now else
            f"{name} {'added' if name in now else 'removed'}"
            for name in sorted(set(now) | set(recorded)) if now.get(name) != recorded.get(name)]


def _extension_file() -> str:
    """The path of the importable extension, or "" (a fresh interpreter: this one may hold an older one)."""
    done = subprocess.run([sys.executable, "-c", "import gemini_kernels._C as c; print(c.__file__)"],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def installed(stamp: Path, root: Path = ROOT) -> list:
    """Why the installed package is not this checkout's build (empty when it is). Found without
    importing it (which imports torch)."""
    src = Path(root).resolve() / "src"
    spec = importlib.util.find_spec("gemini_kernels")
    if spec is None or spec.origin is None or not Path(spec.origin).resolve().is_relative_to(src):
        return [f"gemini_kernels is not installed from {src}"
                + (f" (found at {spec.origin})" if spec is not None and spec.origin else "")]
    try:
        extension = json.loads(Path(stamp).read_text()).get("extension", "")
    except (OSError, ValueError, AttributeError):
        extension = ""
    if extension and not Path(extension).is_file():
        return [f"the extension built last time, {extension}, is gone"]
    return []


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("check", "write"):
        print(__doc__, file=sys.stderr)
        return 2
    command, stamp = argv[0], Path(argv[1])
    if command == "check":
        reasons = stale(stamp) or installed(stamp)
        if reasons:
            print("[setup] building gemini_kernels: " + "; ".join(reasons), file=sys.stderr)
            return 1
        return 0
    write(stamp)
    return 0


def write(stamp: Path, root: Path = ROOT) -> None:
    """Records the current inputs (and whether the extension imports) as those of the last build."""
    stamp = Path(stamp)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"inputs": inputs(root), "extension": _extension_file()}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
