"""The stage shapes of SPEC §4: the tokens and width of each encoder stage of the datasets and
backbone families the project serves. The benchmark, the launch ledger and the tests read them here.

A stage ``s`` of an RGB-X encoder at input ``H x W`` has ``N = (H / 2^(s+1)) * (W / 2^(s+1))``
tokens (stride 4, 8, 16, 32) of width ``C`` set by the backbone.
"""
from __future__ import annotations

from dataclasses import dataclass

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
