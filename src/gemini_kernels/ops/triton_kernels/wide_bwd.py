"""The wide-layer backward: two row-tile kernels for the input gradients, weight gradients as GEMMs over
all pixels.

The tiled backward (``tiled_bwd.py``) keeps every weight gradient as per-program float32 partials
(11 C^2 floats a program) and 21 scratch rows, all of which must stay in L2: at C = 320 that leaves 6
programs, at 512 two. Here no program holds a weight gradient. The chain runs in two persistent
row-tile kernels whose per-program scratch is two or three rows of the input dtype, so the grid is
the persistent one (a program per SM); each writes the per-pixel operands of the weight gradients
(input dtype, as the oracle's intermediates are) once, and a weight-gradient kernel then computes
each ``G^T A`` over all pixels, one 64 x 64 tile of it a program, deterministically (no atomics, no
split over pixels).

``wide_bwd_heads_kernel`` (per tile and direction: self ``s``, other ``o``, output gradient ``gy``)::

    recompute h = GELU(fc1([s, o])), z = h W2^T + b2 and its row statistics, u = k_noise + s - s r
    per head group: q, key_delta = u Wk^T, the gate a, value_delta = w Wv^T (w = v_noise + s - o),
        m = o Wv^T + bv + a value_delta, gm = gy Wo, then g_a = sum_head gm value_delta,
        g_logit = g_a a (1 - a) / sqrt(dh), g_q = g_logit key_delta, g_key_delta = g_logit q
    writes u, m, g_q, g_key_delta, gm, a       (the operands of g_Wo, g_Wq, g_Wk, g_Wv)
    and, both directions done: dx_self = gy + g_q Wq + g_w, dx_other = gm Wv - g_w with g_w = (a gm) Wv

``wide_bwd_relation_kernel``::

    recompute h (written: the operand of g_W2) and z; g_u = g_key_delta Wk;
    dx_self += g_u (1 - r); g_z = r (g_r - sum(g_r r)) with g_r = -g_u s     (written: of g_W2)
    g_pre = (g_z W2) GELU'(pre)                                             (written: of g_W1)
    and, both directions done: dx_self += g_pre W1a, dx_other += g_pre W1b

``weight_grad_kernel``: ``g_Wo = gy^T m``, ``g_Wq = g_q^T s``, ``g_Wk = g_key_delta^T u``,
``g_Wv = gm^T o + (a gm)^T w`` (one launch), then ``g_W2 = g_z^T h`` and ``g_W1 = g_pre^T [s, o]``
over both directions (a second launch, after the relation kernel). The bias and noise gradients
are column sums the row-tile kernels add into per-program float32 partials (14 C each), which
``reduce_bias_kernel`` sums in a fixed order into the flat gradient.

The per-pixel buffers have ``cdiv(N, BM) * BM`` rows, so that a tile's rows are addressed like
scratch rows; the weight-gradient sums stop at row N.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import gelu, gelu_grad, mm
from .tiled import (_fc1, _group_cols, _key_input, _load_rows, _relation_logits, _rows_times_w, _tile_cols,
                    _value_products)
from .tiled_bwd import _store_slot

# Offsets in the compact bias layout (14 C, FusionParams order of the vector parameters): b1, b2,
# k_noise (2 C), v_noise (2 C), then per direction in_proj_bias (3 C) and out_proj_bias (C).
BIAS_WIDTH = 14
_BIAS_WIDTH = tl.constexpr(BIAS_WIDTH)  # the same, for the kernels


@triton.jit
def _add_col_sums(part_ptr, cols, cmask, value, row_mask):
    """partial[cols] += the sum over the tile's real rows of ``value``."""
    total = tl.sum(tl.where(row_mask[:, None] & cmask[None, :], value, 0.0), axis=0)
    tl.store(part_ptr + cols, tl.load(part_ptr + cols, mask=cmask, other=0.0) + total, mask=cmask)


