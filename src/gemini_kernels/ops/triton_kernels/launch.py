"""Launch code of the Triton backend: each forward and backward path, on (N, C) rows.

The backward is hand-written (no autograd through the kernels) and saves only ``x0``, ``x1`` and the
parameters. The tiled backward (``tiled_bwd.py``) recomputes per tile; the wide one
(``wide_bwd.py``) recomputes in two row-tile kernels and takes its weight gradients as GEMMs over all
pixels; the split one recomputes the split forward's intermediates and runs the chain rule with
three row kernels (gate, relation softmax, GELU derivative) between batched GEMMs, its weight
gradients GEMMs over the per-pixel gradients and ``torch.sum`` over pixels. None uses atomics:
reruns give bitwise-equal gradients.

The split path stores its intermediates in the input dtype (as the oracle's ``F.linear`` outputs
are); the fused paths keep them in float32 except where they become tensor-core operands (h, the
key and value inputs, m), rounded to the input dtype as the oracle rounds them.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
from torch import Tensor

from ...params import FusionParams
from .common import INTERPRETED
from .configs import (DEFAULT_SMS, REDUCE_BLOCK, NarrowConfig, TiledConfig, WideConfig, _row_config, acc_type,
                      backward_path, forward_path, head_layout, lane_chunk, narrow_config, tiled_bwd_config,
                      tiled_config, tiled_constexprs, wide_bwd_config, wide_head_group)
from .narrow import narrow_fwd_kernel
from .rows import (_gate_bwd_kernel, _gate_fwd_kernel, _gelu_bwd_kernel, _gelu_fwd_kernel, _relation_bwd_kernel,
                   _relation_fwd_kernel)
from .tiled import tiled_fwd_kernel
from .tiled_bwd import NUM_SLOTS, reduce_partials_kernel, tiled_bwd_kernel
from .wide_bwd import (BIAS_WIDTH, reduce_bias_kernel, weight_grad_kernel, wide_bwd_heads_kernel,
                       wide_bwd_relation_kernel)


def _launch_rows(kernel, n_pix: int, dim: int, **tensors):
    """A row kernel over the 2 ``n_pix`` rows of both directions, its tensors by name."""
    cfg = _row_config(triton.next_power_of_2(dim))
    acc = acc_type(next(iter(tensors.values())).dtype)
    kernel[(triton.cdiv(2 * n_pix, cfg.block_m),)](
        **tensors, n_pix=n_pix, C=dim, ACC=acc, BLOCK_M=cfg.block_m, BLOCK_C=triton.next_power_of_2(dim),
        num_warps=cfg.num_warps)


def _launch_heads(kernel, n_pix: int, dim: int, num_heads: int, **tensors):
    """A gate kernel over the 2 ``n_pix`` rows of both directions, in the padded head layout."""
    h_pad, dh_pad = head_layout(dim, num_heads)
    cfg = _row_config(h_pad * dh_pad)
    head_dim = dim // num_heads
    acc = acc_type(next(iter(tensors.values())).dtype)
    kernel[(triton.cdiv(2 * n_pix, cfg.block_m),)](
        **tensors, n_pix=n_pix, C=dim, head_dim=head_dim, num_heads=num_heads, scale=1.0 / math.sqrt(head_dim),
        ACC=acc, BLOCK_M=cfg.block_m, H_PAD=h_pad, DH_PAD=dh_pad, num_warps=cfg.num_warps)


def _direction_weights(p: FusionParams, dim: int):
    """The per-direction projections stacked on a leading axis of 2, for batched GEMMs."""
    in_w = torch.stack((p.in_proj_weight_0, p.in_proj_weight_1))  # (2, 3C, C)
    in_b = torch.stack((p.in_proj_bias_0, p.in_proj_bias_1)).unsqueeze(1)  # (2, 1, 3C)
    wq, wk, wv = in_w.split(dim, dim=1)
    bq, _, bv = in_b.split(dim, dim=2)  # the key bias cancels out of a two-key softmax
    wo = torch.stack((p.out_proj_weight_0, p.out_proj_weight_1))
    bo = torch.stack((p.out_proj_bias_0, p.out_proj_bias_1)).unsqueeze(1)
    return wq, wk, wv, bq, bv, wo, bo


@dataclass
class _SplitState:
    """The split forward's intermediates, both directions stacked: (2, N, C) or (2N, C) views. The
    backward deletes each attribute after its last use, which frees it."""
    x: Tensor  # self of direction d at [d]
    other: Tensor
    fc1: Tensor  # (2N, 2C): [x0; x1] @ [W1a; W1b]^T
    h: Tensor
    z: Tensor
    u: Tensor  # key input  k_noise + s - s*r
    w: Tensor  # value input v_noise + s - o
    q: Tensor  # s Wq^T + bq, before the 1/sqrt(dh) scale (the gate kernels apply it)
    key_delta: Tensor  # u Wk^T
    value_delta: Tensor  # w Wv^T
    m: Tensor  # vc + a * value_delta, the attention output before Wo


def _split_state(x0: Tensor, x1: Tensor, p: FusionParams, num_heads: int) -> _SplitState:
    n, dim = x0.shape
    x = torch.stack((x0, x1))
    other = x.flip(0)
    x_rows = x.view(2 * n, dim)
    w1 = p.fc1_weight
    fc1 = x_rows @ torch.cat((w1[:, :dim], w1[:, dim:])).t()
    h = torch.empty_like(x_rows)
    _launch_rows(_gelu_fwd_kernel, n, dim, fc1_ptr=fc1, b1_ptr=p.fc1_bias, h_ptr=h)
    z = torch.addmm(p.fc2_bias, h, p.fc2_weight.t())
    u, w = torch.empty_like(x_rows), torch.empty_like(x_rows)
    _launch_rows(_relation_fwd_kernel, n, dim, z_ptr=z, x_ptr=x_rows, kn_ptr=p.k_noise, vn_ptr=p.v_noise,
                 u_ptr=u, w_ptr=w)
    u, w = u.view(2, n, dim), w.view(2, n, dim)
    wq, wk, wv, bq, bv, _, _ = _direction_weights(p, dim)
    q = torch.baddbmm(bq, x, wq.transpose(1, 2))
    key_delta = torch.bmm(u, wk.transpose(1, 2))
    vc = torch.baddbmm(bv, other, wv.transpose(1, 2))
    value_delta = torch.bmm(w, wv.transpose(1, 2))
    m = torch.empty_like(x)
    _launch_heads(_gate_fwd_kernel, n, dim, num_heads, q_ptr=q, key_delta_ptr=key_delta, vc_ptr=vc,
                  value_delta_ptr=value_delta, m_ptr=m)
    return _SplitState(x=x, other=other, fc1=fc1, h=h, z=z, u=u, w=w, q=q, key_delta=key_delta,
                       value_delta=value_delta, m=m)


def _outputs(x0: Tensor, x1: Tensor, out):
    """``out`` (tensors of any shape with N x C contiguous elements, e.g. the caller's (B, N, C)
    outputs, so that what the op returns is not a view of an internal (N, C) tensor) as (N, C) rows,
    or fresh ones."""
    if out is None:
        return torch.empty_like(x0), torch.empty_like(x1)
    return tuple(t.view(x0.shape) for t in out)


def _split_forward(x0: Tensor, x1: Tensor, p: FusionParams, num_heads: int, out=None):
    st = _split_state(x0, x1, p, num_heads)
    _, _, _, _, _, wo, bo = _direction_weights(p, x0.shape[1])
    attn = torch.baddbmm(bo, st.m, wo.transpose(1, 2))
    y0, y1 = _outputs(x0, x1, out)
    # The residual last, rounded as the oracle rounds it.
    return torch.add(attn[0], x0, out=y0), torch.add(attn[1], x1, out=y1)


def _narrow_forward(x0: Tensor, x1: Tensor, p: FusionParams, num_heads: int, cfg: NarrowConfig, out=None):
    n, dim = x0.shape
    y0, y1 = _outputs(x0, x1, out)
    narrow_fwd_kernel[(triton.cdiv(n, cfg.block_m),)](
        x0, x1, y0, y1, *p, n, 1.0 / math.sqrt(dim // num_heads),
        C=dim, HEAD_DIM=dim // num_heads, BLOCK_M=cfg.block_m, CHUNK=cfg.chunk, INTERPRET=INTERPRETED,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y0, y1


_FORCED = {"path": None, "max_programs": None}


@contextlib.contextmanager
def forced_path(path: str):
    """Tests: every forward in the block runs ``path`` where it is a forward path, and every
    backward too where it is a backward one (``"tiled"``, ``"wide"``, ``"split"``): e.g. the tiled
    kernels in float64 for gradcheck."""
    previous, _FORCED["path"] = _FORCED["path"], path
    try:
        yield
    finally:
        _FORCED["path"] = previous


@contextlib.contextmanager
def programs_at_most(count: int):
    """Tests: a persistent grid of at most ``count`` programs, so that each walks several tiles."""
    previous, _FORCED["max_programs"] = _FORCED["max_programs"], count
    try:
        yield
    finally:
        _FORCED["max_programs"] = previous


def num_sms(device: torch.device) -> int:
    """SMs of a CUDA device; elsewhere (the interpreter, meta tensors) the H100's, so that grid-sized
    buffers are counted as on the GPU the budgets are set for."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


