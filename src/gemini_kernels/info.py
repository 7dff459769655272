"""An environment report, as ``python -m xformers.info`` gives: ``python -m gemini_kernels``.

Versions (python, torch, triton, numpy), CUDA and its devices, how the package and its compiled
extension were installed, and which backends can run on cpu and on cuda, with the reason for each one
that cannot (``gemini_kernels.backends``). ``--json`` prints the same as JSON.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Optional

import torch

from . import __version__
from .backends import AUTO_ORDER, BACKENDS

DEVICES = ("cpu", "cuda")
ENV_VARS = ("TRITON_INTERPRET", "CUDA_HOME", "TORCH_CUDA_ARCH_LIST", "CUDA_VISIBLE_DEVICES", "ATEN_CPU_CAPABILITY")


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed (no __version__)")
    except Exception as exc:  # noqa: BLE001  (an optional dependency that fails to import says why)
        return f"not importable ({type(exc).__name__}: {exc})"


def _install() -> str:
    """How the distribution was installed: editable from a checkout, or a copy in site-packages."""
    try:
        from importlib import metadata

        dist = metadata.distribution("gemini-kernels")
    except Exception:  # noqa: BLE001
        return f"not installed as a distribution (imported from {Path(__file__).parent})"
    direct = dist.read_text("direct_url.json")
    if direct:
        url = json.loads(direct)
        if url.get("dir_info", {}).get("editable"):
            return f"editable install of {url.get('url', '?').removeprefix('file://')} (pip install -e)"
    return f"installed copy, {dist.version} (pip install .)"


def _extension() -> dict:
    """Whether gemini_kernels._C imports, where from, and what it was built with."""
    try:
        ext = importlib.import_module("gemini_kernels._C")
    except ImportError as exc:
        from ._jit_build import cache_dir

        cached = sorted(str(p) for p in cache_dir().glob("_C*.so"))
        return {"present": False, "error": str(exc),
                "hint": "built by `pip install --no-build-isolation -e .` (or `.`) where torch is importable at "
                        "build time; a build-isolated `pip install .` skips it; "
                        + (f"a first-use build is cached at {cached[0]}" if cached
                           else f"a first-use build (gemini_kernels._jit_build) would go to {cache_dir()}")}
    cuda_kernels = torch._C._dispatch_has_kernel_for_dispatch_key("gemini_kernels::fusion_forward", "CUDA")
    simd = list(torch.ops.gemini_kernels.simd_isas())
    return {"present": True, "file": getattr(ext, "__file__", "?"),
            "built_with": "host C++ path and CUDA kernels" if cuda_kernels
            else "host C++ path only (no CUDA kernels: torch without CUDA or no nvcc at build time)",
            "simd_isas": simd}


def _devices() -> list:
    if not torch.cuda.is_available():
        return []
    found = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        found.append(f"cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2 ** 30:.0f} GiB)")
    return found


def backend_status(device: str) -> dict:
    """Backend name -> None when it can run on ``device``, else the reason it cannot."""
    status = {}
    for name, backend in BACKENDS.items():
        try:
            status[name] = backend.unavailable_reason(torch.device(device))
        except Exception as exc:  # noqa: BLE001  (a probe that fails is itself the answer)
            status[name] = f"checking it failed: {type(exc).__name__}: {exc}"
    return status


def _support(backend) -> str:
    devices = "any device" if backend.devices is None else " and ".join(backend.devices)
    return f"devices: {devices}; dtypes: {backend.dtype_names()}; widths: {backend.widths}"


def _auto(device: str, status: dict) -> Optional[str]:
    return next((n for n in AUTO_ORDER.get(device, ("torch",)) if status.get(n) is None), None)


def collect() -> dict:
    backends = {device: backend_status(device) for device in DEVICES}
    return {
        "backend_summaries": {name: backend.summary for name, backend in BACKENDS.items()},
        "backend_support": {name: _support(backend) for name, backend in BACKENDS.items()},
        "gemini_kernels": {"version": __version__, "path": str(Path(__file__).parent), "install": _install()},
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "torch": f"{torch.__version__} (CUDA build: {torch.version.cuda or 'none, a CPU build'})",
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": _devices(),
        "extension": _extension(),
        "backends": backends,
        "auto": {device: _auto(device, backends[device]) for device in DEVICES},
        "environment": {var: os.environ[var] for var in ENV_VARS if var in os.environ},
    }


def format_report(info: dict) -> str:
    gk, ext = info["gemini_kernels"], info["extension"]
    lines = [
        f"gemini_kernels {gk['version']}: {gk['path']}",
        f"  install: {gk['install']}",
        f"python {info['python']}",
        f"platform {info['platform']}",
        f"torch {info['torch']}",
        f"triton {info['triton']}",
        f"numpy {info['numpy']}",
        f"CUDA available: {info['cuda_available']}"
        + (f"; devices: {', '.join(info['cuda_devices'])}" if info["cuda_devices"] else ""),
    ]
    if ext["present"]:
        lines.append(f"extension gemini_kernels._C: present, {ext['built_with']}: {ext['file']}")
        lines.append("  host SIMD kernels (float32 / float64, C <= 128): "
                     + (f"{ext['simd_isas'][0]} (this CPU runs {', '.join(ext['simd_isas'])})" if ext["simd_isas"]
                        else "none on this CPU or ATEN_CPU_CAPABILITY (the chain runs every call)"))
    else:
        lines.append(f"extension gemini_kernels._C: absent ({ext['error']}); {ext['hint']}")
    width = max(len(n) for n in BACKENDS)
    for name, summary in info["backend_summaries"].items():
        lines.append(f"backend {name:<{width}}: {summary}")
        lines.append(f"        {'':<{width}}  {info['backend_support'][name]}")
    for device in DEVICES:
        for name, reason in info["backends"][device].items():
            elsewhere = BACKENDS[name].runs_elsewhere.get(device)
            state = "available" if reason is None else f"unavailable: {reason}"
            lines.append(f"backend {name:<{width}} on {device:<4}: "
                         + (f"runs {elsewhere}: {state}" if elsewhere else state))
        lines.append(f"backend='auto' on {device}: {info['auto'][device] or 'none (no backend can run there)'}")
    for var, value in info["environment"].items():
        lines.append(f"${var}={value}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gemini_kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=1) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
