"""The oracle: GeminiFusion in plain PyTorch, exactly as SPEC §1 states it.

This is the only statement of the math in Python. Every kernel is tested against it, and it is the
``"torch"`` backend. It is written as the formula reads (two key projections, a two-way softmax), not
with the algebraic shortcuts the kernels use, so that the kernels are checked against the plain math.

All operations broadcast over any leading dimensions: a pixel is a row, and no pixel sees another.

Precision: matrix products run in the dtype of their inputs (the autocast dtype under
``torch.autocast``); both softmaxes run in at least float32 and are cast back. The outputs have the
dtype of the inputs (under autocast the residual ``x + ...`` promotes back to it).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .params import FusionParams


def _softmax(x: Tensor, dim: int) -> Tensor:
    """Softmax in float32 at least (float64 stays float64), returned in the input's dtype."""
    return torch.softmax(x, dim, dtype=torch.promote_types(x.dtype, torch.float32)).to(x.dtype)


def relation_scores(s: Tensor, o: Tensor, p: FusionParams) -> Tensor:
    """r = softmax_C(fc2(GELU(fc1(concat(self, other))))): the per-channel relation of self to other."""
    hidden = F.gelu(F.linear(torch.cat([s, o], dim=-1), p.fc1_weight, p.fc1_bias))
    return _softmax(F.linear(hidden, p.fc2_weight, p.fc2_bias), dim=-1)


def _direction_params(p: FusionParams, direction: int):
    in_w, in_b, out_w, out_b = (
        (p.in_proj_weight_0, p.in_proj_bias_0, p.out_proj_weight_0, p.out_proj_bias_0)
        if direction == 0
        else (p.in_proj_weight_1, p.in_proj_bias_1, p.out_proj_weight_1, p.out_proj_bias_1)
    )
    return in_w.chunk(3), in_b.chunk(3), out_w, out_b


def _heads(t: Tensor, num_heads: int) -> Tensor:  # (..., C) -> (..., h, dh)
    return t.unflatten(-1, (num_heads, t.shape[-1] // num_heads))


def attention_weights(s: Tensor, o: Tensor, p: FusionParams, direction: int, num_heads: int) -> Tensor:
    """``(..., h, 2)``: per head, the softmax weights of the length-1 query of ``s`` (self) over its two
    keys, the self key and the cross key (``s * r``, r the relation of self to other)."""
    (w_q, w_k, _), (b_q, b_k, _), _, _ = _direction_params(p, direction)
    head_dim = s.shape[-1] // num_heads

    r = relation_scores(s, o, p)
    q = F.linear(s, w_q, b_q) / math.sqrt(head_dim)
    k_self = F.linear(p.k_noise[direction] + s, w_k, b_k)
    k_cross = F.linear(s * r, w_k, b_k)
    q, k_self, k_cross = (_heads(t, num_heads) for t in (q, k_self, k_cross))
    logits = torch.stack([(q * k_self).sum(-1), (q * k_cross).sum(-1)], dim=-1)  # (..., h, 2)
    return _softmax(logits, dim=-1)


def fuse_direction(
    s: Tensor,
    o: Tensor,
    p: FusionParams,
    direction: int,
    num_heads: int,
) -> Tensor:
    """One direction of the fusion: ``s`` (self) queries a length-2 key/value sequence built from
    ``s`` and ``o`` (other); returns ``s + attention output``."""
    (_, _, w_v), (_, _, b_v), out_w, out_b = _direction_params(p, direction)
    a = attention_weights(s, o, p, direction, num_heads).unsqueeze(-1)  # (..., h, 2, 1)
    v_self = _heads(F.linear(p.v_noise[direction] + s, w_v, b_v), num_heads)
    v_cross = _heads(F.linear(o, w_v, b_v), num_heads)
    attended = a[..., 0, :] * v_self + a[..., 1, :] * v_cross  # (..., h, dh)
    return s + F.linear(attended.flatten(-2), out_w, out_b)


def gemini_fusion_reference(x0: Tensor, x1: Tensor, params: FusionParams, num_heads: int = 8):
    """GeminiFusion of two aligned token maps ``(..., C)``: returns ``(y0, y1)``.

    Both directions read the pre-fusion ``x0`` and ``x1``. Inputs are not validated here; the public
    entry points (``gemini_fusion``, ``GeminiFusion``) do that before dispatching.
    """
    y0 = fuse_direction(x0, x1, params, 0, num_heads)
    y1 = fuse_direction(x1, x0, params, 1, num_heads)
    return y0, y1
