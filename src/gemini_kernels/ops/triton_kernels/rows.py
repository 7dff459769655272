"""Row kernels: the per-pixel math between the GEMMs of the split path and of the backward.

Every kernel works on the 2N rows of both directions (rows g < N: direction 0, self x0) and takes
``n_pix`` = N, the pixels per direction. Channel padding: Triton blocks have power-of-two sizes, so a row of width C is held in a block of
``next_power_of_2(C)`` lanes with masked loads (``other=0``; ``-inf`` before the softmax over C). The
gate kernels use a padded head layout ``[H_PAD, DH_PAD]`` (lane ``j*DH_PAD + t`` holds channel
``j*dh + t``), so a per-head sum is a plain ``tl.sum`` over the last axis for any head width (3, 5, 12,
40, ...), exact in every dtype. Loads are upcast to ``ACC`` (float32; float64 for float64).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import gelu as _gelu
from .common import gelu_grad as _gelu_grad


@triton.jit
def _row_tile(pid, n_rows, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row indices, a (BLOCK_M, BLOCK_C) element-offset tile (int64: 2N*C may pass 2^31) and its mask."""
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    mask = (rows[:, None] < n_rows) & (cols[None, :] < C)
    return rows, cols, offs, mask


@triton.jit
def _head_tile(pid, n_rows, C, head_dim, num_heads,
               BLOCK_M: tl.constexpr, H_PAD: tl.constexpr, DH_PAD: tl.constexpr):
    """A (BLOCK_M, H_PAD, DH_PAD) offset tile in the padded head layout, and its mask."""
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    heads = tl.arange(0, H_PAD)
    lanes = tl.arange(0, DH_PAD)
    chans = heads[None, :, None] * head_dim + lanes[None, None, :]
    offs = rows.to(tl.int64)[:, None, None] * C + chans
    mask = (rows[:, None, None] < n_rows) & (heads[None, :, None] < num_heads) & (lanes[None, None, :] < head_dim)
    return offs, mask


@triton.jit
def _fc1_preactivation(fc1_ptr, b1_ptr, rows, cols, mask, n_pix, C, ACC: tl.constexpr):
    """fc1(concat(self, other)) of rows g of both directions, from fc1 = [x0; x1] @ [W1a; W1b]^T (2N, 2C):
    row g's self part plus its partner row's (g +- N: the other stream) other part, plus b1."""
    partner = tl.where(rows < n_pix, rows + n_pix, rows - n_pix)
    fc1_self = tl.load(fc1_ptr + rows.to(tl.int64)[:, None] * (2 * C) + cols[None, :], mask=mask, other=0.0)
    fc1_other = tl.load(fc1_ptr + partner.to(tl.int64)[:, None] * (2 * C) + C + cols[None, :], mask=mask, other=0.0)
    b1 = tl.load(b1_ptr + cols, mask=cols < C, other=0.0)
    return fc1_self.to(ACC) + fc1_other.to(ACC) + b1.to(ACC)[None, :]


