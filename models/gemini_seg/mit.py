"""The dual-stream Mix Transformer (MiT, SegFormer's encoder) with GeminiFusion in every block.

Layout and names follow the published model (JiaDingCN/GeminiFusion, models/mix_transformer.py), so
that ImageNet MiT weights and published checkpoints map onto it by renaming alone (see checkpoint.py):
``patch_embed{s}``, ``block{s}.{i}.{norm1, attn.{q, kv, sr, norm, proj}, norm2, mlp.{fc1, dwconv.dwconv,
fc2}}``, ``norm{s}``. Every weight is shared by the streams except the LayerNorms (``ln_0``, ``ln_1``).
The fusion layer is ``attn.fusion``, a :class:`gemini_kernels.GeminiFusion`: it maps the two streams'
self-attention outputs, after the head merge and before the shared ``proj`` (SPEC §2).

With ``num_modalities=1`` the same code is a plain single-stream MiT (no fusion, one LayerNorm per
place); with ``fusion=False`` and two modalities, the dual-stream model with the fusion removed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gemini_kernels import GeminiFusion

from .layers import DropPath, ModalityLayerNorm, init_published


@dataclass(frozen=True)
class MiTConfig:
    embed_dims: Sequence[int]
    depths: Sequence[int]
    num_heads: Sequence[int] = (1, 2, 5, 8)
    sr_ratios: Sequence[int] = (8, 4, 2, 1)
    mlp_ratio: int = 4


MIT_CONFIGS = {
    "mit_b0": MiTConfig(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "mit_b1": MiTConfig(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2)),
    "mit_b2": MiTConfig(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3)),
    "mit_b3": MiTConfig(embed_dims=(64, 128, 320, 512), depths=(3, 4, 18, 3)),
    "mit_b4": MiTConfig(embed_dims=(64, 128, 320, 512), depths=(3, 8, 27, 3)),
    "mit_b5": MiTConfig(embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3)),
}


def _to_maps(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(S, B, N, C) tokens -> (S*B, C, H, W) maps for the shared convolutions."""
    s, b, _, c = x.shape
    return x.reshape(s * b, height, width, c).permute(0, 3, 1, 2)


def _to_tokens(x: torch.Tensor, streams: int) -> torch.Tensor:
    """(S*B, C, H, W) maps -> (S, B, H*W, C) tokens."""
    sb, c = x.shape[:2]
    return x.flatten(2).transpose(1, 2).reshape(streams, sb // streams, -1, c)


class OverlapPatchEmbed(nn.Module):
    """Strided convolution with overlapping windows (7x7/4 for stage 1, 3x3/2 after), then LayerNorm."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, stride: int, num_modalities: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.norm = ModalityLayerNorm(dim, num_modalities)

    def forward(self, maps: torch.Tensor, streams: int):
        maps = self.proj(maps)
        height, width = maps.shape[-2:]
        return self.norm(_to_tokens(maps, streams)), height, width


class Attention(nn.Module):
    """MiT spatial-reduction self-attention per stream (shared weights), then GeminiFusion across the
    streams on the merged heads, then the shared output projection."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, num_modalities: int, fusion: bool,
                 fusion_heads: int, fusion_backend: str, proj_drop: float):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if fusion and num_modalities != 2:
            raise ValueError(f"fusion needs exactly 2 modalities; got num_modalities={num_modalities}")
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = ModalityLayerNorm(dim, num_modalities)
        self.fusion = GeminiFusion(dim, num_heads=fusion_heads, backend=fusion_backend) if fusion else None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        streams, batch, tokens, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        q = self.q(x).reshape(streams * batch, tokens, heads, head_dim).transpose(1, 2)
        if self.sr_ratio > 1:
            reduced = self.norm(_to_tokens(self.sr(_to_maps(x, height, width)), streams))
        else:
            reduced = x
        k, v = self.kv(reduced).reshape(streams * batch, -1, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        # Default scale 1/sqrt(head_dim) is the published one (qk_scale=None); attention dropout is 0.
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(streams, batch, tokens, dim)
        if self.fusion is not None:
            out = torch.stack(self.fusion(out[0], out[1]))
        return self.proj_drop(self.proj(out))


class MixFFN(nn.Module):
    """fc1 -> 3x3 depthwise conv -> GELU -> fc2 (shared by the streams)."""

    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Module()  # published name: mlp.dwconv.dwconv.weight
        self.dwconv.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        streams = x.shape[0]
        x = self.fc1(x)
        x = _to_tokens(self.dwconv.dwconv(_to_maps(x, height, width)), streams)
        x = self.drop(F.gelu(x))
        return self.drop(self.fc2(x))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: int, drop_path: float,
                 num_modalities: int, fusion: bool, fusion_heads: int, fusion_backend: str, drop: float):
        super().__init__()
        self.norm1 = ModalityLayerNorm(dim, num_modalities)
        self.attn = Attention(dim, num_heads, sr_ratio, num_modalities, fusion, fusion_heads, fusion_backend, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = ModalityLayerNorm(dim, num_modalities)
        self.mlp = MixFFN(dim, dim * mlp_ratio, drop)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), height, width))
        return x + self.drop_path(self.mlp(self.norm2(x), height, width))