def _tiled_forward(x0: Tensor, x1: Tensor, p: FusionParams, num_heads: int, cfg: TiledConfig, out=None):
    n, dim = x0.shape
    y0, y1 = _outputs(x0, x1, out)
    programs = min(triton.cdiv(n, cfg.block_m), num_sms(x0.device) * cfg.ctas_per_sm,
                   _FORCED["max_programs"] or n)
    # Each program's own rows of h / u / m and of z: grid-sized, so they stay in L2.
    scratch = x0.new_empty((programs, 2, cfg.block_m, dim))
    z = x0.new_empty((programs, cfg.block_m, dim))
    tiled_fwd_kernel[(programs,)](
        x0, x1, y0, y1, *p, scratch, z, n, programs, 1.0 / math.sqrt(dim // num_heads),
        **tiled_constexprs(dim, num_heads, cfg), INTERPRET=INTERPRETED,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y0, y1


def backward_programs(n: int, dim: int, elem_size: int, cfg: TiledConfig, device: torch.device) -> int:
    """Programs of the tiled backward: the persistent grid, fewer where all programs' float32
    weight-gradient partials (11 C^2 + 14 C) and scratch rows would not fit in L2 (every tile rereads
    and rewrites them: beyond L2 that is DRAM traffic per tile) or would pass
    ``BWD_BUFFERS_PER_INPUT_BYTE`` times the bytes of x0 and x1 (memory).

    At MiT stage 1 (C = 64) that is 80 programs, at stage 2 29; wider layers would get very few (C = 320:
    6, C = 512: 2), which is why they run the wide backward (``configs.TILED_BWD_MAX_WIDTH``)."""
    per_program = (11 * dim * dim + 14 * dim + NUM_SLOTS * cfg.block_m * dim) * 4
    memory_cap = int(BWD_BUFFERS_PER_INPUT_BYTE * 2 * n * dim * elem_size) // per_program
    return max(1, min(triton.cdiv(n, cfg.block_m), num_sms(device) * cfg.ctas_per_sm, memory_cap,
                      BWD_L2_BYTES // per_program, _FORCED["max_programs"] or n))


# The tiled backward's grid-sized buffers may take at most this many bytes per byte of x0 and x1: with
# what else the backward holds, half of what the eager oracle saves (the memory budget of tests/test_ledger.py).
BWD_BUFFERS_PER_INPUT_BYTE = 6
# ... and at most this much of the L2 (H100 / H200: 50 MiB), the rest left to the streamed weights.
BWD_L2_BYTES = 40 * 2 ** 20


def _tiled_backward(gy0: Tensor, gy1: Tensor, x0: Tensor, x1: Tensor, p: FusionParams, num_heads: int,
                    cfg: TiledConfig):
    """``(gx0, gx1, flat)``: the input gradients and every parameter's gradient in one flat tensor
    in FusionParams order (11 C^2 + 14 C elements)."""
    n, dim = x0.shape
    programs = backward_programs(n, dim, x0.element_size(), cfg, x0.device)
    acc = torch.promote_types(x0.dtype, torch.float32)
    scratch = x0.new_empty((programs, NUM_SLOTS, cfg.block_m, dim), dtype=acc)
    total = 11 * dim * dim + 14 * dim
    partials = x0.new_zeros((programs, total), dtype=acc)
    gx0, gx1 = torch.empty_like(x0), torch.empty_like(x1)
    tiled_bwd_kernel[(programs,)](
        gy0, gy1, x0, x1, gx0, gx1, *p, scratch, partials, n, programs, 1.0 / math.sqrt(dim // num_heads),
        **tiled_constexprs(dim, num_heads, cfg), INTERPRET=INTERPRETED,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    flat = x0.new_empty(total)
    reduce_partials_kernel[(triton.cdiv(total, REDUCE_BLOCK),)](
        partials_ptr=partials, out_ptr=flat, n_partials=programs, total=total, BLOCK=REDUCE_BLOCK)
    return gx0, gx1, flat


def forward_rows(x0: Tensor, x1: Tensor, p: FusionParams, num_heads: int, path: Optional[str] = None, out=None):
    """(y0, y1) for contiguous (N, C) inputs and contiguous parameters of their dtype, written into
    ``out`` (two contiguous tensors of N x C elements) when given.

    ``path`` forces ``"narrow"``, ``"tiled"`` or ``"split"`` (tests compare them); by default
    ``configs.forward_path`` decides. Forcing ``"tiled"`` in float32 without TF32, or in float64,
    runs the tiled kernel with IEEE products (under the interpreter: for tests).
    """
    dim, dtype = x0.shape[1], x0.dtype
    forced = _FORCED["path"] if _FORCED["path"] in ("narrow", "tiled", "split") else None
    path = path or forced or forward_path(dim, num_heads, dtype)
    if path == "narrow":
        cfg = narrow_config(dim, num_heads, dtype)
        if cfg is None:
            raise ValueError(f"the narrow path does not run dim={dim}, num_heads={num_heads}, {dtype}")
        return _narrow_forward(x0, x1, p, num_heads, cfg, out)
    if path == "tiled":
        cfg = tiled_config(dim, num_heads, dtype) or _forced_tiled_config(dim, num_heads)
        return _tiled_forward(x0, x1, p, num_heads, cfg, out)
    if path == "split":
        return _split_forward(x0, x1, p, num_heads, out)
    raise ValueError(f"path must be 'narrow', 'tiled' or 'split'; got {path!r}")


def _forced_tiled_config(dim: int, num_heads: int) -> TiledConfig:
    dl, ht = lane_chunk(dim // num_heads, 16)
    return TiledConfig(block_m=16, block_n=16, block_k=16, heads_per_group=ht, lane_chunk=dl, num_warps=4,
                       num_stages=1, ctas_per_sm=2, precision="ieee")


# The tiled backward runs only where its grid holds at least this many programs or one per tile (else
# the split one). Its weight-gradient partials and scratch rows must stay in L2 (``backward_programs``),
# which at batch 32 leaves 79 programs at C = 64 and 29 at 128; smaller batches cap the grid by memory
# (``BWD_BUFFERS_PER_INPUT_BYTE``). Wider layers run the wide backward (``configs.TILED_BWD_MAX_WIDTH``):
# the tiled one would have 6 programs at C = 320, 2 at 512. The ledger's roofline (``ledger.Roofline``,
# assumed H100 rates) puts forward + backward with the tiled / wide / split backward at 1.5 / 1.7 /
# 5.6 ms (C = 64), 3.4 / 1.1 / 3.0 (128), 25 / 1.8 / 2.2 (320) and 47 / 1.0 / 1.2 (512). At C = 128 it
# prefers the wide one, but that one counts 5.6x the floor's bytes there (the stage's budget: 4x) and
# 4x the tiled one's memory, and the model charges the tiled grid's 29 programs as 29 busy SMs, the
# part of it least known. A model, not a measurement: the GPU check times the backwards
# (GK_TRITON_BACKWARD) to confirm or move this.
TILED_BWD_MIN_PROGRAMS = 24


def _backward_from_env() -> Optional[str]:
    """``GK_TRITON_BACKWARD=tiled|wide|split`` forces the backward (the GPU check times them, to check
    ``TILED_BWD_MIN_PROGRAMS`` against the device)."""
    value = os.environ.get("GK_TRITON_BACKWARD", "")
    if value in ("", "auto"):
        return None
    if value not in BACKWARD_PATHS:
        raise ValueError(f"GK_TRITON_BACKWARD must be 'tiled', 'wide', 'split' or 'auto'; got {value!r}")
    return value


BACKWARD_PATHS = ("tiled", "wide", "split")


def _tiled_backward_starved(n: int, dim: int, dtype: torch.dtype, num_heads: int, like: Tensor) -> bool:
    cfg = tiled_bwd_config(dim, num_heads, dtype)
    if cfg is None:
        return False
    programs = backward_programs(n, dim, like.element_size(), cfg, like.device)
    return programs < min(TILED_BWD_MIN_PROGRAMS, triton.cdiv(n, cfg.block_m))


def backward_rows(gy0: Tensor, gy1: Tensor, x0: Tensor, x1: Tensor, p: FusionParams, num_heads: int,
                  path: Optional[str] = None):
    """``(gx0, gx1, flat)`` for contiguous (N, C) rows: the input gradients and every parameter's
    gradient in one flat tensor in FusionParams order (11 C^2 + 14 C elements).

    ``path`` forces ``"tiled"``, ``"wide"`` or ``"split"``; by default ``configs.backward_path``
    decides, and the split one runs where the tiled one's grid would be starved
    (``TILED_BWD_MIN_PROGRAMS``).
    """
    n, dim, dtype = x0.shape[0], x0.shape[1], x0.dtype
    forced = _FORCED["path"] if _FORCED["path"] in BACKWARD_PATHS else _backward_from_env()
    path = path or forced or backward_path(dim, num_heads, dtype)
    if path == "tiled" and not forced and _tiled_backward_starved(n, dim, dtype, num_heads, x0):
        path = "split"
    if path == "tiled":
        cfg = tiled_bwd_config(dim, num_heads, dtype) or _forced_tiled_config(dim, num_heads)
        return _tiled_backward(gy0, gy1, x0, x1, p, num_heads, cfg)
    if path == "wide":
        cfg = wide_bwd_config(dim, num_heads, dtype, any_width=True) or _forced_wide_config(dim, num_heads)
        return _wide_backward(gy0, gy1, x0, x1, p, num_heads, cfg)
    if path == "split":
        grads = _split_backward(gy0, gy1, x0, x1, p, num_heads)
        return grads[0], grads[1], torch.cat([g.reshape(-1) for g in grads[2:]])
    raise ValueError(f"path must be 'tiled', 'wide' or 'split'; got {path!r}")


def _forced_wide_config(dim: int, num_heads: int) -> WideConfig:
    dl, ht = wide_head_group(dim // num_heads)
    return WideConfig(block_m=16, block_n=16, block_k=16, heads_per_group=ht, lane_chunk=dl, num_warps=4,
                      ctas_per_sm=1, precision="ieee", weight_block=16, weight_pixels=16, weight_warps=4)


# Slots of per-program scratch rows (BM, C) of the wide backward's row-tile kernels: h and z (heads),
# pre, z and g_u (relation).
WIDE_HEADS_SLOTS, WIDE_RELATION_SLOTS = 2, 3


def wide_programs(n: int, dim: int, elem_size: int, cfg: WideConfig, device: torch.device) -> int:
    """Programs of the wide backward's row-tile kernels: the persistent grid, fewer where their
    scratch rows and bias partials would not fit in ``BWD_L2_BYTES`` (they are reread per stage)."""
    per_program = WIDE_RELATION_SLOTS * cfg.block_m * dim * elem_size + BIAS_WIDTH * dim * 4
    return max(1, min(triton.cdiv(n, cfg.block_m), num_sms(device) * cfg.ctas_per_sm,
                      BWD_L2_BYTES // per_program, _FORCED["max_programs"] or n))


def _wide_backward(gy0: Tensor, gy1: Tensor, x0: Tensor, x1: Tensor, p: FusionParams, num_heads: int,
                   cfg: WideConfig):
    """``(gx0, gx1, flat)`` as ``_tiled_backward``'s, by the wide backward (``wide_bwd.py``): the heads
    kernel, the early weight gradients, the relation kernel, the late ones, the bias reduction.
    Each per-pixel buffer is dropped after its last reader: the peak is the heads kernel's five
    (2, N, C) operands and the input gradients."""
    n, dim = x0.shape
    bm = cfg.block_m
    n_rows = triton.cdiv(n, bm) * bm
    programs = wide_programs(n, dim, x0.element_size(), cfg, x0.device)
    acc = torch.promote_types(x0.dtype, torch.float32)
    scale = 1.0 / math.sqrt(dim // num_heads)
    rows_cx = cfg.row_constexprs(dim, num_heads)
    relation_cx = {k: rows_cx[k] for k in ("C", "BM", "BN", "BK", "PRECISION")}

    def per_pixel():
        return x0.new_empty((2, n_rows, dim))

    u, m, gq, g_kd, gm = (per_pixel() for _ in range(5))
    gate = x0.new_empty((2, n_rows, num_heads), dtype=acc)
    partials = x0.new_zeros((programs, BIAS_WIDTH * dim), dtype=acc)
    gx0, gx1 = torch.empty_like(x0), torch.empty_like(x1)
    scratch = x0.new_empty((programs, WIDE_HEADS_SLOTS, bm, dim))
    wide_bwd_heads_kernel[(programs,)](
        gy0, gy1, x0, x1, gx0, gx1, *p, u_ptr=u, m_ptr=m, gq_ptr=gq, g_kd_ptr=g_kd, gm_ptr=gm, gate_ptr=gate,
        scratch_ptr=scratch, partials_ptr=partials, n_pix=n, n_rows=n_rows, n_prog=programs, scale=scale,
        **rows_cx, INTERPRET=INTERPRETED, num_warps=cfg.num_warps, num_stages=1)
    del scratch
    total = 11 * dim * dim + 14 * dim
    flat = x0.new_empty(total)
    unused = x0.new_empty(1)  # the pointers a weight-gradient launch does not read
    tiles = triton.cdiv(dim, cfg.weight_block) ** 2
    weight_grad_kernel[(tiles, 8)](
        gy0, gy1, x0, x1, p.v_noise, m_ptr=m, gq_ptr=gq, u_ptr=u, g_kd_ptr=g_kd, gm_ptr=gm, gate_ptr=gate,
        h_ptr=unused, gz_ptr=unused, g_pre_ptr=unused, flat_ptr=flat, n_pix=n, n_rows=n_rows,
        **cfg.weight_constexprs(dim, num_heads, False), INTERPRET=INTERPRETED, num_warps=cfg.weight_warps,
        num_stages=1)
    del u, m, gq, gm, gate
    h, gz, g_pre = (per_pixel() for _ in range(3))
    scratch = x0.new_empty((programs, WIDE_RELATION_SLOTS, bm, dim))
    wide_bwd_relation_kernel[(programs,)](
        x0, x1, gx0, gx1, *p, g_kd_ptr=g_kd, h_ptr=h, gz_ptr=gz, g_pre_ptr=g_pre, scratch_ptr=scratch,
        partials_ptr=partials, n_pix=n, n_rows=n_rows, n_prog=programs, **relation_cx, INTERPRET=INTERPRETED,
        num_warps=cfg.num_warps, num_stages=1)
    del scratch, g_kd
    weight_grad_kernel[(tiles, 3)](
        unused, unused, x0, x1, p.v_noise, m_ptr=unused, gq_ptr=unused, u_ptr=unused, g_kd_ptr=unused,
        gm_ptr=unused, gate_ptr=unused, h_ptr=h, gz_ptr=gz, g_pre_ptr=g_pre, flat_ptr=flat, n_pix=n, n_rows=n_rows,
        **cfg.weight_constexprs(dim, num_heads, True), INTERPRET=INTERPRETED, num_warps=cfg.weight_warps,
        num_stages=1)
    del h, gz, g_pre
    reduce_bias_kernel[(triton.cdiv(BIAS_WIDTH * dim, REDUCE_BLOCK),)](
        partials_ptr=partials, flat_ptr=flat, n_partials=programs, C=dim, BLOCK=REDUCE_BLOCK)
    return gx0, gx1, flat


def _split_backward(gy0: Tensor, gy1: Tensor, x0: Tensor, x1: Tensor, p: FusionParams, num_heads: int):
    """Gradients ``[gx0, gx1, *param_grads]`` (FusionParams order) for contiguous (N, C) rows.

    Every recomputed intermediate is dropped right after its last use (the ``del``s): the peak is
    about 17 tensors of (2N, C) (the recomputed forward plus the gate's gradients) instead of the
    ~27 that holding everything to the end would take.
    """
    n, dim = x0.shape
    st = _split_state(x0, x1, p, num_heads)
    x_rows, other_rows = st.x.view(2 * n, dim), st.other.view(2 * n, dim)
    wq, wk, wv, _, _, wo, _ = _direction_weights(p, dim)
    gy = torch.stack((gy0, gy1))
    g_wo, g_bo = [gy[d].t() @ st.m[d] for d in (0, 1)], [gy[d].sum(0) for d in (0, 1)]
    del st.m
    gm = torch.bmm(gy, wo)  # = dL/dvc
    gq, g_key_delta, g_value_delta = torch.empty_like(gm), torch.empty_like(gm), torch.empty_like(gm)
    _launch_heads(_gate_bwd_kernel, n, dim, num_heads, q_ptr=st.q, key_delta_ptr=st.key_delta,
                  value_delta_ptr=st.value_delta, gm_ptr=gm, gq_ptr=gq, g_key_delta_ptr=g_key_delta,
                  g_value_delta_ptr=g_value_delta)
    del st.q, st.key_delta, st.value_delta
    g_wq, g_bq = torch.bmm(gq.transpose(1, 2), st.x), gq.sum(1)
    g_self = torch.baddbmm(gy, gq, wq)  # dL/ds: the residual and the query
    del gq, gy
    g_wk = torch.bmm(g_key_delta.transpose(1, 2), st.u)
    gu = torch.bmm(g_key_delta, wk)
    del st.u, g_key_delta
    g_wv = torch.bmm(g_value_delta.transpose(1, 2), st.w) + torch.bmm(gm.transpose(1, 2), st.other)
    g_bv = gm.sum(1)
    gw = torch.bmm(g_value_delta, wv)
    del st.w, g_value_delta
    g_other = torch.bmm(gm, wv)  # dL/do: the cross value
    del gm
    g_self += gw  # w = v_noise + s - o
    g_other -= gw
    g_kn, g_vn = gu.sum(1), gw.sum(1)
    del gw

    gz, gs_relation = torch.empty_like(x_rows), torch.empty_like(x_rows)
    _launch_rows(_relation_bwd_kernel, n, dim, z_ptr=st.z, x_ptr=x_rows, gu_ptr=gu.view(2 * n, dim), gz_ptr=gz,
                 gs_ptr=gs_relation)
    del st.z, gu
    g_self += gs_relation.view(2, n, dim)
    del gs_relation
    g_w2, g_b2 = gz.t() @ st.h, gz.sum(0)
    gh = gz @ p.fc2_weight
    del st.h, gz
    gpre = torch.empty_like(x_rows)
    _launch_rows(_gelu_bwd_kernel, n, dim, fc1_ptr=st.fc1, b1_ptr=p.fc1_bias, gh_ptr=gh, gpre_ptr=gpre)
    del st.fc1, gh
    g_w1 = torch.cat((gpre.t() @ x_rows, gpre.t() @ other_rows), dim=1)
    g_b1 = gpre.sum(0)
    w1 = p.fc1_weight
    g_self.view(2 * n, dim).addmm_(gpre, w1[:, :dim])
    g_other.view(2 * n, dim).addmm_(gpre, w1[:, dim:])
    # x0 is the self of direction 0 and the other of direction 1. Every gradient gets its own
    # storage (custom-op outputs may not alias each other).
    grads = [g_self[0] + g_other[1], g_self[1] + g_other[0], g_w1, g_b1, g_w2, g_b2, g_kn, g_vn]
    zeros_bk = g_bq.new_zeros(dim)
    for d in (0, 1):
        grads += [torch.cat((g_wq[d], g_wk[d], g_wv[d])), torch.cat((g_bq[d], zeros_bk, g_bv[d])),
                  g_wo[d], g_bo[d]]
    return grads
