"""The functional API: ``gemini_fusion(x0, x1, params, num_heads=8, backend="auto")``."""
from __future__ import annotations

import torch

from .backends import get_fusion, resolve_backend
from .params import ParamsLike, as_fusion_params
from .validation import check_call, refuse_unsupported_transforms


def gemini_fusion(x0: torch.Tensor, x1: torch.Tensor, params: ParamsLike, num_heads: int = 8,
                  backend: str = "auto"):
    """GeminiFusion of two aligned token maps.

    Args:
        x0, x1: ``(..., C)`` tensors of the same shape, dtype and device (any leading dimensions,
            e.g. ``(B, N, C)``; non-contiguous is fine).
        params: a :class:`FusionParams`, or a mapping with the published parameter names
            (``GeminiFusion.state_dict()`` or the fusion entries of a published checkpoint).
        num_heads: attention heads; ``C`` must be divisible by it (8 in the published models).
        backend: ``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"`` or ``"cpu_cpp"``
            (:data:`gemini_kernels.backends.BACKENDS` says what each runs where).

    Returns:
        ``(y0, y1)``, each of the shape and dtype of ``x0``.
    """
    params = as_fusion_params(params)
    check_call(x0, x1, params, num_heads)
    name = resolve_backend(backend, x0.device, x0.dtype)  # raises if the requested backend cannot run here
    if x0.numel() == 0:
        # Kernels may assume at least one pixel; the oracle returns empty outputs (and zero gradients).
        # Resolved, not just named: resolving is what loads a backend (into backends._LOADED), and in a
        # fresh process that asked for another backend the oracle has not been loaded yet.
        name = resolve_backend("torch", x0.device, x0.dtype)
    if name != "torch":  # named as the caller named it ("cuda" on CPU runs cpu_cpp)
        refuse_unsupported_transforms(name if backend == "auto" else backend, (x0, x1, *params))
    return get_fusion(name)(x0, x1, params, num_heads)