@triton.jit
def _recompute_relation(s_ptr, o_ptr, rows, row_mask, local, w1_ptr, b1_ptr, w2_ptr, b2_ptr, h_ptr, pre_ptr, z_ptr,
                        C: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, dtype,
                        INTERPRET: tl.constexpr, PRECISION: tl.constexpr, KEEP_PRE: tl.constexpr):
    """h = GELU(fc1([s, o])) into ``h_ptr`` and z = h W2^T + b2 into ``z_ptr`` (rows ``local``, stride
    C, input dtype), the pre-activation into ``pre_ptr`` when KEEP_PRE; returns z's row statistics."""
    for n0 in range(0, C, BN):
        cols, cmask = _tile_cols(n0, BN, C)
        pre = _fc1(s_ptr, o_ptr, rows, row_mask, w1_ptr, b1_ptr, cols, cmask, C, BM, BK, BN, dtype, INTERPRET,
                   PRECISION)
        _store_slot(h_ptr, local, cols, cmask, gelu(pre).to(dtype), C)
        if KEEP_PRE:
            _store_slot(pre_ptr, local, cols, cmask, pre.to(pre_ptr.dtype.element_ty), C)
    tl.debug_barrier()
    z_max, z_sum = _relation_logits(h_ptr, local, local < BM, w2_ptr, b2_ptr, z_ptr, C, BM, BK, BN, dtype,
                                    INTERPRET, PRECISION)
    tl.debug_barrier()
    return z_max, z_sum


