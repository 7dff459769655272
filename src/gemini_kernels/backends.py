"""Backend registry and dispatch.

A backend is a function ``(x0, x1, params: FusionParams, num_heads) -> (y0, y1)`` that supports
autograd. Each lives in its own module and is imported lazily, so the package imports on machines
without Triton or without the compiled extension; a backend that cannot run says why, and how to fix it.

``"auto"`` picks, per device, the first available backend of ``AUTO_ORDER``. The order is a
measurement, not a preference: see bench/RESULTS.md.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # module that defines `fusion` and `unavailable_reason(device) -> Optional[str]`
    summary: str

    def load(self):
        return importlib.import_module(self.module, __package__)

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        try:
            mod = self.load()
        except ImportError as exc:  # a missing optional dependency, e.g. triton
            return f"importing {self.module.lstrip('.')} failed: {exc}"
        return mod.unavailable_reason(device)

    def fusion(self) -> Callable:
        return self.load().fusion


BACKENDS = {
    b.name: b
    for b in (
        Backend("torch", ".ops.torch_fusion", "the pure-PyTorch oracle (reference.py)"),
        Backend("triton", ".ops.triton_fusion", "fused Triton kernels"),
        Backend("cuda", ".ops.cuda_fusion", "CUDA C++ kernels (GPU) and the fused host C++ path (CPU)"),
    )
}

AUTO_ORDER = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cuda", "torch"),
}
_AUTO_DEFAULT = ("torch",)


def available_backends(device="cpu") -> list:
    """Names of the backends usable for tensors on ``device`` (``"torch"`` always)."""
    device = torch.device(device)
    return [name for name, b in BACKENDS.items() if b.unavailable_reason(device) is None]


# Backend entry points loaded so far. torch.compile cannot trace importlib, so resolve_backend (run
# eagerly by dynamo, as a constant) loads the backend it picks, and get_fusion only looks it up.
_LOADED_FUSIONS: dict = {}


@torch.compiler.assume_constant_result
def resolve_backend(name: str, device: torch.device) -> str:
    """The concrete backend name for ``name`` on ``device``; raises if it cannot run there."""
    resolved = _resolve_backend(name, device)
    if resolved not in _LOADED_FUSIONS:
        _LOADED_FUSIONS[resolved] = BACKENDS[resolved].fusion()
    return resolved


def _resolve_backend(name: str, device: torch.device) -> str:
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, _AUTO_DEFAULT):
            if BACKENDS[candidate].unavailable_reason(device) is None:
                return candidate
        return "torch"
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {['auto', *BACKENDS]}; got {name!r}")
    reason = BACKENDS[name].unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend={name!r} is not available for tensors on {device}: {reason}")
    return name


def get_fusion(name: str) -> Callable:
    fusion = _LOADED_FUSIONS.get(name)
    return BACKENDS[name].fusion() if fusion is None else fusion
