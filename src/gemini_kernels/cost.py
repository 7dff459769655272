"""The cost model of SPEC §4 (docs/spec.md §4): the fewest FLOPs and DRAM bytes a GeminiFusion call
needs. The benchmark's floor and the launch ledger both read it; it is stated nowhere else."""
from __future__ import annotations

from typing import NamedTuple

# Multiply-adds per pixel and direction with the key and value identities of SPEC §1: judger 3 C^2
# (fc1 2, fc2 1), query 1, key 1, value 1, output 1.
MACS_PER_PIXEL_DIRECTION = 7
# Elements per pixel a forward must move (read x0, x1; write y0, y1), and a forward + backward
# (also read x0, x1, dy0, dy1; write dx0, dx1).
FORWARD_ELEMENTS_PER_PIXEL = 4
TRAINING_ELEMENTS_PER_PIXEL = 10


class Work(NamedTuple):
    flops: float
    bytes: float


def fusion_weight_count(dim: int) -> int:
    """Elements of the fusion parameters: judger 3C^2 + 2C, two MHAs 4C^2 + 4C each, noises 4C."""
    return 11 * dim * dim + 14 * dim


def fusion_floor(dim: int, pixels: int, elem_size: int, passes: str) -> Work:
    """The minimum work of one call on ``pixels`` pixels of width ``dim``: ``passes`` is ``"fwd"`` or
    ``"fwd+bwd"``. FLOPs: 28 C^2 per pixel forward; each forward product costs two in the backward
    (input and weight gradients), so 84 C^2 forward + backward. Bytes: the inputs and outputs once,
    plus the weights once forward, three times forward + backward (read twice, gradients written);
    what a kernel saves for its backward is on top."""
    flops = 2.0 * 2 * MACS_PER_PIXEL_DIRECTION * dim * dim * pixels
    weights = fusion_weight_count(dim)
    if passes == "fwd":
        return Work(flops, (FORWARD_ELEMENTS_PER_PIXEL * dim * pixels + weights) * elem_size)
    if passes == "fwd+bwd":
        return Work(3 * flops, (TRAINING_ELEMENTS_PER_PIXEL * dim * pixels + 3 * weights) * elem_size)
    raise ValueError(f"passes must be 'fwd' or 'fwd+bwd'; got {passes!r}")