@triton.jit
def _gelu_fwd_kernel(fc1_ptr, b1_ptr, h_ptr, n_pix, C,
                     ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """h[g] = GELU(fc1[g, :C] + fc1[partner(g), C:] + b1) for the 2N rows g of both directions.

    ``fc1`` is (2N, 2C) = [x0; x1] @ [W1a; W1b]^T: row g holds (self W1a^T, self W1b^T) of the pixel's
    stream g // N, and the partner row g +- N holds the other stream's, so both directions share
    the four products of SPEC §1.
    """
    pid = tl.program_id(0)
    rows, cols, offs, mask = _row_tile(pid, 2 * n_pix, C, BLOCK_M, BLOCK_C)
    pre = _fc1_preactivation(fc1_ptr, b1_ptr, rows, cols, mask, n_pix, C, ACC)
    tl.store(h_ptr + offs, _gelu(pre).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(fc1_ptr, b1_ptr, gh_ptr, gpre_ptr, n_pix, C,
                     ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """gpre = gh * GELU'(pre), the pre-activation recomputed as in ``_gelu_fwd_kernel``."""
    pid = tl.program_id(0)
    rows, cols, offs, mask = _row_tile(pid, 2 * n_pix, C, BLOCK_M, BLOCK_C)
    pre = _fc1_preactivation(fc1_ptr, b1_ptr, rows, cols, mask, n_pix, C, ACC)
    gh = tl.load(gh_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(gpre_ptr + offs, (gh * _gelu_grad(pre)).to(gpre_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _masked_softmax(z, mask):
    z = tl.where(mask, z, float("-inf"))
    # Fully masked (padding) rows would give NaN; they are never stored, but keep them finite.
    z_max = tl.max(z, axis=1)
    z_max = tl.where(z_max == float("-inf"), 0.0, z_max)
    e = tl.exp(z - z_max[:, None])
    total = tl.sum(e, axis=1)
    total = tl.where(total == 0.0, 1.0, total)
    return e / total[:, None]


@triton.jit
def _relation_fwd_kernel(z_ptr, x_ptr, kn_ptr, vn_ptr, u_ptr, w_ptr, n_pix, C,
                         ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """r = softmax_C(z); key input u = k_noise[d] + s - s*r; value input w = v_noise[d] + s - o.

    Rows g < N are direction 0 (self x0), rows g >= N direction 1 (self x1); ``x`` is [x0; x1].
    """
    pid = tl.program_id(0)
    rows, cols, offs, mask = _row_tile(pid, 2 * n_pix, C, BLOCK_M, BLOCK_C)
    partner = tl.where(rows < n_pix, rows + n_pix, rows - n_pix)
    direction = (rows >= n_pix).to(tl.int32)
    noise_offs = direction[:, None] * C + cols[None, :]
    r = _masked_softmax(tl.load(z_ptr + offs, mask=mask, other=0.0).to(ACC), mask)
    s = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    o = tl.load(x_ptr + partner.to(tl.int64)[:, None] * C + cols[None, :], mask=mask, other=0.0).to(ACC)
    kn = tl.load(kn_ptr + noise_offs, mask=mask, other=0.0).to(ACC)
    vn = tl.load(vn_ptr + noise_offs, mask=mask, other=0.0).to(ACC)
    tl.store(u_ptr + offs, (kn + s - s * r).to(u_ptr.dtype.element_ty), mask=mask)
    tl.store(w_ptr + offs, (vn + s - o).to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _relation_bwd_kernel(z_ptr, x_ptr, gu_ptr, gz_ptr, gs_ptr, n_pix, C,
                         ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """From gu = dL/du (u = kn + s - s*r): gz = softmax backward of gr = -gu*s, and gs = gu*(1 - r)."""
    pid = tl.program_id(0)
    rows, cols, offs, mask = _row_tile(pid, 2 * n_pix, C, BLOCK_M, BLOCK_C)
    r = _masked_softmax(tl.load(z_ptr + offs, mask=mask, other=0.0).to(ACC), mask)
    s = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    gu = tl.load(gu_ptr + offs, mask=mask, other=0.0).to(ACC)
    gr = -gu * s
    gz = r * (gr - tl.sum(gr * r, axis=1)[:, None])
    tl.store(gz_ptr + offs, gz.to(gz_ptr.dtype.element_ty), mask=mask)
    tl.store(gs_ptr + offs, (gu - gu * r).to(gs_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_fwd_kernel(q_ptr, key_delta_ptr, vc_ptr, value_delta_ptr, m_ptr, n_pix, C, head_dim, num_heads, scale,
                     ACC: tl.constexpr, BLOCK_M: tl.constexpr, H_PAD: tl.constexpr, DH_PAD: tl.constexpr):
    """a_j = sigmoid(scale * q_j . key_delta_j) per head (the two-way softmax); m = vc + a * value_delta."""
    pid = tl.program_id(0)
    offs, mask = _head_tile(pid, 2 * n_pix, C, head_dim, num_heads, BLOCK_M, H_PAD, DH_PAD)
    q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(ACC)
    key_delta = tl.load(key_delta_ptr + offs, mask=mask, other=0.0).to(ACC)
    a = tl.sigmoid(tl.sum(q * key_delta, axis=2) * scale)
    vc = tl.load(vc_ptr + offs, mask=mask, other=0.0).to(ACC)
    value_delta = tl.load(value_delta_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(m_ptr + offs, (vc + a[:, :, None] * value_delta).to(m_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_bwd_kernel(q_ptr, key_delta_ptr, value_delta_ptr, gm_ptr, gq_ptr, g_key_delta_ptr, g_value_delta_ptr,
                     n_pix, C, head_dim, num_heads, scale,
                     ACC: tl.constexpr, BLOCK_M: tl.constexpr, H_PAD: tl.constexpr, DH_PAD: tl.constexpr):
    """Backward of the gate and mix from gm = dL/dm: the gradients of q (before the scale), key_delta and value_delta."""
    pid = tl.program_id(0)
    offs, mask = _head_tile(pid, 2 * n_pix, C, head_dim, num_heads, BLOCK_M, H_PAD, DH_PAD)
    q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(ACC)
    key_delta = tl.load(key_delta_ptr + offs, mask=mask, other=0.0).to(ACC)
    value_delta = tl.load(value_delta_ptr + offs, mask=mask, other=0.0).to(ACC)
    gm = tl.load(gm_ptr + offs, mask=mask, other=0.0).to(ACC)
    a = tl.sigmoid(tl.sum(q * key_delta, axis=2) * scale)
    g_logit = tl.sum(gm * value_delta, axis=2) * a * (1.0 - a) * scale
    tl.store(gq_ptr + offs, (g_logit[:, :, None] * key_delta).to(gq_ptr.dtype.element_ty), mask=mask)
    tl.store(g_key_delta_ptr + offs, (g_logit[:, :, None] * q).to(g_key_delta_ptr.dtype.element_ty), mask=mask)
    tl.store(g_value_delta_ptr + offs, (a[:, :, None] * gm).to(g_value_delta_ptr.dtype.element_ty), mask=mask)
