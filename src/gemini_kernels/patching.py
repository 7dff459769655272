"""``patch(model)``: the published GeminiFusion code (JiaDingCN/GeminiFusion) onto the fused layer, in
place, for users of the published training scripts.

The published modules that fuse two streams, the MiT ``Attention`` (branch ``main``,
``models/mix_transformer.py``), the Swin ``SwinTransformerBlock`` (``models/swin_transformer.py``) and
the DeLiVER ``Attention`` (branch ``DeLiVER``, ``semseg/models/backbones/geminifusion_backbone.py``),
run the fusion as an inline Python loop over the batch around two ``nn.MultiheadAttention`` calls per
element. The loop sits in the middle of their ``forward``, so :func:`patch` replaces the whole forward
of each such module (found by its parameters ``cross_attn_0_to_1``, ``cross_attn_1_to_0``,
``relation_judger``, ``k_noise``, ``v_noise``) with one that computes the same thing, the fusion by
:func:`gemini_kernels.gemini_fusion` on the module's own parameters. Parameters, buffers and the
state_dict stay exactly as they were, so published checkpoints load as before, before or after.
"""
from __future__ import annotations

import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .backends import BACKENDS
from .functional import gemini_fusion
from .params import FusionParams

__all__ = ["patch", "is_patched"]

_FUSION_PARTS = ("cross_attn_0_to_1", "cross_attn_1_to_0", "relation_judger", "k_noise", "v_noise")
_MARK = "_gemini_kernels_backend"


def _fusion_params(m: nn.Module) -> FusionParams:
    judger = m.relation_judger[0]
    a, b = m.cross_attn_0_to_1, m.cross_attn_1_to_0
    return FusionParams(
        judger.fc1.weight, judger.fc1.bias, judger.fc2.weight, judger.fc2.bias, m.k_noise.weight, m.v_noise.weight,
        a.in_proj_weight, a.in_proj_bias, a.out_proj.weight, a.out_proj.bias,
        b.in_proj_weight, b.in_proj_bias, b.out_proj.weight, b.out_proj.bias,
    )


def _fuse(m: nn.Module, x0: torch.Tensor, x1: torch.Tensor):
    return gemini_fusion(x0, x1, _fusion_params(m), m.cross_attn_0_to_1.num_heads, getattr(m, _MARK))


def _check_fusion_parts(name: str, m: nn.Module) -> None:
    """The fused layer computes the published loop only for the published configuration of its parts:
    refuse anything else rather than compute something different."""
    problems = []
    dim = m.k_noise.weight.shape[-1]
    attns = (m.cross_attn_0_to_1, m.cross_attn_1_to_0)
    for attn in attns:
        if not isinstance(attn, nn.MultiheadAttention):
            problems.append(f"{type(attn).__name__} instead of nn.MultiheadAttention")
        elif (not attn._qkv_same_embed_dim or attn.in_proj_bias is None or attn.bias_k is not None
              or attn.add_zero_attn or attn.batch_first or attn.dropout != 0.0 or attn.embed_dim != dim):
            problems.append("a MultiheadAttention other than (dim, heads, dropout=0, bias=True, batch_first=False)")
    if all(isinstance(a, nn.MultiheadAttention) for a in attns) and attns[0].num_heads != attns[1].num_heads:
        problems.append("the two directions have different head counts")
    judger = m.relation_judger
    if not (isinstance(judger, nn.Sequential) and len(judger) == 2 and isinstance(judger[1], nn.Softmax)
            and judger[1].dim in (-1, 2) and isinstance(getattr(judger[0], "act", None), nn.GELU)
            and judger[0].act.approximate == "none"):
        problems.append("relation_judger is not Sequential(Mlp_2(2C, C, C) with exact GELU, Softmax(dim=-1))")
    elif any(isinstance(d, nn.Dropout) and d.p > 0 for d in judger[0].modules()):
        problems.append("relation_judger has dropout")
    if tuple(m.k_noise.weight.shape) != (2, dim) or tuple(m.v_noise.weight.shape) != (2, dim):
        problems.append("k_noise / v_noise are not nn.Embedding(2, C)")
    if problems:
        raise TypeError(f"cannot patch {name or 'the model'} ({type(m).__name__}): {'; '.join(problems)}")


# --------------------------------------------------------------------------------- the new forwards


