"""Backend registry and dispatch.

A backend is a function ``(x0, x1, params: FusionParams, num_heads) -> (y0, y1)`` that supports
autograd. Each lives in its own module and is imported lazily, so the package imports on machines
without Triton or without the compiled extension; a backend that cannot run says why, and how to fix it.

Each backend declares what it supports (``Backend``: the device types it runs on, its dtypes, its widths)
and its module answers whether it can run here now (a missing Triton, an extension built without CUDA,
an old GPU); :func:`available_backends`, ``"auto"`` and the errors of an unavailable request follow from
these two. A name is what runs where: ``"cuda"`` is the extension's CUDA kernels and ``"cpu_cpp"`` its
host C++ path. ``backend="cuda"`` on CPU tensors runs ``"cpu_cpp"`` (``Backend.runs_elsewhere``), as it
always has, so code written for either device keeps one backend name.

``"auto"`` picks, per device, the first available backend of ``AUTO_ORDER``. On CPU the order comes
from bench/cpu_host_vs_oracle.py; on CUDA it is the design's expectation (fused Triton kernels first)
until the GPU benchmark of bench/RESULTS.md confirms or reorders it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Tuple

import torch

from .validation import SUPPORTED_DTYPES

NO_CUDA_DEVICE = "no CUDA device is visible (torch.cuda.is_available() is False)"

# Bounds on ||out - ref|| / ||ref|| against the float64 oracle, for the outputs and every gradient:
# float32 with IEEE products (TF32 off), the 16-bit dtypes as the oracle itself meets them in that
# dtype. The backend tests assert a backend's bounds and the benchmark's guard applies them.
ORACLE_BOUNDS = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}

ANY_WIDTH = "any C that num_heads divides"


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # module that defines `fusion` and `unavailable_reason(device) -> Optional[str]`
    summary: str  # what runs where: `python -m gemini_kernels` prints it
    # Device types the backend runs on; None: any device torch runs on.
    devices: Optional[Tuple[str, ...]]
    # Device types on which this name runs another backend: {device type: that backend's name}.
    runs_elsewhere: Mapping[str, str] = field(default_factory=dict)
    dtypes: Tuple[torch.dtype, ...] = SUPPORTED_DTYPES
    widths: str = ANY_WIDTH  # which layer widths it takes (each backend picks its kernels by width)
    # What this backend meets, per dtype (ORACLE_BOUNDS' kind of bound).
    bounds: Mapping[torch.dtype, float] = field(default_factory=lambda: dict(ORACLE_BOUNDS))

    def load(self):
        return importlib.import_module(self.module, __package__)

    def runs_on(self, device_type: str) -> bool:
        """Whether the backend itself declares ``device_type`` (not through ``runs_elsewhere``)."""
        return self.devices is None or device_type in self.devices

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        """None when ``backend=<name>`` can run on ``device`` now, else why not."""
        device = torch.device(device)
        if device.type in self.runs_elsewhere:
            return BACKENDS[self.runs_elsewhere[device.type]].unavailable_reason(device)
        if not self.runs_on(device.type):
            return f"it runs on {' and '.join(self.devices)} tensors; got a tensor on {device.type}"
        if device.type == "cuda" and not torch.cuda.is_available():
            # Before asking the module: some probes (torch.cuda.get_device_capability) raise on a CPU-only
            # torch or a machine without a GPU instead of answering.
            return NO_CUDA_DEVICE
        try:
            mod = self.load()
        except ImportError as exc:  # a missing optional dependency, e.g. triton
            return f"importing {self.module.lstrip('.')} failed: {exc}"
        return mod.unavailable_reason(device)

    def dtype_names(self) -> str:
        return ", ".join(str(d).replace("torch.", "") for d in self.dtypes)

    def unsupported_dtype_reason(self, dtype: torch.dtype) -> Optional[str]:
        if dtype in self.dtypes:
            return None
        return f"it computes in {self.dtype_names()}; got {dtype}"

    def fusion(self) -> Callable:
        return self.load().fusion


BACKENDS = {
    b.name: b
    for b in (
        Backend("torch", ".ops.torch_fusion", "the pure-PyTorch oracle (reference.py), on any device",
                devices=None),
        Backend("triton", ".ops.triton_fusion", "fused Triton kernels on CUDA tensors (on CPU tensors only "
                                                "under TRITON_INTERPRET=1, for tests)",
                devices=("cuda", "cpu")),
        Backend("cuda", ".ops.cuda_fusion", "the compiled extension's CUDA C++ kernels, on CUDA tensors "
                                            "(on CPU tensors backend='cuda' runs cpu_cpp)",
                devices=("cuda",), runs_elsewhere={"cpu": "cpu_cpp"}),
        Backend("cpu_cpp", ".ops.cuda_fusion", "the compiled extension's host C++ path on CPU tensors: SIMD "
                                               "kernels (AVX-512 or AVX2) for float32 / float64 layers of C <= "
                                               "128, else the CUDA kernels' per-pixel math, tiled over threads",
                devices=("cpu",)),
    )
}

AUTO_ORDER = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu_cpp", "torch"),
}
_AUTO_DEFAULT = ("torch",)


def available_backends(device="cpu") -> list:
    """Names of the backends usable for tensors on ``device`` (``"torch"`` always, on a device that
    exists: for ``"cuda"`` on a machine where no CUDA device is visible the list is empty). A name that
    runs another backend there (``"cuda"`` on CPU runs ``"cpu_cpp"``) is not listed twice."""
    device = torch.device(device)
    return [name for name, b in BACKENDS.items()
            if device.type not in b.runs_elsewhere and b.unavailable_reason(device) is None]


@torch.compiler.assume_constant_result
def _resolve(name: str, device_type: str, device_index: int, dtype: str) -> str:
    # Runs eagerly even while torch.compile traces a caller (its result is a constant of the graph), so
    # the imports and availability probes below never enter a graph. It also loads the chosen backend
    # into _LOADED, from which the traced code reads the function. dtype is its name (a constant).
    device = torch.device(device_type, device_index) if device_index >= 0 else torch.device(device_type)
    dtype = getattr(torch, dtype)
    if name == "auto":
        order = AUTO_ORDER.get(device.type, _AUTO_DEFAULT)
        name = next((c for c in order if BACKENDS[c].unavailable_reason(device) is None
                     and BACKENDS[c].unsupported_dtype_reason(dtype) is None), "torch")
    elif name not in BACKENDS:
        raise ValueError(f"backend must be one of {['auto', *BACKENDS]}; got {name!r}")
    else:
        backend = BACKENDS[name]
        reason = backend.unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"backend={name!r} is not available for tensors on {device}: {reason}")
        runs = backend.runs_elsewhere.get(device.type, name)
        reason = BACKENDS[runs].unsupported_dtype_reason(dtype)
        if reason is not None:
            raise TypeError(f"backend={name!r} does not support dtype {dtype}: {reason}")
        name = runs
    if name not in _LOADED:
        _LOADED[name] = BACKENDS[name].fusion()
    return name


_LOADED: dict = {}


def resolve_backend(name: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """The backend that runs for ``backend=name`` on ``device`` (a concrete name: ``"auto"`` resolved,
    ``"cuda"`` on CPU is ``"cpu_cpp"``); raises if it cannot run there, or not in ``dtype``."""
    dtype = torch.float32 if dtype is None else dtype
    return _resolve(name, device.type, -1 if device.index is None else device.index,
                    str(dtype).replace("torch.", ""))


def get_fusion(name: str) -> Callable:
    """The fusion function of a backend returned by :func:`resolve_backend`."""
    return _LOADED[name]
