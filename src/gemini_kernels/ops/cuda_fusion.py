"""The ``"cuda"`` and ``"cpu_cpp"`` backends: the compiled extension ``gemini_kernels._C`` (csrc/).

On CUDA tensors (``"cuda"``) it runs the CUDA kernels (csrc/fusion_kernels.cu): the forward and the
backward of float16 / bfloat16 layers of C <= 128 channels as fused tensor-core kernels
(csrc/fused_forward.h, csrc/fused_backward.h), of wider ones as tensor-core block products with the
per-pixel math in their prologues and epilogues (csrc/wide_forward.h, csrc/wide_backward.h), everything
else as row-stage kernels between cuBLAS GEMMs; on CPU tensors (``"cpu_cpp"``, which ``backend="cuda"`` runs there too) it runs the same
per-pixel math as host C++ (csrc/fusion_host.cpp) between MKL GEMMs.

The extension registers two ops, ``torch.ops.gemini_kernels.fusion_forward`` and ``fusion_backward``;
this module gives them fake implementations (so ``torch.compile`` traces them) and autograd formulas
(registered on the ops, so the raw ops are differentiable too): the forward's saves the inputs and
the per-pixel, per-head gates, and recomputes the rest; on CPU from a width on it saves the forward's
products too (see ``saves_activations``). The backward op's formula refuses second derivatives.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..params import FusionParams
from ..validation import refuse_unsupported_transforms
from .autocast import like_the_oracle
from .autograd_calls import FastFunction, backward_op_autograd

_BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` in the repository, in an environment where "
    "torch is importable (CUDA kernels are compiled in when torch has CUDA and nvcc is found)"
)
_load_error: Optional[str] = None
_loaded = False


def _load() -> bool:
    """Imports the extension once and registers the fake implementations of its ops."""
    global _loaded, _load_error
    if _loaded or _load_error is not None:
        return _loaded
    try:
        from .. import _C  # noqa: F401  (importing registers torch.ops.gemini_kernels.*)
    except ImportError as exc:
        # An install without the extension (a plain `pip install .` builds without torch): compile the
        # host path now, once per torch version (_jit_build.py; GK_NO_JIT_BUILD=1 turns this off).
        try:
            from .._jit_build import build_host_extension

            build_host_extension()
        except Exception as jit_exc:  # no sources, compiler or ninja, or a compile error
            _load_error = (f"the compiled extension gemini_kernels._C is not importable ({exc}); compiling it on "
                           f"first use failed ({jit_exc}); {_BUILD_HINT}")
            return False
    torch.library.register_fake("gemini_kernels::fusion_forward")(_fusion_forward_fake)
    torch.library.register_fake("gemini_kernels::fusion_backward")(_fusion_backward_fake)
    _register_autograd()
    _loaded = True
    return True


def _gate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=None)
def _simd_saves(channels: int, dtype: torch.dtype) -> bool:
    """Whether a CPU forward saving activations for this width and dtype runs the SIMD forward, which
    saves its own (csrc/fusion_api.h): asked of the extension on a real, empty tensor."""
    with unset_fake_temporarily():
        return bool(torch.ops.gemini_kernels.takes_simd_forward(torch.empty(0, channels, dtype=dtype), True))


@functools.lru_cache(maxsize=None)
def _simd_saved_pixel_multiple() -> int:
    with unset_fake_temporarily():
        return int(torch.ops.gemini_kernels.simd_saved_pixel_multiple())


def _fusion_forward_fake(x0, x1, params, num_heads, save_activations=False):
    gate = x0.new_empty((2, *x0.shape[:-1], num_heads), dtype=_gate_dtype(x0.dtype))
    activations = []
    if save_activations:
        c = x0.shape[-1]
        m = x0.numel() // c if c else 0
        # The kernel depends on the width itself (int() specializes a symbolic one), not on the pixels.
        if x0.device.type == "cpu" and _simd_saves(int(c), x0.dtype):
            # The SIMD forward's products: 10 of (pixels rounded up to the multiple, C) (csrc/simd_fusion.h).
            k = _simd_saved_pixel_multiple()
            activations = [x0.new_empty(((m + k - 1) // k * k, c)) for _ in range(10)]
        else:  # the chain's g0, g1, z, dk
            activations = [x0.new_empty((m, 5 * c)), x0.new_empty((m, 5 * c)),
                           x0.new_empty((2, m, c)), x0.new_empty((2, m, c))]
    return x0.new_empty(x0.shape), x1.new_empty(x1.shape), gate, activations


def _fusion_backward_fake(grad_y0, grad_y1, x0, x1, params, gate, activations, num_heads):
    return [x0.new_empty(x0.shape), x1.new_empty(x1.shape), *(p.new_empty(p.shape) for p in params)]


def backend_name(x: torch.Tensor) -> str:
    """The name of the backend this module runs for ``x``'s device (backends.BACKENDS)."""
    return "cuda" if x.device.type == "cuda" else "cpu_cpp"