def _attention_forward(self, x, H, W):
    """The published MiT / DeLiVER ``Attention.forward`` (identical in both branches), the loop fused."""
    B, N, C = x[0].shape
    heads = self.num_heads
    q = [q_.reshape(B, N, heads, C // heads).permute(0, 2, 1, 3) for q_ in self.q(x)]
    if self.sr_ratio > 1:
        x = [x_.permute(0, 2, 1).reshape(B, C, H, W) for x_ in x]
        x = self.sr(x)
        x = [x_.reshape(B, C, -1).permute(0, 2, 1) for x_ in x]
        x = self.norm(x)
    kv = [kv_.reshape(B, -1, 2, heads, C // heads).permute(2, 0, 3, 1, 4) for kv_ in self.kv(x)]
    attn = [((q_ @ kv_[0].transpose(-2, -1)) * self.scale).softmax(dim=-1) for q_, kv_ in zip(q, kv)]
    attn = self.attn_drop(attn)
    x = [(a @ kv_[1]).transpose(1, 2).reshape(B, N, C) for a, kv_ in zip(attn, kv)]
    x = list(_fuse(self, x[0], x[1]))
    return self.proj_drop(self.proj(x))


def _window_partition(x, window):
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def _window_reverse(windows, window, height, width):
    c = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def _swin_block_forward(self, x, mask_matrix):
    """The published ``SwinTransformerBlock.forward`` (``self.H``, ``self.W`` set by its BasicLayer),
    the loop fused."""
    B, L, C = x[0].shape
    H, W, window, shift = self.H, self.W, self.window_size, self.shift_size
    if L != H * W:
        raise ValueError(f"input feature has wrong size: {L} tokens for H x W = {H} x {W}")
    shortcut = x
    pad_r, pad_b = (window - W % window) % window, (window - H % window) % window
    y = [F.pad(t.view(B, H, W, C), (0, 0, 0, pad_r, 0, pad_b)) for t in self.norm1(x)]
    Hp, Wp = y[0].shape[1:3]
    if shift > 0:
        y = [torch.roll(t, shifts=(-shift, -shift), dims=(1, 2)) for t in y]
    y = self.attn([_window_partition(t, window) for t in y], mask_matrix if shift > 0 else None)
    y = [_window_reverse(t, window, Hp, Wp) for t in y]
    if shift > 0:
        y = [torch.roll(t, shifts=(shift, shift), dims=(1, 2)) for t in y]
    y = [t[:, :H, :W, :].reshape(B, H * W, C) for t in y]
    y = self.drop_path(list(_fuse(self, y[0], y[1])))
    x = [s + t for s, t in zip(shortcut, y)]
    f = self.drop_path(self.mlp(self.norm2(x)))
    return [s + t for s, t in zip(x, f)]


def _kind(m: nn.Module) -> Optional[str]:
    if all(hasattr(m, a) for a in ("q", "kv", "proj", "sr_ratio", "num_heads", "scale", "attn_drop", "proj_drop")):
        return "attention"
    if all(hasattr(m, a) for a in ("window_size", "shift_size", "norm1", "attn", "norm2", "mlp", "drop_path",
                                   "H", "W")):
        return "swin_block"
    return None


_FORWARDS = {"attention": _attention_forward, "swin_block": _swin_block_forward}


def is_patched(module: nn.Module) -> bool:
    """Whether :func:`patch` has replaced this module's forward."""
    return hasattr(module, _MARK)


def patch(model: nn.Module, backend: str = "auto") -> int:
    """Replace the published per-batch fusion loop in every published GeminiFusion module of ``model``
    (in place) with the fused layer; returns how many modules were patched.

    ``model`` is anything holding the published modules: a ``WeTr`` (MiT or Swin), the DeLiVER
    ``GeminiFusion`` model or its backbone, a single ``Attention`` / ``SwinTransformerBlock``, or a
    wrapper around them (DDP included). Call it before ``torch.compile``. Patching again only changes
    the backend. Parameters, buffers and the state_dict do not change.

    Args:
        backend: ``"auto"``, ``"torch"`` (the oracle), ``"triton"``, ``"cuda"`` or ``"cpu_cpp"``; see
            :func:`gemini_kernels.available_backends`.

    Raises:
        ValueError: ``backend`` is unknown, or ``model`` holds no published GeminiFusion module.
        TypeError: a module has the fusion parameters but is not one of the published classes (its
            forward is unknown), or its parts are configured otherwise than published.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {['auto', *BACKENDS]}; got {backend!r}")
    found = [(name, m) for name, m in model.named_modules() if all(hasattr(m, a) for a in _FUSION_PARTS)]
    if not found:
        raise ValueError(f"model ({type(model).__name__}) holds no published GeminiFusion module (one with "
                         f"{', '.join(_FUSION_PARTS)}); nothing to patch")
    plan = []
    for name, m in found:
        kind = _kind(m)
        if kind is None:
            raise TypeError(f"cannot patch {name or 'the model'} ({type(m).__name__}): it has the fusion "
                            f"parameters but is neither the published MiT / DeLiVER Attention nor the Swin "
                            f"SwinTransformerBlock, so its forward is unknown")
        _check_fusion_parts(name, m)
        plan.append((m, kind))
    for m, kind in plan:  # all checked first: a refused model is left untouched
        setattr(m, _MARK, backend)
        m.forward = types.MethodType(_FORWARDS[kind], m)
    return len(plan)
