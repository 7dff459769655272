"""``GeminiFusion``: the drop-in nn.Module, with the published parameter names and initialisation."""
from __future__ import annotations

import torch
from torch import nn

from .functional import gemini_fusion
from .params import FusionParams
from .validation import check_width


def _member(module: nn.Module, name: str):
    """``getattr(module, name)`` for a parameter or submodule, read from nn.Module's own dicts first.

    ``nn.Module.__getattr__`` runs only after Python's class and instance lookups have failed, about
    0.7 us an attribute: a third of ``fusion_params``' reads cost more than a small layer's CUDA
    kernels take to launch. A name those dicts lack (a pruned or parametrized weight, which lives
    elsewhere and is computed on access) still goes through ``getattr``.
    """
    value = module._parameters.get(name)
    if value is None:
        value = module._modules.get(name)
    return getattr(module, name) if value is None else value


class _RelationMLP(nn.Module):
    """Holds ``fc1`` (2C -> C) and ``fc2`` (C -> C) under the published names (``relation_judger.0.*``)."""

    def __init__(self, dim: int, **factory):
        super().__init__()
        self.fc1 = nn.Linear(2 * dim, dim, **factory)
        self.fc2 = nn.Linear(dim, dim, **factory)


class _CrossAttentionParams(nn.Module):
    """The parameters of ``nn.MultiheadAttention(dim, h)`` under its names, without its forward."""

    def __init__(self, dim: int, **factory):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim, **factory))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim, **factory))
        self.out_proj = nn.Linear(dim, dim, **factory)


class GeminiFusion(nn.Module):
    """Pixel-wise cross-modal fusion of two aligned token maps (GeminiFusion, ICML 2024).

    ``forward(x0, x1)`` takes two ``(..., dim)`` tensors and returns ``(y0, y1)`` of the same shape
    and dtype. Under ``torch.autocast`` the matrix products run in the autocast dtype, the softmaxes
    in float32, and the outputs keep the dtype of the inputs.

    The parameters and ``state_dict`` keys are those of the published model, so the fusion weights
    of a published checkpoint (``...attn.{relation_judger.0, k_noise, v_noise, cross_attn_*}``) load
    with ``load_state_dict(strict=True)``.

    Args:
        dim: channel width ``C``.
        num_heads: attention heads (8 in the published models, whatever the width).
        backend: ``"auto"`` (the fastest available for the input's device), ``"torch"``, ``"triton"``,
            ``"cuda"`` or ``"cpu_cpp"``; see :func:`gemini_kernels.available_backends`. Changing it never changes
            the parameters.
    """

    def __init__(self, dim: int, num_heads: int = 8, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        check_width(dim, num_heads)
        factory = {"device": device, "dtype": dtype}
        self.dim = dim
        self.num_heads = num_heads
        self.backend = backend
        self.relation_judger = nn.Sequential(_RelationMLP(dim, **factory))
        self.k_noise = nn.Embedding(2, dim, **factory)
        self.v_noise = nn.Embedding(2, dim, **factory)
        self.cross_attn_0_to_1 = _CrossAttentionParams(dim, **factory)
        self.cross_attn_1_to_0 = _CrossAttentionParams(dim, **factory)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The published initialisation: Linear weights truncated normal (std 0.02, cut at +-2) with
        zero bias, ``in_proj_weight`` Xavier uniform with zero bias, noise embeddings N(0, 1)."""
        judger = self.relation_judger[0]
        for attn in (self.cross_attn_0_to_1, self.cross_attn_1_to_0):
            nn.init.xavier_uniform_(attn.in_proj_weight)
            nn.init.zeros_(attn.in_proj_bias)
        for linear in (judger.fc1, judger.fc2, self.cross_attn_0_to_1.out_proj, self.cross_attn_1_to_0.out_proj):
            nn.init.trunc_normal_(linear.weight, std=0.02, a=-2.0, b=2.0)
            nn.init.zeros_(linear.bias)
        nn.init.normal_(self.k_noise.weight)
        nn.init.normal_(self.v_noise.weight)

    def fusion_params(self) -> FusionParams:
        """The 14 parameters in the kernels' order (what ``forward`` passes to ``gemini_fusion``)."""
        judger = _member(_member(self, "relation_judger"), "0")
        fc1, fc2 = _member(judger, "fc1"), _member(judger, "fc2")
        a, b = _member(self, "cross_attn_0_to_1"), _member(self, "cross_attn_1_to_0")
        a_out, b_out = _member(a, "out_proj"), _member(b, "out_proj")
        return FusionParams(
            _member(fc1, "weight"), _member(fc1, "bias"), _member(fc2, "weight"), _member(fc2, "bias"),
            _member(_member(self, "k_noise"), "weight"), _member(_member(self, "v_noise"), "weight"),
            _member(a, "in_proj_weight"), _member(a, "in_proj_bias"), _member(a_out, "weight"), _member(a_out, "bias"),
            _member(b, "in_proj_weight"), _member(b, "in_proj_bias"), _member(b_out, "weight"), _member(b_out, "bias"),
        )

    def forward(self, x0: torch.Tensor, x1: torch.Tensor):
        return gemini_fusion(x0, x1, self.fusion_params(), self.num_heads, self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, backend={self.backend!r}"
