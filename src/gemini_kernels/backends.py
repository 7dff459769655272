"""Backend registry and dispatch.

A backend is a function ``(x0, x1, params: FusionParams, num_heads) -> (y0, y1)`` that supports
autograd. Each lives in its own module and is imported lazily, so the package imports on machines
without Triton or without the compiled extension; a backend that cannot run says why, and how to fix it.

``"auto"`` picks, per device, the first available backend of ``AUTO_ORDER``. On CPU the order comes
from bench/cpu_host_vs_oracle.py; on CUDA it is the design's expectation (fused Triton kernels first)
until the GPU benchmark of bench/RESULTS.md confirms or reorders it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch


NO_CUDA_DEVICE = "no CUDA device is visible (torch.cuda.is_available() is False)"

# Bounds on ||out - ref|| / ||ref|| against the float64 oracle, for the outputs and every gradient:
# float32 with IEEE products (TF32 off), the 16-bit dtypes as the oracle itself meets them in that
# dtype. The backend tests assert a backend's bounds and the benchmark's guard applies them.
ORACLE_BOUNDS = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # module that defines `fusion` and `unavailable_reason(device) -> Optional[str]`
    summary: str  # what runs where: `python -m gemini_kernels` prints it
    # What this backend meets, per dtype (ORACLE_BOUNDS' kind of bound).
    bounds: Mapping[torch.dtype, float] = field(default_factory=lambda: dict(ORACLE_BOUNDS))

    def load(self):
        return importlib.import_module(self.module, __package__)

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            # Before asking the module: some probes (torch.cuda.get_device_capability) raise on a CPU-only
            # torch or a machine without a GPU instead of answering.
            return NO_CUDA_DEVICE
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
        Backend("torch", ".ops.torch_fusion", "the pure-PyTorch oracle (reference.py), on any device"),
        Backend("triton", ".ops.triton_fusion", "fused Triton kernels on CUDA tensors (on CPU tensors only "
                                                "under TRITON_INTERPRET=1, for tests)"),
        Backend("cuda", ".ops.cuda_fusion", "the compiled extension: CUDA C++ kernels on CUDA tensors, its "
                                            "fused host C++ path on CPU tensors"),
    )
}

AUTO_ORDER = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cuda", "torch"),
}
_AUTO_DEFAULT = ("torch",)


def available_backends(device="cpu") -> list:
    """Names of the backends usable for tensors on ``device`` (``"torch"`` always, on a device that
    exists: for ``"cuda"`` on a machine where no CUDA device is visible the list is empty)."""
    device = torch.device(device)
    return [name for name, b in BACKENDS.items() if b.unavailable_reason(device) is None]


@torch.compiler.assume_constant_result
def _resolve(name: str, device_type: str, device_index: int) -> str:
    # Runs eagerly even while torch.compile traces a caller (its result is a constant of the graph), so
    # the imports and availability probes below never enter a graph. It also loads the chosen backend
    # into _LOADED, from which the traced code reads the function.
    device = torch.device(device_type, device_index) if device_index >= 0 else torch.device(device_type)
    if name == "auto":
        order = AUTO_ORDER.get(device.type, _AUTO_DEFAULT)
        name = next((c for c in order if BACKENDS[c].unavailable_reason(device) is None), "torch")
    elif name not in BACKENDS:
        raise ValueError(f"backend must be one of {['auto', *BACKENDS]}; got {name!r}")
    else:
        reason = BACKENDS[name].unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"backend={name!r} is not available for tensors on {device}: {reason}")
    if name not in _LOADED:
        _LOADED[name] = BACKENDS[name].fusion()
    return name


_LOADED: dict = {}


def resolve_backend(name: str, device: torch.device) -> str:
    """The concrete backend name for ``name`` on ``device``; raises if it cannot run there."""
    return _resolve(name, device.type, -1 if device.index is None else device.index)


def get_fusion(name: str) -> Callable:
    """The fusion function of a backend returned by :func:`resolve_backend`."""
    return _LOADED[name]
