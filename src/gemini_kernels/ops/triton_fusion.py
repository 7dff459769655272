"""The ``"triton"`` backend: GeminiFusion as Triton kernels with a hand-written backward.

One file, Liger-Kernel style: the kernels, their launch configurations, the forward and backward
launchers, the ``torch.library`` custom ops (so ``torch.compile`` traces the layer without a graph
break) and the entry point ``fusion(x0, x1, params, num_heads)``.

The math is SPEC §1 with its exact identities. Per direction, for a pixel with self ``s`` and other
``o`` (both directions read the pre-fusion inputs)::

    h  = GELU(s W1a^T + o W1b^T + b1);   r = softmax_C(h W2^T + b2)
    q  = (s Wq^T + bq) / sqrt(dh);        dk = (k_noise[d] + s - s*r) Wk^T     (the key bias cancels)
    vc = o Wv^T + bv;                     dv = (v_noise[d] + s - o) Wv^T
    a_j = sigmoid(q_j . dk_j) per head;   m = vc + a * dv;   y = s + m Wo^T + bo

Two forward paths, chosen per layer by ``fused_config``:

* ``fused``: the whole module for a tile of 64 pixels in one program, both directions at once.
  DRAM sees ``x0`` and ``x1`` read once and ``y0`` and ``y1`` written once; the weights (a few KB
  at these widths) come from L2; the products run on the tensor cores (wgmma). Every intermediate
  row lives in registers, which bounds it to narrow layers (power-of-two C from 16 to
  ``FUSED_MAX_WIDTH``, 16-bit dtypes): MiT stage 1 (C = 32, 64), where the layer is memory-bound
  and fusion pays most.
* ``split``: the nine projections run as batched GEMMs (``torch.matmul``: cuBLAS on GPU), and the
  per-pixel math between them runs in three Triton row kernels (bias + GELU, relation softmax +
  key/value inputs, per-head gate + value mix). Wide layers are compute-bound, so the GEMMs are
  what matters and the row kernels only save the elementwise round trips.

The backward is hand-written (no autograd through the kernels). It saves only ``x0``, ``x1`` and
the parameters, recomputes the forward intermediates with the split path, and runs the chain rule
with three Triton row kernels (gate, relation softmax, GELU derivative) between batched GEMMs.
Weight gradients are GEMMs over the per-pixel gradients and ``torch.sum`` over pixels: no atomics,
so two backward runs give bitwise-equal gradients.

Channel padding (row kernels): Triton blocks have power-of-two sizes, so a row of width C is held
in a block of ``next_power_of_2(C)`` lanes with masked loads (``other=0``; ``-inf`` before the
softmax over C). The gate kernels use a padded head layout ``[H_PAD, DH_PAD]`` (lane
``j*DH_PAD + t`` holds channel ``j*dh + t``), so a per-head sum is a plain ``tl.sum`` over the last
axis for any head width (3, 5, 12, 40, ...), exact in every dtype. The fused kernel, whose rows are
tensor-core tiles, forms per-head sums as a product with the 0/1 same-head matrix instead.

Precision: loads are upcast to float32 (float64 stays float64: the interpreter runs float64 for
gradcheck); every sum and softmax is float32 or wider. The split path stores its intermediates in
the input dtype (as the oracle's ``F.linear`` outputs are); the fused path keeps them in float32
except where they become tensor-core operands (h, the key and value inputs, m), rounded to the
input dtype as the oracle rounds them.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import List, NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..params import FusionParams
from ..validation import check_call

# The interpreter is chosen when @triton.jit runs (at import), from TRITON_INTERPRET at that moment.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# The fused forward keeps a few float32 rows per pixel live in registers; at C = 128 a 64-pixel
# tile spills on sm_90a (about 300 bytes of local memory with 8 warps), at C = 64 it does not
# (tests/test_triton_sm90.py checks every configuration).
FUSED_MAX_WIDTH = 64
_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


def unavailable_reason(device) -> Optional[str]:
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:  # bf16 tl.dot and the tile shapes of the fused kernel need Ampere or newer
            return f"the Triton kernels need compute capability 8.0 or newer; {device} has {major}.{minor}"
        return None
    if device.type == "cpu":
        if _INTERPRETED:
            return None
        return ("Triton kernels run on CPU only under the Triton interpreter: set TRITON_INTERPRET=1 "
                "before triton is first imported (slow; for tests)")
    return f"Triton kernels need CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); got device {device}"


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.erf(x * _SQRT_HALF))


@triton.jit
def _gelu_grad(x):
    return 0.5 * (1.0 + tl.erf(x * _SQRT_HALF)) + x * _INV_SQRT_2PI * tl.exp(-0.5 * x * x)


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
def _fc1_preactivation(p_ptr, b1_ptr, rows, cols, mask, n_pix, C, ACC: tl.constexpr):
    """fc1(concat(self, other)) of rows g of both directions, from p = [x0; x1] @ [W1a; W1b]^T (2N, 2C):
    row g's self part plus its partner row's (g +- N: the other stream) other part, plus b1."""
    partner = tl.where(rows < n_pix, rows + n_pix, rows - n_pix)
    p_self = tl.load(p_ptr + rows.to(tl.int64)[:, None] * (2 * C) + cols[None, :], mask=mask, other=0.0)
    p_other = tl.load(p_ptr + partner.to(tl.int64)[:, None] * (2 * C) + C + cols[None, :], mask=mask, other=0.0)
    b1 = tl.load(b1_ptr + cols, mask=cols < C, other=0.0)
    return p_self.to(ACC) + p_other.to(ACC) + b1.to(ACC)[None, :]


@triton.jit
def _gelu_fwd_kernel(p_ptr, b1_ptr, h_ptr, n_pix, C,
                     ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """h[g] = GELU(p[g, :C] + p[partner(g), C:] + b1) for the 2N rows g of both directions.

    ``p`` is (2N, 2C) = [x0; x1] @ [W1a; W1b]^T: row g holds (self W1a^T, self W1b^T) of the pixel's
    stream g // N, and the partner row g +- N holds the other stream's, so both directions share
    the four products of SPEC §1.
    """
    pid = tl.program_id(0)
    rows, cols, offs, mask = _row_tile(pid, 2 * n_pix, C, BLOCK_M, BLOCK_C)
    pre = _fc1_preactivation(p_ptr, b1_ptr, rows, cols, mask, n_pix, C, ACC)
    tl.store(h_ptr + offs, _gelu(pre).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(p_ptr, b1_ptr, gh_ptr, gpre_ptr, n_pix, C,
                     ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """gpre = gh * GELU'(pre), the pre-activation recomputed as in ``_gelu_fwd_kernel``."""
    pid = tl.program_id(0)
    rows, cols, offs, mask = _row_tile(pid, 2 * n_pix, C, BLOCK_M, BLOCK_C)
    pre = _fc1_preactivation(p_ptr, b1_ptr, rows, cols, mask, n_pix, C, ACC)
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
def _relation_bwd_kernel(z_ptr, x_ptr, gu_ptr, gz_ptr, gs_ptr, n_rows, C,
                         ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """From gu = dL/du (u = kn + s - s*r): gz = softmax backward of gr = -gu*s, and gs = gu*(1 - r)."""
    pid = tl.program_id(0)
    rows, cols, offs, mask = _row_tile(pid, n_rows, C, BLOCK_M, BLOCK_C)
    r = _masked_softmax(tl.load(z_ptr + offs, mask=mask, other=0.0).to(ACC), mask)
    s = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    gu = tl.load(gu_ptr + offs, mask=mask, other=0.0).to(ACC)
    gr = -gu * s
    gz = r * (gr - tl.sum(gr * r, axis=1)[:, None])
    tl.store(gz_ptr + offs, gz.to(gz_ptr.dtype.element_ty), mask=mask)
    tl.store(gs_ptr + offs, (gu - gu * r).to(gs_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_fwd_kernel(q_ptr, dk_ptr, vc_ptr, dv_ptr, m_ptr, n_rows, C, head_dim, num_heads, scale,
                     ACC: tl.constexpr, BLOCK_M: tl.constexpr, H_PAD: tl.constexpr, DH_PAD: tl.constexpr):
    """a_j = sigmoid(scale * q_j . dk_j) per head (the two-way softmax); m = vc + a * dv."""
    pid = tl.program_id(0)
    offs, mask = _head_tile(pid, n_rows, C, head_dim, num_heads, BLOCK_M, H_PAD, DH_PAD)
    q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(ACC)
    dk = tl.load(dk_ptr + offs, mask=mask, other=0.0).to(ACC)
    a = tl.sigmoid(tl.sum(q * dk, axis=2) * scale)
    vc = tl.load(vc_ptr + offs, mask=mask, other=0.0).to(ACC)
    dv = tl.load(dv_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(m_ptr + offs, (vc + a[:, :, None] * dv).to(m_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_bwd_kernel(q_ptr, dk_ptr, dv_ptr, gm_ptr, gq_ptr, gdk_ptr, gdv_ptr,
                     n_rows, C, head_dim, num_heads, scale,
                     ACC: tl.constexpr, BLOCK_M: tl.constexpr, H_PAD: tl.constexpr, DH_PAD: tl.constexpr):
    """Backward of the gate and mix from gm = dL/dm: the gradients of q (before the scale), dk and dv."""
    pid = tl.program_id(0)
    offs, mask = _head_tile(pid, n_rows, C, head_dim, num_heads, BLOCK_M, H_PAD, DH_PAD)
    q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(ACC)
    dk = tl.load(dk_ptr + offs, mask=mask, other=0.0).to(ACC)
    dv = tl.load(dv_ptr + offs, mask=mask, other=0.0).to(ACC)
    gm = tl.load(gm_ptr + offs, mask=mask, other=0.0).to(ACC)
    a = tl.sigmoid(tl.sum(q * dk, axis=2) * scale)
    g_logit = tl.sum(gm * dv, axis=2) * a * (1.0 - a) * scale
    tl.store(gq_ptr + offs, (g_logit[:, :, None] * dk).to(gq_ptr.dtype.element_ty), mask=mask)
    tl.store(gdk_ptr + offs, (g_logit[:, :, None] * q).to(gdk_ptr.dtype.element_ty), mask=mask)
    tl.store(gdv_ptr + offs, (a[:, :, None] * gm).to(gdv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mm(a, b, acc=None, INTERPRET: tl.constexpr = False):
    """tl.dot with a float32 accumulator. Triton 3.6's interpreter multiplies bfloat16 operands
    wrongly (as raw bits); there, the operands are widened first, which is exact (the tensor cores
    form exact products of 16-bit operands and sum them in float32 too)."""
    if INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc)


@triton.jit
def _load_wt(w_ptr, k_idx, n_idx, LD: tl.constexpr):
    """A tile of W^T for a weight W with row stride LD: element (k, n) = W[n_idx[n], k_idx[k]]."""
    return tl.load(w_ptr + k_idx[:, None] + n_idx[None, :] * LD)


@triton.jit
def _load_row(v_ptr, idx):
    return tl.load(v_ptr + idx).to(tl.float32)[None, :]


@triton.jit
def _fused_direction(s_ptr, o_ptr, y_ptr, offs, mask, lanes, w1_ptr, b1_ptr, w2_ptr, b2_ptr, kn_ptr, vn_ptr,
                     in_w_ptr, in_b_ptr, out_w_ptr, out_b_ptr, scale,
                     C: tl.constexpr, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr, INTERPRET: tl.constexpr):
    """y = s + Wo(vc + a * dv) + bo for one direction and a tile of pixels (self s, other o).

    Register pressure, not bandwidth, limits this kernel, so: ``s`` and ``o`` are re-read where
    needed (L1 hits after the first read) rather than kept live in the several register layouts
    their uses want; the relation judger finishes before the attention starts; and the attention
    runs over CHUNK output channels at a time (whole heads), accumulating its out-projection, so
    that only chunk-wide q, dk, vc, dv tiles are ever live.
    """
    dtype = s_ptr.dtype.element_ty
    chunk_lanes = tl.arange(0, CHUNK)
    s = tl.load(s_ptr + offs, mask=mask, other=0.0)
    o = tl.load(o_ptr + offs, mask=mask, other=0.0)
    # Relation judger, CHUNK hidden units at a time: concat(s, o) fc1^T = s W1a^T + o W1b^T.
    z = tl.zeros((s.shape[0], C), dtype=tl.float32)
    for c0 in tl.static_range(0, C, CHUNK):
        cols = c0 + chunk_lanes
        pre = _mm(s, _load_wt(w1_ptr, lanes, cols, 2 * C), INTERPRET=INTERPRET)
        pre = _mm(o, _load_wt(w1_ptr + C, lanes, cols, 2 * C), pre, INTERPRET=INTERPRET)
        h = _gelu(pre + _load_row(b1_ptr, cols)).to(dtype)
        z = _mm(h, _load_wt(w2_ptr, cols, lanes, C), z, INTERPRET=INTERPRET)
    z += _load_row(b2_ptr, lanes)
    z_max = tl.max(z, axis=1)
    e = tl.exp(z - z_max[:, None])
    r = e / tl.sum(e, axis=1)[:, None]

    key_in = (_load_row(kn_ptr, lanes) + s.to(tl.float32) * (1.0 - r)).to(dtype)
    value_in = (_load_row(vn_ptr, lanes) + s.to(tl.float32) - o.to(tl.float32)).to(dtype)
    # Per-head sums, broadcast back over the head's lanes, as one product with the 0/1 block-diagonal
    # same-head matrix (exact in bfloat16). The float32 addends are split into a bfloat16 head and
    # tail so that the tensor-core product keeps ~16 mantissa bits (bfloat16 alone keeps 8).
    same_head = tl.where((chunk_lanes[:, None] // HEAD_DIM) == (chunk_lanes[None, :] // HEAD_DIM), 1.0, 0.0)
    same_head = same_head.to(tl.bfloat16)
    y = tl.zeros((s.shape[0], C), dtype=tl.float32)
    for c0 in tl.static_range(0, C, CHUNK):
        cols = c0 + chunk_lanes
        dk = _mm(key_in, _load_wt(in_w_ptr + C * C, lanes, cols, C), INTERPRET=INTERPRET)
        q = _mm(s, _load_wt(in_w_ptr, lanes, cols, C), INTERPRET=INTERPRET) + _load_row(in_b_ptr, cols)
        qk = q * dk
        qk_head = qk.to(tl.bfloat16)
        logits = _mm(qk_head, same_head, INTERPRET=INTERPRET)
        logits = _mm((qk - qk_head.to(tl.float32)).to(tl.bfloat16), same_head, logits, INTERPRET=INTERPRET)
        a = tl.sigmoid(logits * scale)
        wv_t = _load_wt(in_w_ptr + 2 * C * C, lanes, cols, C)
        m = a * _mm(value_in, wv_t, INTERPRET=INTERPRET)
        m = _mm(o, wv_t, m, INTERPRET=INTERPRET) + _load_row(in_b_ptr + 2 * C, cols)
        y = _mm(m.to(dtype), _load_wt(out_w_ptr, cols, lanes, C), y, INTERPRET=INTERPRET)
    y += _load_row(out_b_ptr, lanes) + tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fused_fwd_kernel(x0_ptr, x1_ptr, y0_ptr, y1_ptr,
                      w1_ptr, b1_ptr, w2_ptr, b2_ptr, kn_ptr, vn_ptr,
                      in_w0_ptr, in_b0_ptr, out_w0_ptr, out_b0_ptr,
                      in_w1_ptr, in_b1_ptr, out_w1_ptr, out_b1_ptr,
                      n_pix, scale,
                      C: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
                      INTERPRET: tl.constexpr = False):
    """The whole module, both directions, for BLOCK_M pixels: reads x0, x1 from DRAM once (the
    re-reads hit L1/L2), writes y0, y1 once.

    Runs only where C is a power of two (so a row is one unmasked block; see ``fused_config``), with
    the widths as constexprs so that every weight load is a plain (C, C) tile.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    lanes = tl.arange(0, C)
    offs = rows.to(tl.int64)[:, None] * C + lanes[None, :]
    mask = rows[:, None] < n_pix
    _fused_direction(x0_ptr, x1_ptr, y0_ptr, offs, mask, lanes, w1_ptr, b1_ptr, w2_ptr, b2_ptr, kn_ptr, vn_ptr,
                     in_w0_ptr, in_b0_ptr, out_w0_ptr, out_b0_ptr, scale, C, HEAD_DIM, CHUNK, INTERPRET)
    _fused_direction(x1_ptr, x0_ptr, y1_ptr, offs, mask, lanes, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                     kn_ptr + C, vn_ptr + C, in_w1_ptr, in_b1_ptr, out_w1_ptr, out_b1_ptr, scale, C, HEAD_DIM,
                     CHUNK, INTERPRET)


# ----------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------


class RowConfig(NamedTuple):
    """Rows per program and warps of a row kernel whose rows are ``width`` (padded) lanes wide."""
    block_m: int
    num_warps: int


class FusedConfig(NamedTuple):
    block_m: int
    chunk: int  # output channels of the attention per step (whole heads)
    num_warps: int
    num_stages: int


def _row_config(width: int) -> RowConfig:
    # ~2048 elements per program keeps the 4-6 live tiles of the widest row kernel within the
    # register file with no spills, even at one row of 2048 lanes (dim 1536). From 256 lanes on, 8
    # warps: float32 relation_bwd at (8 rows, 256 lanes, 4 warps) spills on sm_90a (sm90_check).
    return RowConfig(block_m=max(1, min(64, 2048 // width)), num_warps=4 if width < 256 else 8)


def head_layout(dim: int, num_heads: int):
    """(H_PAD, DH_PAD): the padded head layout of a width-``dim`` row."""
    return triton.next_power_of_2(num_heads), triton.next_power_of_2(dim // num_heads)


def fused_config(dim: int, num_heads: int, dtype: torch.dtype) -> Optional[FusedConfig]:
    """The fused forward's configuration, or None where the split path runs instead.

    Fused: 16-bit dtypes (the tensor-core products are what make it fast; float32 wants IEEE
    products, which Triton runs on FMA units with operand tiles that spill, and float64 exists for
    gradcheck) at power-of-two widths from 16 (tl.dot's minimum) to FUSED_MAX_WIDTH, where the row
    intermediates of a 64-pixel tile stay in registers: MiT stage 1 (C = 32, 64), the most
    memory-bound stage. Wider layers run split.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    if not (16 <= dim <= FUSED_MAX_WIDTH and dim & (dim - 1) == 0 and num_heads & (num_heads - 1) == 0):
        return None
    return FusedConfig(block_m=64, chunk=min(dim, 64), num_warps=4 if dim <= 32 else 8, num_stages=1)


def split_configs(dim: int, num_heads: int):
    """The row-kernel configurations of the split path and of the backward, keyed by kernel family."""
    h_pad, dh_pad = head_layout(dim, num_heads)
    return {"row": _row_config(triton.next_power_of_2(dim)), "head": _row_config(h_pad * dh_pad)}


# Representative widths: every MiT stage width (32, 64, 128, 160, 256, 320, 512), the fused path's
# smallest (16), odd head widths (24 -> 3, 96 -> 12) and Swin-L's widest (1536).
CHECKED_WIDTHS = (16, 24, 32, 64, 96, 128, 160, 256, 320, 512, 1536)


def config_table(dims: Sequence[int] = CHECKED_WIDTHS, num_heads: int = 8,
                 dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16, torch.float16, torch.float64)):
    """Every distinct (kernel, constexprs, launch options) the launchers pick for these widths and
    dtypes: what the sm_90a compile check enumerates."""
    seen = {}
    for dtype in dtypes:
        for dim in dims:
            h_pad, dh_pad = head_layout(dim, num_heads)
            block_c = triton.next_power_of_2(dim)
            cfgs = split_configs(dim, num_heads)
            row, head = cfgs["row"], cfgs["head"]
            entries = [
                (name, dict(BLOCK_M=row.block_m, BLOCK_C=block_c), row.num_warps, 1)
                for name in ("gelu_fwd", "gelu_bwd", "relation_fwd", "relation_bwd")
            ] + [
                (name, dict(BLOCK_M=head.block_m, H_PAD=h_pad, DH_PAD=dh_pad), head.num_warps, 1)
                for name in ("gate_fwd", "gate_bwd")
            ]
            fused = fused_config(dim, num_heads, dtype)
            if fused is not None:
                entries.append(("fused_fwd", dict(C=dim, HEAD_DIM=dim // num_heads, BLOCK_M=fused.block_m,
                                                  CHUNK=fused.chunk),
                                fused.num_warps, fused.num_stages))
            # Triton also specialises integer arguments divisible by 16: a distinct compilation.
            aligned = (dim % 16 == 0, (dim // num_heads) % 16 == 0)
            for name, constexprs, num_warps, num_stages in entries:
                key = (name, dtype, tuple(sorted(constexprs.items())), num_warps, num_stages, aligned)
                seen.setdefault(key, dict(kernel=name, dtype=dtype, dim=dim, num_heads=num_heads,
                                          constexprs=constexprs, num_warps=num_warps, num_stages=num_stages))
    return list(seen.values())


KERNELS = {
    "gelu_fwd": _gelu_fwd_kernel, "gelu_bwd": _gelu_bwd_kernel,
    "relation_fwd": _relation_fwd_kernel, "relation_bwd": _relation_bwd_kernel,
    "gate_fwd": _gate_fwd_kernel, "gate_bwd": _gate_bwd_kernel,
    "fused_fwd": _fused_fwd_kernel,
}


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# ----------------------------------------------------------------------------------------------
# Launchers (inputs: contiguous (N, C) rows of one dtype; the custom ops below make them so)
# ----------------------------------------------------------------------------------------------


def _launch_rows(kernel, n_rows: int, dim: int, *args):
    cfg = _row_config(triton.next_power_of_2(dim))
    kernel[(triton.cdiv(n_rows, cfg.block_m),)](
        *args, ACC=_acc(args[0].dtype), BLOCK_M=cfg.block_m, BLOCK_C=triton.next_power_of_2(dim),
        num_warps=cfg.num_warps)


def _launch_heads(kernel, n_rows: int, dim: int, num_heads: int, *args):
    h_pad, dh_pad = head_layout(dim, num_heads)
    cfg = _row_config(h_pad * dh_pad)
    head_dim = dim // num_heads
    kernel[(triton.cdiv(n_rows, cfg.block_m),)](
        *args, n_rows, dim, head_dim, num_heads, 1.0 / math.sqrt(head_dim),
        ACC=_acc(args[0].dtype), BLOCK_M=cfg.block_m, H_PAD=h_pad, DH_PAD=dh_pad, num_warps=cfg.num_warps)


def _direction_weights(p: FusionParams, dim: int):
    """The per-direction projections stacked on a leading axis of 2, for batched GEMMs."""
    in_w = torch.stack((p.in_proj_weight_0, p.in_proj_weight_1))  # (2, 3C, C)
    in_b = torch.stack((p.in_proj_bias_0, p.in_proj_bias_1)).unsqueeze(1)  # (2, 1, 3C)
    wq, wk, wv = in_w.split(dim, dim=1)
    bq, _, bv = in_b.split(dim, dim=2)  # the key bias cancels out of a two-key softmax
    wo = torch.stack((p.out_proj_weight_0, p.out_proj_weight_1))
    bo = torch.stack((p.out_proj_bias_0, p.out_proj_bias_1)).unsqueeze(1)
    return wq, wk, wv, bq, bv, wo, bo


class _SplitState(NamedTuple):
    """The split forward's intermediates, both directions stacked: (2, N, C) or (2N, C) views."""
    x: Tensor  # self of direction d at [d]
    other: Tensor
    p_fc1: Tensor  # (2N, 2C): [x0; x1] @ [W1a; W1b]^T
    h: Tensor
    z: Tensor
    u: Tensor  # key input  k_noise + s - s*r
    w: Tensor  # value input v_noise + s - o
    q: Tensor  # s Wq^T + bq, before the 1/sqrt(dh) scale (the gate kernels apply it)
    dk: Tensor
    dv: Tensor
    m: Tensor  # vc + a * dv, the attention output before Wo


def _split_state(x0: Tensor, x1: Tensor, p: FusionParams, num_heads: int) -> _SplitState:
    n, dim = x0.shape
    x = torch.stack((x0, x1))
    other = x.flip(0)
    x_rows = x.view(2 * n, dim)
    w1 = p.fc1_weight
    p_fc1 = x_rows @ torch.cat((w1[:, :dim], w1[:, dim:])).t()
    h = torch.empty_like(x_rows)
    _launch_rows(_gelu_fwd_kernel, 2 * n, dim, p_fc1, p.fc1_bias, h, n, dim)
    z = torch.addmm(p.fc2_bias, h, p.fc2_weight.t())
    u, w = torch.empty_like(x_rows), torch.empty_like(x_rows)
    _launch_rows(_relation_fwd_kernel, 2 * n, dim, z, x_rows, p.k_noise, p.v_noise, u, w, n, dim)
    u, w = u.view(2, n, dim), w.view(2, n, dim)
    wq, wk, wv, bq, bv, _, _ = _direction_weights(p, dim)
    q = torch.baddbmm(bq, x, wq.transpose(1, 2))
    dk = torch.bmm(u, wk.transpose(1, 2))
    vc = torch.baddbmm(bv, other, wv.transpose(1, 2))
    dv = torch.bmm(w, wv.transpose(1, 2))
    m = torch.empty_like(x)
    _launch_heads(_gate_fwd_kernel, 2 * n, dim, num_heads, q, dk, vc, dv, m)
    return _SplitState(x, other, p_fc1, h, z, u, w, q, dk, dv, m)


def _split_forward(x0: Tensor, x1: Tensor, p: FusionParams, num_heads: int):
    st = _split_state(x0, x1, p, num_heads)
    _, _, _, _, _, wo, bo = _direction_weights(p, x0.shape[1])
    out = torch.baddbmm(bo, st.m, wo.transpose(1, 2))
    return out[0] + x0, out[1] + x1  # the residual last, rounded as the oracle rounds it


def _fused_forward(x0: Tensor, x1: Tensor, p: FusionParams, num_heads: int, cfg: FusedConfig):
    n, dim = x0.shape
    y0, y1 = torch.empty_like(x0), torch.empty_like(x1)
    _fused_fwd_kernel[(triton.cdiv(n, cfg.block_m),)](
        x0, x1, y0, y1, *p, n, 1.0 / math.sqrt(dim // num_heads),
        C=dim, HEAD_DIM=dim // num_heads, BLOCK_M=cfg.block_m, CHUNK=cfg.chunk, INTERPRET=_INTERPRETED,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y0, y1


def forward_rows(x0: Tensor, x1: Tensor, p: FusionParams, num_heads: int, path: Optional[str] = None):
    """(y0, y1) for contiguous (N, C) inputs and contiguous parameters of their dtype.

    ``path`` forces ``"fused"`` or ``"split"`` (tests compare both); by default ``fused_config`` decides.
    """
    cfg = fused_config(x0.shape[1], num_heads, x0.dtype)
    if path == "fused" and cfg is None:
        raise ValueError(f"the fused path does not run dim={x0.shape[1]}, num_heads={num_heads}, {x0.dtype}")
    if path == "split" or cfg is None:
        return _split_forward(x0, x1, p, num_heads)
    return _fused_forward(x0, x1, p, num_heads, cfg)


def backward_rows(gy0: Tensor, gy1: Tensor, x0: Tensor, x1: Tensor, p: FusionParams, num_heads: int):
    """Gradients ``[gx0, gx1, *param_grads]`` (FusionParams order) for contiguous (N, C) rows.

    Every recomputed intermediate is dropped right after its last use (the ``del``s): the peak is
    about 17 tensors of (2N, C) (the recomputed forward plus the gate's gradients) instead of the
    ~27 that holding everything to the end would take.
    """
    n, dim = x0.shape
    x, other, p_fc1, h, z, u, w, q, dk, dv, m = _split_state(x0, x1, p, num_heads)
    x_rows, other_rows = x.view(2 * n, dim), other.view(2 * n, dim)
    wq, wk, wv, _, _, wo, _ = _direction_weights(p, dim)
    gy = torch.stack((gy0, gy1))
    g_wo, g_bo = [gy[d].t() @ m[d] for d in (0, 1)], [gy[d].sum(0) for d in (0, 1)]
    del m
    gm = torch.bmm(gy, wo)  # = dL/dvc
    gq, gdk, gdv = torch.empty_like(gm), torch.empty_like(gm), torch.empty_like(gm)
    _launch_heads(_gate_bwd_kernel, 2 * n, dim, num_heads, q, dk, dv, gm, gq, gdk, gdv)
    del q, dk, dv
    g_wq, g_bq = torch.bmm(gq.transpose(1, 2), x), gq.sum(1)
    g_self = torch.baddbmm(gy, gq, wq)  # dL/ds: the residual and the query
    del gq, gy
    g_wk = torch.bmm(gdk.transpose(1, 2), u)
    gu = torch.bmm(gdk, wk)
    del u, gdk
    g_wv = torch.bmm(gdv.transpose(1, 2), w) + torch.bmm(gm.transpose(1, 2), other)
    g_bv = gm.sum(1)
    gw = torch.bmm(gdv, wv)
    del w, gdv
    g_other = torch.bmm(gm, wv)  # dL/do: the cross value
    del gm
    g_self += gw  # w = v_noise + s - o
    g_other -= gw
    g_kn, g_vn = gu.sum(1), gw.sum(1)
    del gw

    gz, gs_relation = torch.empty_like(x_rows), torch.empty_like(x_rows)
    _launch_rows(_relation_bwd_kernel, 2 * n, dim, z, x_rows, gu.view(2 * n, dim), gz, gs_relation, 2 * n, dim)
    del z, gu
    g_self += gs_relation.view(2, n, dim)
    del gs_relation
    g_w2, g_b2 = gz.t() @ h, gz.sum(0)
    gh = gz @ p.fc2_weight
    del h, gz
    gpre = torch.empty_like(x_rows)
    _launch_rows(_gelu_bwd_kernel, 2 * n, dim, p_fc1, p.fc1_bias, gh, gpre, n, dim)
    del p_fc1, gh
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


# ----------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile (traced through their fake implementations), differentiable
# through the hand-written backward op.
# ----------------------------------------------------------------------------------------------


def _rows(t: Tensor, dim: int) -> Tensor:
    return t.reshape(-1, dim).contiguous()


@torch.library.custom_op("gemini_kernels::triton_fusion_fwd", mutates_args=())
def fusion_fwd_op(x0: Tensor, x1: Tensor, params: List[Tensor], num_heads: int) -> List[Tensor]:
    """(y0, y1) for ``(..., C)`` inputs; parameters in FusionParams order, all of the inputs' dtype."""
    check_call(x0, x1, FusionParams(*params), num_heads)  # the op is public: torch.ops.gemini_kernels
    if x0.numel() == 0:
        return [x0.new_empty(x0.shape), x1.new_empty(x1.shape)]
    dim = x0.shape[-1]
    p = FusionParams(*(t.contiguous() for t in params))
    with torch.cuda.device(x0.device) if x0.is_cuda else contextlib.nullcontext():
        y0, y1 = forward_rows(_rows(x0, dim), _rows(x1, dim), p, num_heads)
    return [y0.view(x0.shape), y1.view(x1.shape)]


@fusion_fwd_op.register_fake
def _(x0, x1, params, num_heads):
    return [x0.new_empty(x0.shape), x1.new_empty(x1.shape)]


@torch.library.custom_op("gemini_kernels::triton_fusion_bwd", mutates_args=())
def fusion_bwd_op(gy0: Tensor, gy1: Tensor, x0: Tensor, x1: Tensor, params: List[Tensor],
                  num_heads: int) -> List[Tensor]:
    """``[gx0, gx1, *param_grads]``: the gradients of ``fusion_fwd_op`` for output gradients gy0, gy1."""
    check_call(x0, x1, FusionParams(*params), num_heads)
    for name, g, x in (("gy0", gy0, x0), ("gy1", gy1, x1)):
        if g.shape != x.shape or g.dtype != x.dtype or g.device != x.device:
            raise ValueError(f"{name} must match x{name[-1]} ({tuple(x.shape)}, {x.dtype}, {x.device}); "
                             f"got ({tuple(g.shape)}, {g.dtype}, {g.device})")
    if x0.numel() == 0:
        return [torch.zeros_like(x0), torch.zeros_like(x1), *(torch.zeros_like(t) for t in params)]
    dim = x0.shape[-1]
    p = FusionParams(*(t.contiguous() for t in params))
    with torch.cuda.device(x0.device) if x0.is_cuda else contextlib.nullcontext():
        grads = backward_rows(_rows(gy0, dim), _rows(gy1, dim), _rows(x0, dim), _rows(x1, dim), p, num_heads)
    return [grads[0].view(x0.shape), grads[1].view(x1.shape), *grads[2:]]


@fusion_bwd_op.register_fake
def _(gy0, gy1, x0, x1, params, num_heads):
    return [x0.new_empty(x0.shape), x1.new_empty(x1.shape), *(t.new_empty(t.shape) for t in params)]


def _setup_context(ctx, inputs, output):
    x0, x1, params, num_heads = inputs
    ctx.save_for_backward(x0, x1, *params)  # all the backward keeps: it recomputes the rest
    ctx.num_heads = num_heads


def _backward(ctx, grads):
    x0, x1, *params = ctx.saved_tensors
    gy0, gy1 = (torch.zeros_like(x) if g is None else g for g, x in zip(grads, (x0, x1)))
    g = fusion_bwd_op(gy0, gy1, x0, x1, params, ctx.num_heads)
    return g[0], g[1], g[2:], None


fusion_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, grads):
    raise RuntimeError("gemini_kernels: the Triton backward is not differentiable: it cannot differentiate twice "
                       "(second derivatives of GeminiFusion are available from backend='torch')")


# Without an autograd formula a custom op's outputs read as constants, and a second derivative
# through the backward would come out as zeros.
fusion_bwd_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def fusion(x0: Tensor, x1: Tensor, params: FusionParams, num_heads: int):
    """The backend entry point: ``(y0, y1)`` for validated ``(..., C)`` inputs, differentiable.

    Under ``torch.autocast`` it does what the oracle does: the matrix products run in the autocast
    dtype (inputs and parameters are cast to it; float64 is left alone, as autocast leaves it),
    and the outputs come back in the inputs' dtype.
    """
    out_dtype = x0.dtype
    device_type = x0.device.type
    params = list(params)
    if out_dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            y0, y1 = fusion_fwd_op(x0.to(dtype), x1.to(dtype), [t.to(dtype) for t in params], num_heads)
        return y0.to(out_dtype), y1.to(out_dtype)
    y0, y1 = fusion_fwd_op(x0, x1, params, num_heads)
    return y0, y1
