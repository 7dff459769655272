"""The narrow forward: the whole module for a tile of 64 pixels held in registers, both directions.

For power-of-two widths 16 ... 64 in 16-bit dtypes (MiT stage 1, the most memory-bound layer): every
intermediate row lives in registers and every weight (a few KB) comes from L2; the products run on
the tensor cores. Wider rows would spill; those widths take the tiled forward (``tiled.py``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import gelu as _gelu
from .common import mm as _mm


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
    """y = s + Wo(vc + a * value_delta) + bo for one direction and a tile of pixels (self s, other o).

    Register pressure, not bandwidth, limits this kernel, so: ``s`` and ``o`` are re-read where
    needed (L1 hits after the first read) rather than kept live in the several register layouts
    their uses want; the relation judger finishes before the attention starts; and the attention
    runs over CHUNK output channels at a time (whole heads), accumulating its out-projection, so
    that only chunk-wide q, key_delta, vc, value_delta tiles are ever live.
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
        key_delta = _mm(key_in, _load_wt(in_w_ptr + C * C, lanes, cols, C), INTERPRET=INTERPRET)
        q = _mm(s, _load_wt(in_w_ptr, lanes, cols, C), INTERPRET=INTERPRET) + _load_row(in_b_ptr, cols)
        qk = q * key_delta
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
def narrow_fwd_kernel(x0_ptr, x1_ptr, y0_ptr, y1_ptr,
                      w1_ptr, b1_ptr, w2_ptr, b2_ptr, kn_ptr, vn_ptr,
                      in_w0_ptr, in_b0_ptr, out_w0_ptr, out_b0_ptr,
                      in_w1_ptr, in_b1_ptr, out_w1_ptr, out_b1_ptr,
                      n_pix, scale,
                      C: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
                      INTERPRET: tl.constexpr = False):
    """The whole module, both directions, for BLOCK_M pixels: reads x0, x1 from DRAM once (the
    re-reads hit L1/L2), writes y0, y1 once.

    Runs only where C is a power of two (so a row is one unmasked block; see ``configs.narrow_config``), with
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