@triton.jit
def _heads_direction(s_ptr, o_ptr, gy_ptr, rows, row_mask, local, h_slot, z_slot,
                     u_ptr, m_ptr, gq_ptr, g_kd_ptr, gm_ptr, gate_ptr,
                     w1_ptr, b1_ptr, w2_ptr, b2_ptr, kn_ptr, vn_ptr, in_w_ptr, in_b_ptr, out_w_ptr,
                     part_bq, part_bv, scale,
                     C: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HT: tl.constexpr, DL: tl.constexpr,
                     PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """One direction of the heads kernel on one tile: ``u_ptr`` ... ``gm_ptr`` and ``gate_ptr`` point at
    the tile's first row of this direction's per-pixel buffers."""
    dtype = s_ptr.dtype.element_ty
    acc_t = tl.float64 if dtype == tl.float64 else tl.float32
    all_rows = local < BM
    z_max, z_sum = _recompute_relation(s_ptr, o_ptr, rows, row_mask, local, w1_ptr, b1_ptr, w2_ptr, b2_ptr, h_slot,
                                       h_slot, z_slot, C, BM, BN, BK, dtype, INTERPRET, PRECISION, False)
    _key_input(z_slot, z_max, z_sum, s_ptr, rows, row_mask, local, kn_ptr, u_ptr, C, BM, BN, dtype)
    tl.debug_barrier()
    # Per head group, everything in registers: a group is one lane chunk (configs.wide_bwd_config).
    for g in range(0, tl.cdiv(NUM_HEADS, HT)):
        chans, nmask = _group_cols(g, 0, HT, DL, NUM_HEADS, HEAD_DIM)
        q = _rows_times_w(s_ptr, rows, row_mask, in_w_ptr, C, chans, nmask, True, C, BM, BK, HT * DL, dtype,
                          INTERPRET, PRECISION)
        q += tl.load(in_b_ptr + chans, mask=nmask, other=0.0).to(acc_t)[None, :]
        key_delta = _rows_times_w(u_ptr, local, all_rows, in_w_ptr + C * C, C, chans, nmask, True, C, BM, BK,
                                  HT * DL, dtype, INTERPRET, PRECISION)
        a = tl.sigmoid(tl.sum(tl.reshape(q * key_delta, (BM, HT, DL)), axis=2) * scale)
        a_cols = tl.reshape(tl.broadcast_to(a[:, :, None], (BM, HT, DL)), (BM, HT * DL))
        vc, value_delta = _value_products(s_ptr, o_ptr, rows, row_mask, vn_ptr, in_w_ptr + 2 * C * C, chans, nmask,
                                          C, BM, BK, HT * DL, dtype, INTERPRET, PRECISION)
        bv = tl.load(in_b_ptr + 2 * C + chans, mask=nmask, other=0.0).to(acc_t)
        _store_slot(m_ptr, local, chans, nmask, (vc + bv[None, :] + a_cols * value_delta).to(dtype), C)
        gm = _rows_times_w(gy_ptr, rows, row_mask, out_w_ptr, C, chans, nmask, False, C, BM, BK, HT * DL, dtype,
                           INTERPRET, PRECISION)
        g_a = tl.sum(tl.reshape(gm * value_delta, (BM, HT, DL)), axis=2)
        g_logit = g_a * a * (1.0 - a) * scale
        gl_cols = tl.reshape(tl.broadcast_to(g_logit[:, :, None], (BM, HT, DL)), (BM, HT * DL))
        g_q = gl_cols * key_delta
        _store_slot(gq_ptr, local, chans, nmask, g_q.to(dtype), C)
        _store_slot(g_kd_ptr, local, chans, nmask, (gl_cols * q).to(dtype), C)
        _store_slot(gm_ptr, local, chans, nmask, gm.to(dtype), C)
        heads = g * HT + tl.arange(0, HT)
        tl.store(gate_ptr + local[:, None] * NUM_HEADS + heads[None, :], a, mask=(heads < NUM_HEADS)[None, :])
        _add_col_sums(part_bq, chans, nmask, g_q, row_mask)
        _add_col_sums(part_bv, chans, nmask, gm, row_mask)
    tl.debug_barrier()


@triton.jit
def _gated_rows(gm_ptr, gate_ptr, local, ks, kmask, C: tl.constexpr, NUM_HEADS: tl.constexpr,
                HEAD_DIM: tl.constexpr):
    """(gm, a gm) at columns ``ks`` of the tile's rows (a: the gate of each column's head)."""
    gm = _load_rows(gm_ptr, local, local >= 0, ks, kmask, C)
    a = tl.load(gate_ptr + local[:, None] * NUM_HEADS + (ks // HEAD_DIM)[None, :], mask=kmask[None, :], other=0.0)
    return gm, a * gm.to(a.dtype)


@triton.jit
def _products_back(gq_ptr, gm_ptr, gate_ptr, in_w_ptr, local, cols, cmask, C: tl.constexpr,
                   NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr, dtype, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """Columns ``cols`` of (g_q Wq, gm Wv, g_w = (a gm) Wv) for one direction's tile."""
    acc_t = tl.float64 if dtype == tl.float64 else tl.float32
    via_q = tl.zeros((BM, BN), dtype=acc_t)
    via_v = tl.zeros((BM, BN), dtype=acc_t)
    g_w = tl.zeros((BM, BN), dtype=acc_t)
    for k0 in range(0, C, BK):
        ks, kmask = _tile_cols(k0, BK, C)
        g_q = _load_rows(gq_ptr, local, local >= 0, ks, kmask, C)
        gm, agm = _gated_rows(gm_ptr, gate_ptr, local, ks, kmask, C, NUM_HEADS, HEAD_DIM)
        wmask = kmask[:, None] & cmask[None, :]
        wq = tl.load(in_w_ptr + ks[:, None] * C + cols[None, :], mask=wmask, other=0.0)
        wv = tl.load(in_w_ptr + 2 * C * C + ks[:, None] * C + cols[None, :], mask=wmask, other=0.0)
        via_q = mm(g_q, wq, via_q, INTERPRET, PRECISION)
        via_v = mm(gm, wv, via_v, INTERPRET, PRECISION)
        g_w = mm(agm.to(dtype), wv, g_w, INTERPRET, PRECISION)
    return via_q, via_v, g_w


@triton.jit
def wide_bwd_heads_kernel(gy0_ptr, gy1_ptr, x0_ptr, x1_ptr, gx0_ptr, gx1_ptr,
                          w1_ptr, b1_ptr, w2_ptr, b2_ptr, kn_ptr, vn_ptr,
                          in_w0_ptr, in_b0_ptr, out_w0_ptr, out_b0_ptr,
                          in_w1_ptr, in_b1_ptr, out_w1_ptr, out_b1_ptr,
                          u_ptr, m_ptr, gq_ptr, g_kd_ptr, gm_ptr, gate_ptr, scratch_ptr, partials_ptr,
                          n_pix, n_rows, n_prog, scale,
                          C: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HT: tl.constexpr, DL: tl.constexpr,
                          PRECISION: tl.constexpr, INTERPRET: tl.constexpr = False):
    """Tiles ``pid, pid + P, ...``: the per-pixel operands of g_Wo, g_Wq, g_Wk, g_Wv and the input
    gradients through q, the keys' gates and the values (``gx0``, ``gx1``, finished by the relation
    kernel).

    ``u_ptr`` ... ``gm_ptr``: (2, n_rows, C) in the input dtype, ``gate_ptr``: (2, n_rows, NUM_HEADS)
    float32, n_rows = the pixels rounded up to whole tiles; ``scratch_ptr``: (P, 2, BM, C) input
    dtype; ``partials_ptr``: (P, 14 C) float32 bias partials, zeroed, this kernel's columns: the
    output and value biases, the query bias, v_noise.
    """
    pid = tl.program_id(0)
    dtype = x0_ptr.dtype.element_ty
    acc_t = tl.float64 if dtype == tl.float64 else tl.float32
    h_slot = scratch_ptr + pid.to(tl.int64) * (2 * BM * C)
    z_slot = h_slot + BM * C
    part = partials_ptr + pid.to(tl.int64) * (_BIAS_WIDTH * C)
    plane = n_rows.to(tl.int64) * C  # one direction's per-pixel buffer
    local = tl.arange(0, BM)
    tile = pid
    while tile < tl.cdiv(n_pix, BM):
        rows = tile * BM + local
        row_mask = rows < n_pix
        first = tile.to(tl.int64) * (BM * C)
        gate_first = tile.to(tl.int64) * (BM * NUM_HEADS)
        gate_plane = n_rows.to(tl.int64) * NUM_HEADS
        _heads_direction(x0_ptr, x1_ptr, gy0_ptr, rows, row_mask, local, h_slot, z_slot,
                         u_ptr + first, m_ptr + first, gq_ptr + first, g_kd_ptr + first, gm_ptr + first,
                         gate_ptr + gate_first, w1_ptr, b1_ptr, w2_ptr, b2_ptr, kn_ptr, vn_ptr,
                         in_w0_ptr, in_b0_ptr, out_w0_ptr, part + 6 * C, part + 8 * C, scale,
                         C, NUM_HEADS, HEAD_DIM, BM, BN, BK, HT, DL, PRECISION, INTERPRET)
        _heads_direction(x1_ptr, x0_ptr, gy1_ptr, rows, row_mask, local, h_slot, z_slot,
                         u_ptr + plane + first, m_ptr + plane + first, gq_ptr + plane + first,
                         g_kd_ptr + plane + first, gm_ptr + plane + first, gate_ptr + gate_plane + gate_first,
                         w1_ptr, b1_ptr, w2_ptr, b2_ptr, kn_ptr + C, vn_ptr + C,
                         in_w1_ptr, in_b1_ptr, out_w1_ptr, part + 10 * C, part + 12 * C, scale,
                         C, NUM_HEADS, HEAD_DIM, BM, BN, BK, HT, DL, PRECISION, INTERPRET)
        # dx_self = gy + g_q Wq + g_w and dx_other = gm Wv - g_w, both directions at once per column tile.
        for n0 in range(0, C, BN):
            cols, cmask = _tile_cols(n0, BN, C)
            via_q0, via_v0, g_w0 = _products_back(gq_ptr + first, gm_ptr + first, gate_ptr + gate_first,
                                                  in_w0_ptr, local, cols, cmask, C, NUM_HEADS, HEAD_DIM, BM, BN,
                                                  BK, dtype, INTERPRET, PRECISION)
            via_q1, via_v1, g_w1 = _products_back(gq_ptr + plane + first, gm_ptr + plane + first,
                                                  gate_ptr + gate_plane + gate_first, in_w1_ptr, local, cols,
                                                  cmask, C, NUM_HEADS, HEAD_DIM, BM, BN, BK, dtype, INTERPRET,
                                                  PRECISION)
            gy0 = _load_rows(gy0_ptr, rows, row_mask, cols, cmask, C).to(acc_t)
            gy1 = _load_rows(gy1_ptr, rows, row_mask, cols, cmask, C).to(acc_t)
            out = rows.to(tl.int64)[:, None] * C + cols[None, :]
            keep = row_mask[:, None] & cmask[None, :]
            tl.store(gx0_ptr + out, (gy0 + via_q0 + g_w0 + via_v1 - g_w1).to(dtype), mask=keep)
            tl.store(gx1_ptr + out, (gy1 + via_q1 + g_w1 + via_v0 - g_w0).to(dtype), mask=keep)
            _add_col_sums(part + 9 * C, cols, cmask, gy0, row_mask)
            _add_col_sums(part + 13 * C, cols, cmask, gy1, row_mask)
            _add_col_sums(part + 4 * C, cols, cmask, g_w0, row_mask)
            _add_col_sums(part + 5 * C, cols, cmask, g_w1, row_mask)
        tl.debug_barrier()
        tile += n_prog


@triton.jit
def _relation_direction(s_ptr, o_ptr, rows, row_mask, local, pre_slot, z_slot, g_u_slot, dx_self_ptr,
                        g_kd_ptr, h_ptr, gz_ptr, g_pre_ptr,
                        w1_ptr, b1_ptr, w2_ptr, b2_ptr, in_w_ptr, part_kn, part_b1, part_b2,
                        C: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    dtype = s_ptr.dtype.element_ty
    acc_t = tl.float64 if dtype == tl.float64 else tl.float32
    all_rows = local < BM
    z_max, z_sum = _recompute_relation(s_ptr, o_ptr, rows, row_mask, local, w1_ptr, b1_ptr, w2_ptr, b2_ptr, h_ptr,
                                       pre_slot, z_slot, C, BM, BN, BK, dtype, INTERPRET, PRECISION, True)
    # g_u = g_key_delta Wk; the self gets g_u (1 - r); dot = sum(g_r r) with g_r = -g_u s.
    dot = tl.zeros((BM,), dtype=acc_t)
    for n0 in range(0, C, BN):
        cols, cmask = _tile_cols(n0, BN, C)
        g_u = _rows_times_w(g_kd_ptr, local, all_rows, in_w_ptr + C * C, C, cols, cmask, False, C, BM, BK, BN,
                            dtype, INTERPRET, PRECISION)
        r = tl.exp(_load_rows(z_slot, local, all_rows, cols, cmask, C).to(acc_t) - z_max[:, None]) / z_sum[:, None]
        s = _load_rows(s_ptr, rows, row_mask, cols, cmask, C).to(acc_t)
        _store_slot(g_u_slot, local, cols, cmask, g_u.to(g_u_slot.dtype.element_ty), C)
        keep = row_mask[:, None] & cmask[None, :]
        out = rows.to(tl.int64)[:, None] * C + cols[None, :]
        dx = tl.load(dx_self_ptr + out, mask=keep, other=0.0).to(acc_t)
        tl.store(dx_self_ptr + out, (dx + g_u - g_u * r).to(dtype), mask=keep)
        dot += tl.sum(tl.where(cmask[None, :], -g_u * s * r, 0.0), axis=1)
        _add_col_sums(part_kn, cols, cmask, g_u, row_mask)
    tl.debug_barrier()
    for n0 in range(0, C, BN):
        cols, cmask = _tile_cols(n0, BN, C)
        r = tl.exp(_load_rows(z_slot, local, all_rows, cols, cmask, C).to(acc_t) - z_max[:, None]) / z_sum[:, None]
        g_u = _load_rows(g_u_slot, local, all_rows, cols, cmask, C).to(acc_t)
        s = _load_rows(s_ptr, rows, row_mask, cols, cmask, C).to(acc_t)
        g_z = r * (-g_u * s - dot[:, None])
        _store_slot(gz_ptr, local, cols, cmask, g_z.to(dtype), C)
        _add_col_sums(part_b2, cols, cmask, g_z, row_mask)
    tl.debug_barrier()
    for n0 in range(0, C, BN):
        cols, cmask = _tile_cols(n0, BN, C)
        g_h = _rows_times_w(gz_ptr, local, all_rows, w2_ptr, C, cols, cmask, False, C, BM, BK, BN, dtype,
                            INTERPRET, PRECISION)
        g_pre = g_h * gelu_grad(_load_rows(pre_slot, local, all_rows, cols, cmask, C).to(acc_t))
        _store_slot(g_pre_ptr, local, cols, cmask, g_pre.to(dtype), C)
        _add_col_sums(part_b1, cols, cmask, g_pre, row_mask)
    tl.debug_barrier()


@triton.jit
def wide_bwd_relation_kernel(x0_ptr, x1_ptr, gx0_ptr, gx1_ptr,
                             w1_ptr, b1_ptr, w2_ptr, b2_ptr, kn_ptr, vn_ptr,
                             in_w0_ptr, in_b0_ptr, out_w0_ptr, out_b0_ptr,
                             in_w1_ptr, in_b1_ptr, out_w1_ptr, out_b1_ptr,
                             g_kd_ptr, h_ptr, gz_ptr, g_pre_ptr, scratch_ptr, partials_ptr,
                             n_pix, n_rows, n_prog,
                             C: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                             PRECISION: tl.constexpr, INTERPRET: tl.constexpr = False):
    """Tiles ``pid, pid + P, ...``: the relation judger's share of the input gradients (added into
    ``gx0``, ``gx1``) and the per-pixel operands of g_W2 and g_W1 (``h_ptr``, ``gz_ptr``,
    ``g_pre_ptr``: (2, n_rows, C)). ``g_kd_ptr``: the heads kernel's g_key_delta; ``scratch_ptr``:
    (P, 3, BM, C) input dtype; ``partials_ptr``: the heads kernel's, this kernel's columns b1, b2,
    k_noise."""
    pid = tl.program_id(0)
    dtype = x0_ptr.dtype.element_ty
    acc_t = tl.float64 if dtype == tl.float64 else tl.float32
    pre_slot = scratch_ptr + pid.to(tl.int64) * (3 * BM * C)
    z_slot = pre_slot + BM * C
    g_u_slot = z_slot + BM * C
    part = partials_ptr + pid.to(tl.int64) * (_BIAS_WIDTH * C)
    plane = n_rows.to(tl.int64) * C
    local = tl.arange(0, BM)
    tile = pid
    while tile < tl.cdiv(n_pix, BM):
        rows = tile * BM + local
        row_mask = rows < n_pix
        first = tile.to(tl.int64) * (BM * C)
        _relation_direction(x0_ptr, x1_ptr, rows, row_mask, local, pre_slot, z_slot, g_u_slot, gx0_ptr,
                            g_kd_ptr + first, h_ptr + first, gz_ptr + first, g_pre_ptr + first,
                            w1_ptr, b1_ptr, w2_ptr, b2_ptr, in_w0_ptr, part + 2 * C, part, part + C,
                            C, BM, BN, BK, PRECISION, INTERPRET)
        _relation_direction(x1_ptr, x0_ptr, rows, row_mask, local, pre_slot, z_slot, g_u_slot, gx1_ptr,
                            g_kd_ptr + plane + first, h_ptr + plane + first, gz_ptr + plane + first,
                            g_pre_ptr + plane + first,
                            w1_ptr, b1_ptr, w2_ptr, b2_ptr, in_w1_ptr, part + 3 * C, part, part + C,
                            C, BM, BN, BK, PRECISION, INTERPRET)
        # dx_self += g_pre W1a, dx_other += g_pre W1b, both directions at once per column tile.
        for n0 in range(0, C, BN):
            cols, cmask = _tile_cols(n0, BN, C)
            all_rows = local < BM
            pre0_a = _rows_times_w(g_pre_ptr + first, local, all_rows, w1_ptr, 2 * C, cols, cmask, False, C, BM,
                                   BK, BN, dtype, INTERPRET, PRECISION)
            pre0_b = _rows_times_w(g_pre_ptr + first, local, all_rows, w1_ptr + C, 2 * C, cols, cmask, False, C,
                                   BM, BK, BN, dtype, INTERPRET, PRECISION)
            pre1_a = _rows_times_w(g_pre_ptr + plane + first, local, all_rows, w1_ptr, 2 * C, cols, cmask, False,
                                   C, BM, BK, BN, dtype, INTERPRET, PRECISION)
            pre1_b = _rows_times_w(g_pre_ptr + plane + first, local, all_rows, w1_ptr + C, 2 * C, cols, cmask,
                                   False, C, BM, BK, BN, dtype, INTERPRET, PRECISION)
            out = rows.to(tl.int64)[:, None] * C + cols[None, :]
            keep = row_mask[:, None] & cmask[None, :]
            dx0 = tl.load(gx0_ptr + out, mask=keep, other=0.0).to(acc_t)
            dx1 = tl.load(gx1_ptr + out, mask=keep, other=0.0).to(acc_t)
            tl.store(gx0_ptr + out, (dx0 + pre0_a + pre1_b).to(dtype), mask=keep)
            tl.store(gx1_ptr + out, (dx1 + pre1_a + pre0_b).to(dtype), mask=keep)
        tl.debug_barrier()
        tile += n_prog


@triton.jit
def _gt_a(acc, g_ptr, g_ld, a_ptr, a_ld, n_pix, i_idx, i_mask, j_idx, j_mask, BP: tl.constexpr, dtype,
          INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """acc += G[:n_pix, i_idx]^T @ A[:n_pix, j_idx] (row strides g_ld, a_ld), BP pixels a step."""
    p0 = 0
    while p0 < n_pix:
        ps = p0 + tl.arange(0, BP)
        pmask = ps < n_pix
        g = tl.load(g_ptr + ps.to(tl.int64)[:, None] * g_ld + i_idx[None, :], mask=pmask[:, None] & i_mask[None, :],
                    other=0.0)
        a = tl.load(a_ptr + ps.to(tl.int64)[:, None] * a_ld + j_idx[None, :], mask=pmask[:, None] & j_mask[None, :],
                    other=0.0)
        acc = mm(tl.trans(g.to(dtype)), a.to(dtype), acc, INTERPRET, PRECISION)
        p0 += BP
    return acc


@triton.jit
def _gated_gt_value_input(acc, gm_ptr, gate_ptr, s_ptr, o_ptr, vn_ptr, n_pix, i_idx, i_mask, j_idx, j_mask,
                          C: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BP: tl.constexpr,
                          dtype, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """acc += (a gm)^T w over the pixels, w = v_noise + s - o (a: the gate of row i's head)."""
    acc_t = tl.float64 if dtype == tl.float64 else tl.float32
    vn = tl.load(vn_ptr + j_idx, mask=j_mask, other=0.0).to(acc_t)
    p0 = 0
    while p0 < n_pix:
        ps = p0 + tl.arange(0, BP)
        pmask = ps < n_pix
        gmask = pmask[:, None] & i_mask[None, :]
        rows = ps.to(tl.int64)[:, None]
        gm = tl.load(gm_ptr + rows * C + i_idx[None, :], mask=gmask, other=0.0).to(acc_t)
        a = tl.load(gate_ptr + rows * NUM_HEADS + (i_idx // HEAD_DIM)[None, :], mask=gmask, other=0.0).to(acc_t)
        amask = pmask[:, None] & j_mask[None, :]
        s = tl.load(s_ptr + rows * C + j_idx[None, :], mask=amask, other=0.0).to(acc_t)
        o = tl.load(o_ptr + rows * C + j_idx[None, :], mask=amask, other=0.0).to(acc_t)
        w = tl.where(amask, vn[None, :] + s - o, 0.0)
        acc = mm(tl.trans((a * gm).to(dtype)), w.to(dtype), acc, INTERPRET, PRECISION)
        p0 += BP
    return acc


@triton.jit
def weight_grad_kernel(gy0_ptr, gy1_ptr, x0_ptr, x1_ptr, vn_ptr,
                       m_ptr, gq_ptr, u_ptr, g_kd_ptr, gm_ptr, gate_ptr, h_ptr, gz_ptr, g_pre_ptr,
                       flat_ptr, n_pix, n_rows,
                       C: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, LATE: tl.constexpr,
                       BO: tl.constexpr, BP: tl.constexpr, PRECISION: tl.constexpr,
                       INTERPRET: tl.constexpr = False):
    """One (BO x BO) tile of one weight gradient a program, summed over all pixels in order.

    Program axis 1 is the job. LATE = False (after the heads kernel): jobs 0-7 are g_Wo, g_Wq, g_Wk,
    g_Wv of direction 0 then 1. LATE = True (after the relation kernel): job 0 is g_W2, jobs 1 and 2
    the halves of g_W1 that multiply the self and the other. Written into ``flat_ptr`` (the flat
    FusionParams gradient) in its dtype. The pointers a job does not read may be any tensor.
    """
    dtype = x0_ptr.dtype.element_ty
    acc_t = tl.float64 if dtype == tl.float64 else tl.float32
    job = tl.program_id(1)
    tiles_j = tl.cdiv(C, BO)
    i_idx = (tl.program_id(0) // tiles_j) * BO + tl.arange(0, BO)
    j_idx = (tl.program_id(0) % tiles_j) * BO + tl.arange(0, BO)
    i_mask = i_idx < C
    j_mask = j_idx < C
    plane = n_rows.to(tl.int64) * C
    acc = tl.zeros((BO, BO), dtype=acc_t)
    # Each branch stores its own tile: the branches' offsets and row strides differ in kind.
    if LATE:
        if job == 0:
            acc = _gt_a(acc, gz_ptr, C, h_ptr, C, n_pix, i_idx, i_mask, j_idx, j_mask, BP, dtype, INTERPRET,
                        PRECISION)
            acc = _gt_a(acc, gz_ptr + plane, C, h_ptr + plane, C, n_pix, i_idx, i_mask, j_idx, j_mask, BP, dtype,
                        INTERPRET, PRECISION)
            _store_tile(flat_ptr + 2 * C * C + C, acc, i_idx, i_mask, j_idx, j_mask, C)
        else:
            first, second = x0_ptr, x1_ptr  # [s, o] of direction 0 is [x0, x1]; of direction 1, [x1, x0]
            if job == 2:
                first, second = x1_ptr, x0_ptr
            acc = _gt_a(acc, g_pre_ptr, C, first, C, n_pix, i_idx, i_mask, j_idx, j_mask, BP, dtype, INTERPRET,
                        PRECISION)
            acc = _gt_a(acc, g_pre_ptr + plane, C, second, C, n_pix, i_idx, i_mask, j_idx, j_mask, BP, dtype,
                        INTERPRET, PRECISION)
            _store_tile(flat_ptr + (job - 1) * C, acc, i_idx, i_mask, j_idx, j_mask, 2 * C)
    else:
        d = job % 2
        kind = job // 2
        s_ptr, o_ptr, gy_ptr = x0_ptr, x1_ptr, gy0_ptr
        if d == 1:
            s_ptr, o_ptr, gy_ptr = x1_ptr, x0_ptr, gy1_ptr
        in_w = flat_ptr + 3 * C * C + 6 * C + d * (4 * C * C + 4 * C)  # this direction's in_proj_weight
        if kind == 0:
            acc = _gt_a(acc, gy_ptr, C, m_ptr + d * plane, C, n_pix, i_idx, i_mask, j_idx, j_mask, BP, dtype,
                        INTERPRET, PRECISION)
            _store_tile(in_w + 3 * C * C + 3 * C, acc, i_idx, i_mask, j_idx, j_mask, C)  # out_proj_weight
        elif kind == 1:
            acc = _gt_a(acc, gq_ptr + d * plane, C, s_ptr, C, n_pix, i_idx, i_mask, j_idx, j_mask, BP, dtype,
                        INTERPRET, PRECISION)
            _store_tile(in_w, acc, i_idx, i_mask, j_idx, j_mask, C)
        elif kind == 2:
            acc = _gt_a(acc, g_kd_ptr + d * plane, C, u_ptr + d * plane, C, n_pix, i_idx, i_mask, j_idx, j_mask,
                        BP, dtype, INTERPRET, PRECISION)
            _store_tile(in_w + C * C, acc, i_idx, i_mask, j_idx, j_mask, C)
        else:
            acc = _gt_a(acc, gm_ptr + d * plane, C, o_ptr, C, n_pix, i_idx, i_mask, j_idx, j_mask, BP, dtype,
                        INTERPRET, PRECISION)
            acc = _gated_gt_value_input(acc, gm_ptr + d * plane, gate_ptr + d * n_rows.to(tl.int64) * NUM_HEADS,
                                        s_ptr, o_ptr, vn_ptr + d * C, n_pix, i_idx, i_mask, j_idx, j_mask, C,
                                        NUM_HEADS, HEAD_DIM, BP, dtype, INTERPRET, PRECISION)
            _store_tile(in_w + 2 * C * C, acc, i_idx, i_mask, j_idx, j_mask, C)


@triton.jit
def _store_tile(ptr, acc, i_idx, i_mask, j_idx, j_mask, LD):
    tl.store(ptr + i_idx[:, None] * LD + j_idx[None, :], acc.to(ptr.dtype.element_ty),
             mask=i_mask[:, None] & j_mask[None, :])


@triton.jit
def reduce_bias_kernel(partials_ptr, flat_ptr, n_partials, C: tl.constexpr, BLOCK: tl.constexpr):
    """The bias and noise gradients: the sum over p = 0, 1, ... of partials[p] (14 C, compact layout),
    in that order, stored at their places in the flat gradient (the compact index plus the C^2
    weight elements before it)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < _BIAS_WIDTH * C
    acc = tl.load(partials_ptr + offs, mask=mask, other=0.0)
    p = 1
    while p < n_partials:
        acc += tl.load(partials_ptr + p * (_BIAS_WIDTH * C) + offs, mask=mask, other=0.0)
        p += 1
    blocks = tl.where(offs < C, 2, tl.where(offs < 6 * C, 3, tl.where(offs < 9 * C, 6,
                      tl.where(offs < 10 * C, 7, tl.where(offs < 13 * C, 10, 11)))))
    tl.store(flat_ptr + offs + blocks * (C * C), acc.to(flat_ptr.dtype.element_ty), mask=mask)
