"""The dual-stream Swin Transformer with GeminiFusion in every block (the published Swin GeminiFusion).

Written from JiaDingCN/GeminiFusion ``models/swin_transformer.py`` (branch ``main``), whose forward it
reproduces exactly. Where it differs from the MiT path (mit.py) and from classification Swin:

* GeminiFusion runs on the full token maps *after* the window attention's ``proj`` (windows merged,
  shift undone, padding cropped), and the block's DropPath is applied to the fused maps, the fusion's
  own residual included: ``x = shortcut + DropPath(fusion(attn(norm1(x))))``;
* ``norm1`` / ``norm2`` and the patch-merging norm are *one* LayerNorm shared by both streams (eps
  1e-5, ``ModuleParallel(nn.LayerNorm)``); only the patch-embed norm and the four output norms are per
  modality (``ln_0`` / ``ln_1``, eps 1e-6);
* the maps are zero-padded to window multiples after ``norm1``, and padded tokens are not masked in
  unshifted windows (they take part in the softmax as zero vectors plus the position bias); the shift
  mask is built over the padded map with -100 for cross-region pairs;
* window and shift are never shrunk for maps smaller than a window (a 2x2 map is padded to 7x7);
* the relative position index is a persistent buffer (it is in the checkpoints);
* the fusion parameters sit directly in the block (``blocks.{i}.cross_attn_0_to_1...``), here under
  ``blocks.{i}.fusion``; 8 fusion heads whatever the width.

Tensors are stacked over the streams, ``(S, B, ...)``, as in mit.py: layers the streams share run once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gemini_kernels import GeminiFusion

from .layers import DropPath, ModalityLayerNorm, init_published


@dataclass(frozen=True)
class SwinConfig:
    embed_dim: int
    depths: Sequence[int]
    num_heads: Sequence[int]
    window_size: int
    # The ImageNet weights the published WeTr initialises the backbone from (its pretrained/ path).
    imagenet_file: str
    patch_size: int = 4
    mlp_ratio: float = 4.0

    @property
    def embed_dims(self) -> List[int]:
        return [self.embed_dim * 2 ** i for i in range(len(self.depths))]


SWIN_CONFIGS = {
    "swin_tiny": SwinConfig(96, (2, 2, 6, 2), (3, 6, 12, 24), 7, "swin_tiny_patch4_window7_224.pth"),
    "swin_small": SwinConfig(96, (2, 2, 18, 2), (3, 6, 12, 24), 7, "swin_small_patch4_window7_224.pth"),
    "swin_large": SwinConfig(192, (2, 2, 18, 2), (6, 12, 24, 48), 7, "swin_large_patch4_window7_224_22k.pth"),
    "swin_large_window12": SwinConfig(192, (2, 2, 18, 2), (6, 12, 24, 48), 12,
                                      "swin_large_patch4_window12_384_22k.pth"),
    # Same architecture as swin_large_window12; only the ImageNet initialisation differs.
    "swin_large_window12_to_1k": SwinConfig(192, (2, 2, 18, 2), (6, 12, 24, 48), 12,
                                            "swin_large_patch4_window12_384_22kto1k.pth"),
}


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/w * W/w, w*w, C), windows in row-major order within each sample."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def relative_position_index(window: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    relative[:, :, 0] += window - 1
    relative[:, :, 1] += window - 1
    relative[:, :, 0] *= 2 * window - 1
    return relative.sum(-1)


def shift_mask(height: int, width: int, window: int, shift: int, device, dtype) -> torch.Tensor:
    """The SW-MSA mask of the published BasicLayer: (nW, w*w, w*w), 0 within a region, -100 across."""
    hp, wp = -(-height // window) * window, -(-width // window) * window
    img = torch.zeros((1, hp, wp, 1), device=device, dtype=dtype)
    slices = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    count = 0
    for h in slices:
        for w in slices:
            img[:, h, w, :] = count
            count += 1
    regions = window_partition(img, window).squeeze(-1)
    mask = regions.unsqueeze(1) - regions.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class WindowAttention(nn.Module):
    """Window multi-head self-attention with relative position bias (shared by the streams)."""

    def __init__(self, dim: int, window: int, num_heads: int, proj_drop: float):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.window = window
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02, a=-2.0, b=2.0)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        windows, tokens, dim = x.shape
        heads = self.num_heads
        q, k, v = self.qkv(x).reshape(windows, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(tokens, tokens, heads).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            count = mask.shape[0]
            attn = (attn.view(windows // count, count, heads, tokens, tokens)
                    + mask.to(attn.dtype).unsqueeze(1).unsqueeze(0)).view(windows, heads, tokens, tokens)
        out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(windows, tokens, dim)
        return self.proj_drop(self.proj(out))


class SwinMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float, drop_path: float,
                 drop: float, fusion: bool, fusion_heads: int, fusion_backend: str):
        super().__init__()
        if not 0 <= shift < window:
            raise ValueError(f"shift ({shift}) must be in [0, window={window})")
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwinMlp(dim, int(dim * mlp_ratio), drop)
        self.fusion = GeminiFusion(dim, num_heads=fusion_heads, backend=fusion_backend) if fusion else None

    def forward(self, x: torch.Tensor, height: int, width: int, mask: torch.Tensor) -> torch.Tensor:
        streams, batch, tokens, dim = x.shape
        window, shift = self.window, self.shift
        shortcut = x
        y = self.norm1(x).view(streams * batch, height, width, dim)
        pad_r, pad_b = (window - width % window) % window, (window - height % window) % window
        y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = y.shape[1:3]
        if shift > 0:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        y = self.attn(window_partition(y, window), mask if shift > 0 else None)
        y = window_reverse(y, window, hp, wp)
        if shift > 0:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        y = y[:, :height, :width, :].reshape(streams, batch, tokens, dim)
        if self.fusion is not None:
            y = torch.stack(self.fusion(y[0], y[1]))
        x = shortcut + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (zero-padding odd sizes), one shared LayerNorm, 4C -> 2C (no bias)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        streams, batch, _, dim = x.shape
        x = x.view(streams * batch, height, width, dim)
        if height % 2 or width % 2:
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        x = x.reshape(streams, batch, -1, 4 * dim)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: float,
                 drop_paths: Sequence[float], drop: float, downsample: bool, fusion: bool, fusion_heads: int,
                 fusion_backend: str):
        super().__init__()
        self.window, self.shift = window, window // 2
        self.blocks = nn.ModuleList([
            SwinBlock(dim, num_heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio, drop_paths[i], drop,
                      fusion, fusion_heads, fusion_backend)
            for i in range(depth)
        ])
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        # One mask per stage and input size, as published; unshifted blocks ignore it.
        mask = shift_mask(height, width, self.window, self.shift, x.device, x.dtype)
        for block in self.blocks:
            x = block(x, height, width, mask)
        return x


class SwinTransformer(nn.Module):
    """Multi-stream Swin encoder. ``forward(inputs)`` takes a list of ``num_modalities`` images
    ``(B, 3, H, W)`` (H, W multiples of the patch size 4) and returns the four stage outputs stacked over
    the streams, ``(S, B, C_s, H_s, W_s)`` with H_1 = H/4 and H_{s+1} = ceil(H_s / 2)."""

    def __init__(self, config: SwinConfig, num_modalities: int = 2, fusion: bool = True, fusion_heads: int = 8,
                 fusion_backend: str = "auto", drop_path_rate: float = 0.2, drop_rate: float = 0.0,
                 in_channels: int = 3):
        super().__init__()
        if num_modalities not in (1, 2):
            raise ValueError(f"num_modalities must be 1 or 2; got {num_modalities}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1); got {drop_path_rate}")
        self.config = config
        self.num_modalities = num_modalities
        self.embed_dims = config.embed_dims
        fusion = fusion and num_modalities == 2
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_channels, config.embed_dim, config.patch_size, config.patch_size)
        self.patch_embed.norm = ModalityLayerNorm(config.embed_dim, num_modalities)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = [r.item() for r in torch.linspace(0, drop_path_rate, sum(config.depths), device="cpu")]
        self.layers = nn.ModuleList()
        first = 0
        for i, (dim, depth) in enumerate(zip(self.embed_dims, config.depths)):
            self.layers.append(SwinStage(dim, depth, config.num_heads[i], config.window_size, config.mlp_ratio,
                                         rates[first:first + depth], drop_rate, i < len(config.depths) - 1,
                                         fusion, fusion_heads, fusion_backend))
            first += depth
        for i, dim in enumerate(self.embed_dims):
            setattr(self, f"norm{i}", ModalityLayerNorm(dim, num_modalities))
        # As published: each block re-initialises its own Linear / LayerNorm layers (trunc-normal 0.02);
        # the patch embedding conv and the merging reduction keep PyTorch's default initialisation.
        for layer in self.layers:
            for block in layer.blocks:
                block.apply(init_published)
                if block.fusion is not None:
                    block.fusion.reset_parameters()

    def forward(self, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
        if not isinstance(inputs, (list, tuple)) or len(inputs) != self.num_modalities:
            raise ValueError(f"inputs must be a list of {self.num_modalities} image batches; got "
                             f"{len(inputs) if isinstance(inputs, (list, tuple)) else type(inputs).__name__}")
        patch = self.config.patch_size
        height, width = inputs[0].shape[-2:]
        if height % patch or width % patch:
            # The published PatchEmbed would pad, but on a list of streams that path fails; refuse instead.
            raise ValueError(f"inputs height and width must be multiples of {patch}; got {height}x{width}")
        streams = self.num_modalities
        maps = self.patch_embed.proj(torch.cat(list(inputs), dim=0))
        height, width = maps.shape[-2:]
        x = maps.flatten(2).transpose(1, 2).reshape(streams, -1, height * width, maps.shape[1])
        x = self.pos_drop(self.patch_embed.norm(x))
        outputs = []
        for i, layer in enumerate(self.layers):
            x = layer(x, height, width)
            out = getattr(self, f"norm{i}")(x)
            outputs.append(out.view(streams, -1, height, width, out.shape[-1]).permute(0, 1, 4, 2, 3).contiguous())
            if layer.downsample is not None:
                x = layer.downsample(x, height, width)
                height, width = (height + 1) // 2, (width + 1) // 2
        return outputs
