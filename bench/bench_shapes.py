"""The benchmark's shapes (SPEC §4) and the work each compared function must do on them.

A stage of an RGB-X encoder at input ``H x W`` has ``N = (H / 2^(s+1)) * (W / 2^(s+1))`` tokens (stride
4, 8, 16, 32) of width ``C`` set by the backbone. The floor of a run is
``max(FLOPs / matmul rate, bytes / memory bandwidth)`` with the counts below.
"""
from __future__ import annotations

from dataclasses import dataclass

from gemini_kernels.cost import Work, fusion_floor, fusion_weight_count  # noqa: F401 (re-exported)

# Input resolution (H, W) of each dataset's standard training crop.
DATASETS = {
    "nyudv2": (480, 640),
    "sunrgbd": (480, 480),
    "deliver": (1024, 1024),
}

# Stage widths of each backbone family: MiT-B0, MiT-B1 (B2-B5 share B1's widths), Swin-T/S, -B, -L.
FAMILIES = {
    "mit-b0": (32, 64, 160, 256),
    "mit-b1": (64, 128, 320, 512),
    "swin-t": (96, 192, 384, 768),
    "swin-b": (128, 256, 512, 1024),
    "swin-l": (192, 384, 768, 1536),
}

PASSES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Shape:
    label: str  # e.g. "nyudv2 s3 mit-b1"
    tokens: int  # N
    dim: int  # C

    def __str__(self) -> str:
        return f"{self.label} N={self.tokens} C={self.dim}"


def stage_shapes(datasets, families, stages) -> list:
    shapes = []
    for dataset in datasets:
        height, width = DATASETS[dataset]
        for family in families:
            for stage in stages:
                stride = 2 ** (stage + 1)
                shapes.append(Shape(f"{dataset} s{stage} {family}", (height // stride) * (width // stride),
                                    FAMILIES[family][stage - 1]))
    return shapes


def stage_dims(dataset: str = "nyudv2", family: str = "mit-b1") -> dict:
    """``{stage: (N, C)}`` of one dataset and backbone family, from :func:`stage_shapes`: the shapes of
    the CPU scripts and experiments (NYUDv2 with MiT-B1 widths: 19200x64, 4800x128, 1200x320, 300x512)."""
    stages = (1, 2, 3, 4)
    return {stage: (shape.tokens, shape.dim) for stage, shape in zip(stages, stage_shapes([dataset], [family], stages))}


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
