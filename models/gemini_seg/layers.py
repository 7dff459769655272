"""Small building blocks written here so that the model needs neither timm nor mmcv.

Tensors of the dual-stream encoder are *stacked*: a leading modality axis ``S`` in front of the batch,
``(S, B, ...)``. Layers whose weights the streams share run once on the whole stack (one GEMM instead
of one per stream); only the LayerNorms, which the published model keeps per modality, look at ``S``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def init_published(module: nn.Module) -> None:
    """The MiT initialisation of the published encoder (``_init_weights``), applied with ``.apply``:
    Linear weights truncated normal std 0.02 (cut at +-2, i.e. practically untruncated, as timm's
    ``trunc_normal_`` is called) with zero bias; LayerNorm ones / zeros; Conv2d N(0, sqrt(2 / fan_out))
    with fan_out counted per group, zero bias."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch for a random subset of samples, rescaling the rest.

    On a stacked ``(S, B, ...)`` tensor the keep/drop draw is made per modality *and* per sample, as the
    published ``ModuleParallel(DropPath)`` does by calling DropPath on each stream separately.
    """

    def __init__(self, drop_prob: float = 0.0, sample_dims: int = 2):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1); got {drop_prob}")
        self.drop_prob = drop_prob
        self.sample_dims = sample_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = x.shape[: self.sample_dims] + (1,) * (x.dim() - self.sample_dims)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class ModalityLayerNorm(nn.Module):
    """One LayerNorm per modality (``ln_0``, ``ln_1``: the published names) on a stacked tensor.

    The normalisation itself has no weights, so it runs once on the whole stack; only the affine part
    differs per modality and is broadcast over the modality axis.
    """

    def __init__(self, dim: int, num_modalities: int, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.num_modalities = num_modalities
        for m in range(num_modalities):
            setattr(self, f"ln_{m}", nn.LayerNorm(dim, eps=eps))

    def norms(self):
        return [getattr(self, f"ln_{m}") for m in range(self.num_modalities)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norms = self.norms()
        normalised = F.layer_norm(x, (self.dim,), eps=self.eps)
        broadcast = (len(norms),) + (1,) * (x.dim() - 2) + (self.dim,)
        weight = torch.stack([n.weight for n in norms]).view(broadcast)
        bias = torch.stack([n.bias for n in norms]).view(broadcast)
        return torch.addcmul(bias, normalised, weight)


class ConvBNReLU(nn.Module):
    """The decoder's fuse layer: what mmcv's ``ConvModule(k=1, norm_cfg=BN)`` builds (a bias-free conv,
    BatchNorm, ReLU), under its state_dict names ``conv.*`` and ``bn.*``, with its initialisation
    (Kaiming normal, fan_out, for the conv; ones / zeros for the BatchNorm)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))
