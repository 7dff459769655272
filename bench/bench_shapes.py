"""The benchmark's shapes (``gemini_kernels.shapes``, SPEC §4) and the work each compared function
must do on them. The floor of a run is ``max(FLOPs / matmul rate, bytes / memory bandwidth)`` with
the counts below.
"""
from __future__ import annotations

from gemini_kernels.cost import Work, fusion_floor, fusion_weight_count  # noqa: F401 (re-exported)
from gemini_kernels.shapes import DATASETS, FAMILIES, Shape, stage_dims, stage_shapes  # noqa: F401 (re-exported)

PASSES = ("fwd", "fwd+bwd")


def token_exchange_weight_count(dim: int) -> int:
    """Elements of the two score nets (LN, C->C->C/2->C/4->2)."""
    one = 2 * dim + (dim * dim + dim) + (dim * dim // 2 + dim // 2) + (dim * dim // 8 + dim // 4) + (dim // 2 + 2)
    return 2 * one


def work(function: str, shape: Shape, batch: int, elem_size: int, passes: str) -> Work:
    """FLOPs and fewest bytes moved for one call of ``function`` on ``batch x shape``.

    GeminiFusion: ``gemini_kernels.cost.fusion_floor`` (SPEC §4). The baselines: their products, and
    their inputs and outputs once (forward + backward: 3x the FLOPs, the gradients' bytes too).
    """
    pixels = batch * shape.tokens
    c = shape.dim
    if function == "fusion":
        return fusion_floor(c, pixels, elem_size, passes)
    if function == "exchange":  # two score nets: C^2 (1 + 1/2 + 1/8) + C/2 multiply-adds per pixel
        flops, weights = 2 * 2 * (c * c * 13 / 8 + c / 2) * pixels, token_exchange_weight_count(c)
    elif function == "xattn":  # per direction: 4 projections and the two N x N products QK^T, AV
        n = shape.tokens
        flops = 2 * 2 * (4.0 * n * c * c + 2.0 * n * n * c) * batch
        weights = 8 * c * c + 8 * c
    else:
        raise ValueError(f"function must be 'fusion', 'exchange' or 'xattn'; got {function!r}")
    if passes == "fwd":
        return Work(flops, (4.0 * c * pixels + weights) * elem_size)
    return Work(3 * flops, (10.0 * c * pixels + 3 * weights) * elem_size)