class MixVisionTransformer(nn.Module):
    """Multi-stream MiT. ``forward(inputs)`` takes a list of ``num_modalities`` images ``(B, 3, H, W)``
    and returns the four stage outputs, each stacked over the streams: ``(S, B, C_s, H/r_s, W/r_s)``
    with r_s = 4, 8, 16, 32."""

    def __init__(self, config: MiTConfig, num_modalities: int = 2, fusion: bool = True, fusion_heads: int = 8,
                 fusion_backend: str = "auto", drop_path_rate: float = 0.1, drop_rate: float = 0.0,
                 in_channels: int = 3):
        super().__init__()
        if num_modalities not in (1, 2):
            raise ValueError(f"num_modalities must be 1 or 2; got {num_modalities}")
        self.config = config
        self.num_modalities = num_modalities
        self.embed_dims = list(config.embed_dims)
        # Stochastic depth grows linearly over all blocks of all stages, from 0 to drop_path_rate.
        blocks_total = sum(config.depths)
        rates = [drop_path_rate * i / max(blocks_total - 1, 1) for i in range(blocks_total)]
        previous, first_block = in_channels, 0
        for stage, (dim, depth) in enumerate(zip(config.embed_dims, config.depths), start=1):
            patch, stride = (7, 4) if stage == 1 else (3, 2)
            setattr(self, f"patch_embed{stage}", OverlapPatchEmbed(previous, dim, patch, stride, num_modalities))
            blocks = [
                Block(dim, config.num_heads[stage - 1], config.sr_ratios[stage - 1], config.mlp_ratio,
                      rates[first_block + i], num_modalities, fusion, fusion_heads, fusion_backend, drop_rate)
                for i in range(depth)
            ]
            first_block += depth
            setattr(self, f"block{stage}", nn.ModuleList(blocks))
            setattr(self, f"norm{stage}", ModalityLayerNorm(dim, num_modalities))
            previous = dim
        self.apply(init_published)
        # The published Attention re-runs its own init after building nn.MultiheadAttention, which
        # leaves in_proj_weight Xavier-uniform and the noise embeddings N(0, 1): GeminiFusion's init.
        for module in self.modules():
            if isinstance(module, GeminiFusion):
                module.reset_parameters()

    def forward(self, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
        if len(inputs) != self.num_modalities:
            raise ValueError(f"inputs must be a list of {self.num_modalities} image batches; got {len(inputs)}")
        streams = self.num_modalities
        maps = torch.cat(list(inputs), dim=0)  # (S*B, 3, H, W): streams stacked along the batch
        outputs = []
        for stage in range(1, 5):
            x, height, width = getattr(self, f"patch_embed{stage}")(maps, streams)
            for block in getattr(self, f"block{stage}"):
                x = block(x, height, width)
            x = getattr(self, f"norm{stage}")(x)
            maps = _to_maps(x, height, width).contiguous()
            outputs.append(maps.reshape(streams, -1, *maps.shape[1:]))
        return outputs