def _has_cuda_kernels() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("gemini_kernels::fusion_forward", "CUDA")


def unavailable_reason(device: torch.device) -> Optional[str]:
    if not _load():
        return _load_error
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not _has_cuda_kernels():
            return (
                "the extension gemini_kernels._C was built without CUDA kernels (at build time torch had no "
                f"CUDA or nvcc was not found); on a machine with the CUDA toolkit, {_BUILD_HINT}"
            )
        if not torch.cuda.is_available():  # a CUDA build of the extension on a machine without a GPU
            return "no CUDA device is visible (torch.cuda.is_available() is False)"
        return None
    return f"it runs on CPU and CUDA tensors only; got a tensor on {device.type}"


def weight_cache_info() -> dict:
    """The counters of the extension's packed-weight cache (csrc/fusion_api.h, cached_pack_weights):
    the parameters are rearranged for the GEMMs once per parameter version, not on every call."""
    if not _load():
        raise RuntimeError(f"the compiled extension gemini_kernels._C is not available: {_load_error}")
    hits, misses, uncached, entries = torch.ops.gemini_kernels.weight_cache_info()
    return {"hits": hits, "misses": misses, "uncached": uncached, "entries": entries}


def clear_weight_cache() -> None:
    """Forgets every packed weight (and zeroes the counters): for parameters changed in a way their
    version counter does not see, such as ``p.data.copy_(...)``."""
    if not _load():
        raise RuntimeError(f"the compiled extension gemini_kernels._C is not available: {_load_error}")
    torch.ops.gemini_kernels.clear_weight_cache()


@contextlib.contextmanager
def weight_cache_disabled():
    """Packs the weights on every call inside the block: for code that changes parameters past their
    version counter, such as ``torch.autograd.gradcheck``, which perturbs its inputs through ``.data``."""
    if not _load():
        raise RuntimeError(f"the compiled extension gemini_kernels._C is not available: {_load_error}")
    previous = torch.ops.gemini_kernels.set_weight_cache_enabled(False)
    try:
        yield
    finally:
        torch.ops.gemini_kernels.set_weight_cache_enabled(previous)


# The channel count from which a CPU forward that autograd will differentiate keeps its products for
# the backward instead of letting the backward recompute them: the SIMD forward (C <= 128,
# csrc/simd_fusion.h) its u, r, q, dk and mixed (10 C values per pixel; the backward then does 14 of
# its 20 C^2 multiply-adds per pixel and direction), the chain its GEMM outputs g, z and dk (14 C
# values; 7 of its 23 C^2). Keeping costs writing and reading them, recomputing costs C^2: with the
# SIMD kernels, forward + backward took 8-11 % less time keeping them at C = 96 and 128 (a Xeon), and
# at C = 64 the same on the Xeon and 5-10 % less on an AMD EPYC (Zen 5), measured over two layers'
# training step (bench/RESULTS.md, bench/experiments/cpu_layer_stack.py --stages 1); narrower layers
# (MiT-B0's C = 32) recompute, unmeasured. The chain's layer stack ran fastest keeping them from
# C = 129 on.
SAVE_ACTIVATIONS_FROM_WIDTH = 64


def saves_activations(x0: torch.Tensor) -> bool:
    """Whether a differentiated forward keeps its activations for the backward: on CPU, from
    SAVE_ACTIVATIONS_FROM_WIDTH channels on. On CUDA the backward recomputes them, as the Triton
    backend does, to keep training memory low (the op supports saving there too; which is faster
    on a GPU is not measured yet)."""
    return x0.device.type == "cpu" and x0.shape[-1] >= SAVE_ACTIVATIONS_FROM_WIDTH


class _ForwardFunction(FastFunction):
    """The differentiable fusion_forward: the parameters as trailing arguments (autograd.Function
    takes no lists of tensors); the outputs flat, y0, y1, gate, then the activations."""

    @staticmethod
    def forward(x0, x1, num_heads, save_activations, *params):
        with torch._C._AutoDispatchBelowAutograd():  # the CPU / CUDA kernel, not _forward_autograd again
            y0, y1, gate, activations = _forward_op(x0, x1, list(params), num_heads, save_activations)
        return y0, y1, gate, *activations

    @staticmethod
    def setup_context(ctx, inputs, output):
        x0, x1, num_heads, _save_activations, *params = inputs
        _, _, gate, *activations = output
        # The gates and activations are the backward's inputs, not results a caller differentiates.
        ctx.mark_non_differentiable(gate, *activations)
        # Else autograd hands the backward a zero-filled gradient for each of them (and for an
        # unused y): allocated and written on every backward, tensors as large as the activations
        # (at C = 128, batch 2, 13 % of a forward + backward on CPU), never read.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x0, x1, gate, *activations, *params)
        ctx.num_heads = num_heads
        ctx.num_activations = len(activations)

    @staticmethod
    def backward(ctx, grad_y0, grad_y1, *_unused):
        x0, x1, gate, *rest = ctx.saved_tensors
        # None where a loss uses one output only (gradients are not materialized, above).
        # Contiguous zeros (zeros_like keeps a non-contiguous x's strides, which the kernels would copy).
        grad_y0 = x0.new_zeros(x0.shape) if grad_y0 is None else grad_y0
        grad_y1 = x1.new_zeros(x1.shape) if grad_y1 is None else grad_y1
        activations, params = rest[:ctx.num_activations], rest[ctx.num_activations:]
        # Not once_differentiable, which returns constants whenever the incoming gradients do not
        # require grad (a gradient penalty on y0.sum()), so that the penalty's gradient came out
        # wrong. Under create_graph=True this runs with grad mode on, and fusion_backward's own
        # Autograd kernel (autograd_calls.backward_op_autograd) makes a derivative through these
        # gradients raise.
        grads = torch.ops.gemini_kernels.fusion_backward(
            grad_y0, grad_y1, x0, x1, params, gate, activations, ctx.num_heads)
        return grads[0], grads[1], None, None, *grads[2:]


def _forward_autograd(x0, x1, params, num_heads, save_activations=False):
    """fusion_forward's Autograd kernel: the raw op (torch.ops.gemini_kernels.fusion_forward) is
    differentiable, as the backend is; without it autograd left the inputs' gradients None and only
    warned. Written by hand rather than with torch.library.register_autograd, whose kernel skips
    autograd when no input requires grad, so that forward-mode AD (whose dual tensors need not)
    silently got zero tangents; here it raises."""
    refuse_unsupported_transforms(backend_name(x0), (x0, x1, *params), lifted=True)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x0, x1, *params)):
        y0, y1, gate, *activations = _ForwardFunction.apply(x0, x1, num_heads, save_activations, *params)
        return y0, y1, gate, activations
    with torch._C._AutoDispatchBelowAutograd():
        return _forward_op(x0, x1, params, num_heads, save_activations)


_library = None  # the fragment holding the Autograd kernels; kept alive, as dropping it unregisters
_forward_op = None  # the ops' overloads, taken once: their Autograd kernels call them below the Autograd key
_backward_op = None


def _register_autograd() -> None:
    global _library, _forward_op, _backward_op
    if _library is not None:
        return
    _forward_op = torch.ops.gemini_kernels.fusion_forward.default
    _backward_op = torch.ops.gemini_kernels.fusion_backward.default
    _library = torch.library.Library("gemini_kernels", "FRAGMENT")
    _library.impl("fusion_forward", _forward_autograd, "Autograd")
    _library.impl("fusion_backward", backward_op_autograd(
        _backward_op,
        "gemini_kernels: the backward of the compiled extension (backend 'cuda' / 'cpu_cpp') is not differentiable: "
        "it cannot differentiate twice (a gradient penalty or another second derivative of GeminiFusion needs "
        "backend='torch')"), "Autograd")


def _apply(x0, x1, num_heads, params):
    differentiated = torch.is_grad_enabled() and any(t.requires_grad for t in (x0, x1, *params))
    save = differentiated and saves_activations(x0)
    y0, y1, _gate, _activations = torch.ops.gemini_kernels.fusion_forward(x0, x1, list(params), num_heads, save)
    return y0, y1


def fusion(x0: torch.Tensor, x1: torch.Tensor, params: FusionParams, num_heads: int):
    """``(y0, y1)``; inputs validated by the caller (functional.gemini_fusion)."""
    if not _load():
        raise RuntimeError(f"the compiled extension gemini_kernels._C is not available: {_load_error}")
    refuse_unsupported_transforms(backend_name(x0), (x0, x1, *params))  # also when called without gemini_fusion
    # Under autocast as the oracle (ops/autocast.py).
    return like_the_oracle(lambda a, b, p, h: _apply(a, b, h, p), x0, x1, params, num_heads)
