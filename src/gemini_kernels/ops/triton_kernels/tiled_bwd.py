"""The tiled backward: input gradients and per-program weight-gradient partials in one persistent launch.

Each program walks tiles of ``BM`` pixels (the persistent grid of the forward) and, per tile and
direction, recomputes the forward rows it needs and runs the chain rule, all as tile products with
weight tiles streamed from L2 and rows in the program's own scratch (float32; barriers between a
stage's writes and the next stage's reads), so that DRAM sees ``x0, x1, dy0, dy1`` read and
``dx0, dx1`` written once. The weight and bias gradients of the tile are added into the program's
own float32 partials (a grid-sized buffer, in the flat FusionParams layout), which a second launch
(``reduce_partials_kernel``) sums over the programs in a fixed order: deterministic, no atomics.

Per direction (self ``s``, other ``o``, output gradient ``gy``), with ``w = v_noise + s - o``:

recompute: ``pre``, ``h = GELU(pre)``, ``z`` and its row statistics, ``u = k_noise + s - s r``,
per head group ``q``, ``key_delta``, the gate ``a``, ``value_delta = w Wv^T`` and ``m = o Wv^T + bv + a value_delta``;

backward::

    gm = gy Wo                      g_Wo += gy^T m,  g_bo += sum gy
    g_a = sum_head gm * value_delta          g_logit = g_a a (1 - a) / sqrt(dh)
    g_q = g_logit key_delta,  g_key_delta = g_logit q,  agm = a gm
    g_s += g_q Wq,  g_u = g_key_delta Wk,  g_o += gm Wv,  g_w = agm Wv: g_s += g_w, g_o -= g_w
    g_Wq += g_q^T s,  g_Wk += g_key_delta^T u,  g_Wv += gm^T o + agm^T w   (and the biases / noises)
    g_s += g_u (1 - r),  g_z = r (g_r - sum(g_r r)) with g_r = -g_u s
    g_h = g_z W2,  g_pre = g_h GELU'(pre):  g_W2 += g_z^T h,  g_W1 += g_pre^T [s, o]
    g_s += g_pre W1a,  g_o += g_pre W1b

and ``dx_self += gy + g_s``, ``dx_other += g_o``, accumulated over both directions in scratch.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import gelu, gelu_grad, mm
from .tiled import _fc1, _group_cols, _key_input, _load_rows, _relation_logits, _rows_times_w, _tile_cols

# Scratch slots of (BM, C) float32 rows per program: pre, h, z, u, w, q, key_delta, value_delta, m, the gates, gm,
# a gm, g_q, g_key_delta, g_u, g_z, g_pre (rewritten per direction), dx0, dx1 (per tile) and the relation
# softmax's row statistics (columns 0 and 1: max, sum of exp), kept there rather than in registers
# across the whole backward.
NUM_SLOTS = 21  # and slot 20: the gates' logit gradients (column j: head j)


@triton.jit
def _slot(scratch_ptr, slot, BM: tl.constexpr, C: tl.constexpr):
    return scratch_ptr + slot * (BM * C)


@triton.jit
def _store_slot(ptr, local, cols, cmask, value, C: tl.constexpr):
    tl.store(ptr + local[:, None] * C + cols[None, :], value, mask=cmask[None, :])


@triton.jit
def _add_slot(ptr, local, cols, cmask, value, C: tl.constexpr):
    offs = ptr + local[:, None] * C + cols[None, :]
    tl.store(offs, tl.load(offs, mask=cmask[None, :], other=0.0) + value, mask=cmask[None, :])


@triton.jit
def _per_head(ptr, local, chans, nmask, HEAD_DIM: tl.constexpr, C: tl.constexpr):
    """Column j of a per-head slot (head j's value), gathered for the channels ``chans``: a load from
    scratch instead of a broadcast through a reshape, which costs registers."""
    return tl.load(ptr + local[:, None] * C + (chans // HEAD_DIM)[None, :], mask=nmask[None, :], other=0.0)


@triton.jit
def _add_weight_grad(part_ptr, part_ld, g_ptr, g_rows, g_mask, a_ptr, a_rows, a_mask, N: tl.constexpr,
                     C: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, dtype,
                     INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """partial[:N, :C] += G[g_rows, :N]^T @ A[a_rows, :C] (rows of stride C), partial of row stride
    part_ld: a weight gradient's share of this tile, in float32 (float64 for float64)."""
    for n0 in range(0, N, BN):
        ns, nmask = _tile_cols(n0, BN, N)
        g = _load_rows(g_ptr, g_rows, g_mask, ns, nmask, C).to(dtype)
        for k0 in range(0, C, BK):
            ks, kmask = _tile_cols(k0, BK, C)
            a = _load_rows(a_ptr, a_rows, a_mask, ks, kmask, C).to(dtype)
            offs = part_ptr + ns[:, None] * part_ld + ks[None, :]
            pmask = nmask[:, None] & kmask[None, :]
            acc = tl.load(offs, mask=pmask, other=0.0)
            acc = mm(tl.trans(g), a, acc, INTERPRET, PRECISION)
            tl.store(offs, acc, mask=pmask)


@triton.jit
def _add_bias_grad(part_ptr, g_ptr, g_rows, g_mask, N: tl.constexpr, C: tl.constexpr, BN: tl.constexpr):
    """partial[:N] += sum over the tile's rows of G[g_rows, :N]."""
    for n0 in range(0, N, BN):
        ns, nmask = _tile_cols(n0, BN, N)
        g = _load_rows(g_ptr, g_rows, g_mask, ns, nmask, C).to(part_ptr.dtype.element_ty)
        offs = part_ptr + ns
        tl.store(offs, tl.load(offs, mask=nmask, other=0.0) + tl.sum(g, axis=0), mask=nmask)


@triton.jit
def _tiled_bwd_direction(s_ptr, o_ptr, gy_ptr, rows, row_mask, local, scratch_ptr, dx_self, dx_other,
                         w1_ptr, b1_ptr, w2_ptr, b2_ptr, kn_ptr, vn_ptr, in_w_ptr, in_b_ptr, out_w_ptr,
                         part_ptr, g_kn_ptr, g_vn_ptr, g_in_w_ptr, g_in_b_ptr, g_out_w_ptr, g_out_b_ptr, scale,
                         C: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HT: tl.constexpr, DL: tl.constexpr,
                         PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    dtype = s_ptr.dtype.element_ty
    acc_t = tl.float64 if dtype == tl.float64 else tl.float32
    all_rows = local < BM
    s_pre = _slot(scratch_ptr, 0, BM, C)
    s_h = _slot(scratch_ptr, 1, BM, C)
    s_z = _slot(scratch_ptr, 2, BM, C)
    s_u = _slot(scratch_ptr, 3, BM, C)
    s_win = _slot(scratch_ptr, 4, BM, C)
    s_q = _slot(scratch_ptr, 5, BM, C)
    s_key_delta = _slot(scratch_ptr, 6, BM, C)
    s_value_delta = _slot(scratch_ptr, 7, BM, C)
    s_m = _slot(scratch_ptr, 8, BM, C)
    s_gate = _slot(scratch_ptr, 9, BM, C)  # column j: the gate of head j
    s_gm = _slot(scratch_ptr, 10, BM, C)
    s_agm = _slot(scratch_ptr, 11, BM, C)
    s_gq = _slot(scratch_ptr, 12, BM, C)
    s_g_key_delta = _slot(scratch_ptr, 13, BM, C)
    s_gu = _slot(scratch_ptr, 14, BM, C)
    s_gz = _slot(scratch_ptr, 15, BM, C)
    s_gpre = _slot(scratch_ptr, 16, BM, C)
    # Partials, in the flat FusionParams layout (offsets of the shared weights; the per-direction
    # ones come as pointers).
    g_w1 = part_ptr
    g_b1 = part_ptr + 2 * C * C
    g_w2 = part_ptr + 2 * C * C + C
    g_b2 = part_ptr + 3 * C * C + C

    # ---- recompute the forward rows ---------------------------------------------------------
    for n0 in range(0, C, BN):
        cols, cmask = _tile_cols(n0, BN, C)
        pre = _fc1(s_ptr, o_ptr, rows, row_mask, w1_ptr, b1_ptr, cols, cmask, C, BM, BK, BN, dtype, INTERPRET,
                   PRECISION)
        _store_slot(s_pre, local, cols, cmask, pre, C)
        _store_slot(s_h, local, cols, cmask, gelu(pre).to(dtype).to(acc_t), C)
        s = _load_rows(s_ptr, rows, row_mask, cols, cmask, C).to(acc_t)
        o = _load_rows(o_ptr, rows, row_mask, cols, cmask, C).to(acc_t)
        vn = tl.load(vn_ptr + cols, mask=cmask, other=0.0).to(acc_t)
        _store_slot(s_win, local, cols, cmask, (vn[None, :] + s - o).to(dtype).to(acc_t), C)
    tl.debug_barrier()
    z_max, z_sum = _relation_logits(s_h, local, all_rows, w2_ptr, b2_ptr, s_z, C, BM, BK, BN, dtype,
                                    INTERPRET, PRECISION)
    s_stats = _slot(scratch_ptr, 19, BM, C)
    tl.store(s_stats + local * C, z_max)
    tl.store(s_stats + local * C + 1, z_sum)
    tl.debug_barrier()
    _key_input(s_z, z_max, z_sum, s_ptr, rows, row_mask, local, kn_ptr, s_u, C, BM, BN, dtype)
    tl.debug_barrier()
    for g in range(0, tl.cdiv(NUM_HEADS, HT)):
        logit = tl.zeros((BM, HT), dtype=acc_t)
        for l0 in range(0, HEAD_DIM, DL):
            chans, nmask = _group_cols(g, l0, HT, DL, NUM_HEADS, HEAD_DIM)
            q = _rows_times_w(s_ptr, rows, row_mask, in_w_ptr, C, chans, nmask, True, C, BM, BK, HT * DL, dtype,
                              INTERPRET, PRECISION)
            q += tl.load(in_b_ptr + chans, mask=nmask, other=0.0).to(acc_t)[None, :]
            key_delta = _rows_times_w(s_u, local, all_rows, in_w_ptr + C * C, C, chans, nmask, True, C, BM, BK,
                                      HT * DL, dtype, INTERPRET, PRECISION)
            _store_slot(s_q, local, chans, nmask, q, C)
            _store_slot(s_key_delta, local, chans, nmask, key_delta, C)
            logit += tl.sum(tl.reshape(q * key_delta, (BM, HT, DL)), axis=2)
        a = tl.sigmoid(logit * scale)
        heads = g * HT + tl.arange(0, HT)
        tl.store(s_gate + local[:, None] * C + heads[None, :], a, mask=(heads < NUM_HEADS)[None, :])
        tl.debug_barrier()
        for l0 in range(0, HEAD_DIM, DL):
            chans, nmask = _group_cols(g, l0, HT, DL, NUM_HEADS, HEAD_DIM)
            a_cols = _per_head(s_gate, local, chans, nmask, HEAD_DIM, C)
            vc = _rows_times_w(o_ptr, rows, row_mask, in_w_ptr + 2 * C * C, C, chans, nmask, True, C, BM, BK,
                               HT * DL, dtype, INTERPRET, PRECISION)
            vc += tl.load(in_b_ptr + 2 * C + chans, mask=nmask, other=0.0).to(acc_t)[None, :]
            value_delta = _rows_times_w(s_win, local, all_rows, in_w_ptr + 2 * C * C, C, chans, nmask, True, C, BM,
                                        BK, HT * DL, dtype, INTERPRET, PRECISION)
            _store_slot(s_value_delta, local, chans, nmask, value_delta, C)
            _store_slot(s_m, local, chans, nmask, (vc + a_cols * value_delta).to(dtype).to(acc_t), C)
    tl.debug_barrier()

    # ---- backward ----------------------------------------------------------------------------
    # gm = gy Wo; the residual; the output projection's gradients.
    for n0 in range(0, C, BN):
        cols, cmask = _tile_cols(n0, BN, C)
        gm = _rows_times_w(gy_ptr, rows, row_mask, out_w_ptr, C, cols, cmask, False, C, BM, BK, BN, dtype,
                           INTERPRET, PRECISION)
        _store_slot(s_gm, local, cols, cmask, gm, C)
        _add_slot(dx_self, local, cols, cmask, _load_rows(gy_ptr, rows, row_mask, cols, cmask, C).to(acc_t), C)
    _add_weight_grad(g_out_w_ptr, C, gy_ptr, rows, row_mask, s_m, local, all_rows, C, C, BM, BN, BK, dtype,
                     INTERPRET, PRECISION)
    _add_bias_grad(g_out_b_ptr, gy_ptr, rows, row_mask, C, C, BN)
    tl.debug_barrier()
    # The gates' backward, per head group.
    for g in range(0, tl.cdiv(NUM_HEADS, HT)):
        heads = g * HT + tl.arange(0, HT)
        a = tl.load(s_gate + local[:, None] * C + heads[None, :], mask=(heads < NUM_HEADS)[None, :], other=0.0)
        g_a = tl.zeros((BM, HT), dtype=acc_t)
        for l0 in range(0, HEAD_DIM, DL):
            chans, nmask = _group_cols(g, l0, HT, DL, NUM_HEADS, HEAD_DIM)
            gm = _load_rows(s_gm, local, all_rows, chans, nmask, C)
            value_delta = _load_rows(s_value_delta, local, all_rows, chans, nmask, C)
            g_a += tl.sum(tl.reshape(gm * value_delta, (BM, HT, DL)), axis=2)
        s_glogit = _slot(scratch_ptr, 20, BM, C)
        tl.store(s_glogit + local[:, None] * C + heads[None, :], g_a * a * (1.0 - a) * scale,
                 mask=(heads < NUM_HEADS)[None, :])
        tl.debug_barrier()
        for l0 in range(0, HEAD_DIM, DL):
            chans, nmask = _group_cols(g, l0, HT, DL, NUM_HEADS, HEAD_DIM)
            gl_cols = _per_head(s_glogit, local, chans, nmask, HEAD_DIM, C)
            a_cols = _per_head(s_gate, local, chans, nmask, HEAD_DIM, C)
            gm = _load_rows(s_gm, local, all_rows, chans, nmask, C)
            _store_slot(s_gq, local, chans, nmask, (gl_cols * _load_rows(s_key_delta, local, all_rows, chans, nmask, C))
                        , C)
            _store_slot(s_g_key_delta, local, chans, nmask, (gl_cols * _load_rows(s_q, local, all_rows, chans, nmask, C))
                        , C)
            _store_slot(s_agm, local, chans, nmask, (a_cols * gm), C)
    tl.debug_barrier()
    # Products back to the inputs, one accumulator at a time: g_s += g_q Wq + g_w, g_u = g_key_delta Wk,
    # g_o += gm Wv - g_w with g_w = agm Wv.
    for n0 in range(0, C, BN):
        cols, cmask = _tile_cols(n0, BN, C)
        g_s = _rows_times_w(s_gq, local, all_rows, in_w_ptr, C, cols, cmask, False, C, BM, BK, BN, dtype,
                            INTERPRET, PRECISION)
        _add_slot(dx_self, local, cols, cmask, g_s, C)
    for n0 in range(0, C, BN):
        cols, cmask = _tile_cols(n0, BN, C)
        g_u = _rows_times_w(s_g_key_delta, local, all_rows, in_w_ptr + C * C, C, cols, cmask, False, C, BM, BK, BN, dtype,
                            INTERPRET, PRECISION)
        _store_slot(s_gu, local, cols, cmask, g_u, C)
    for n0 in range(0, C, BN):
        cols, cmask = _tile_cols(n0, BN, C)
        g_o = _rows_times_w(s_gm, local, all_rows, in_w_ptr + 2 * C * C, C, cols, cmask, False, C, BM, BK, BN,
                            dtype, INTERPRET, PRECISION)
        _add_slot(dx_other, local, cols, cmask, g_o, C)
    tl.debug_barrier()
    for n0 in range(0, C, BN):
        cols, cmask = _tile_cols(n0, BN, C)
        g_w = _rows_times_w(s_agm, local, all_rows, in_w_ptr + 2 * C * C, C, cols, cmask, False, C, BM, BK, BN,
                            dtype, INTERPRET, PRECISION)
        _add_slot(dx_self, local, cols, cmask, g_w, C)
        _add_slot(dx_other, local, cols, cmask, -g_w, C)
        gw_sum = tl.sum(tl.where(row_mask[:, None] & cmask[None, :], g_w, 0.0), axis=0)
        tl.store(g_vn_ptr + cols, tl.load(g_vn_ptr + cols, mask=cmask, other=0.0) + gw_sum, mask=cmask)
    _add_weight_grad(g_in_w_ptr, C, s_gq, local, row_mask, s_ptr, rows, row_mask, C, C, BM, BN, BK, dtype,
                     INTERPRET, PRECISION)
    _add_weight_grad(g_in_w_ptr + C * C, C, s_g_key_delta, local, row_mask, s_u, local, all_rows, C, C, BM, BN, BK, dtype,
                     INTERPRET, PRECISION)
    _add_weight_grad(g_in_w_ptr + 2 * C * C, C, s_gm, local, row_mask, o_ptr, rows, row_mask, C, C, BM, BN, BK,
                     dtype, INTERPRET, PRECISION)
    tl.debug_barrier()  # the same partial again
    _add_weight_grad(g_in_w_ptr + 2 * C * C, C, s_agm, local, row_mask, s_win, local, all_rows, C, C, BM, BN, BK,
                     dtype, INTERPRET, PRECISION)
    _add_bias_grad(g_in_b_ptr, s_gq, local, row_mask, C, C, BN)
    _add_bias_grad(g_in_b_ptr + 2 * C, s_gm, local, row_mask, C, C, BN)
    tl.debug_barrier()
    # The relation softmax: g_s += g_u (1 - r); g_z = r (g_r - sum(g_r r)), g_r = -g_u s.
    z_max = tl.load(s_stats + local * C)
    z_sum = tl.load(s_stats + local * C + 1)
    dot = tl.zeros((BM,), dtype=acc_t)
    for n0 in range(0, C, BN):
        cols, cmask = _tile_cols(n0, BN, C)
        r = tl.exp(_load_rows(s_z, local, all_rows, cols, cmask, C) - z_max[:, None]) / z_sum[:, None]
        g_u = _load_rows(s_gu, local, all_rows, cols, cmask, C)
        s = _load_rows(s_ptr, rows, row_mask, cols, cmask, C).to(acc_t)
        _add_slot(dx_self, local, cols, cmask, g_u - g_u * r, C)
        dot += tl.sum(tl.where(cmask[None, :], -g_u * s * r, 0.0), axis=1)
    _add_bias_grad(g_kn_ptr, s_gu, local, row_mask, C, C, BN)
    for n0 in range(0, C, BN):
        cols, cmask = _tile_cols(n0, BN, C)
        r = tl.exp(_load_rows(s_z, local, all_rows, cols, cmask, C) - z_max[:, None]) / z_sum[:, None]
        g_u = _load_rows(s_gu, local, all_rows, cols, cmask, C)
        s = _load_rows(s_ptr, rows, row_mask, cols, cmask, C).to(acc_t)
        _store_slot(s_gz, local, cols, cmask, (r * (-g_u * s - dot[:, None])), C)
    tl.debug_barrier()
    _add_weight_grad(g_w2, C, s_gz, local, row_mask, s_h, local, all_rows, C, C, BM, BN, BK, dtype,
                     INTERPRET, PRECISION)
    _add_bias_grad(g_b2, s_gz, local, row_mask, C, C, BN)
    # g_pre = (g_z W2) GELU'(pre).
    for n0 in range(0, C, BN):
        cols, cmask = _tile_cols(n0, BN, C)
        g_h = _rows_times_w(s_gz, local, all_rows, w2_ptr, C, cols, cmask, False, C, BM, BK, BN, dtype,
                            INTERPRET, PRECISION)
        pre = _load_rows(s_pre, local, all_rows, cols, cmask, C)
        _store_slot(s_gpre, local, cols, cmask, (g_h * gelu_grad(pre)), C)
    tl.debug_barrier()
    _add_weight_grad(g_w1, 2 * C, s_gpre, local, row_mask, s_ptr, rows, row_mask, C, C, BM, BN, BK, dtype,
                     INTERPRET, PRECISION)
    _add_weight_grad(g_w1 + C, 2 * C, s_gpre, local, row_mask, o_ptr, rows, row_mask, C, C, BM, BN, BK, dtype,
                     INTERPRET, PRECISION)
    _add_bias_grad(g_b1, s_gpre, local, row_mask, C, C, BN)
    for n0 in range(0, C, BN):
        cols, cmask = _tile_cols(n0, BN, C)
        g_s = _rows_times_w(s_gpre, local, all_rows, w1_ptr, 2 * C, cols, cmask, False, C, BM, BK, BN, dtype,
                            INTERPRET, PRECISION)
        _add_slot(dx_self, local, cols, cmask, g_s, C)
    for n0 in range(0, C, BN):
        cols, cmask = _tile_cols(n0, BN, C)
        g_o = _rows_times_w(s_gpre, local, all_rows, w1_ptr + C, 2 * C, cols, cmask, False, C, BM, BK, BN, dtype,
                            INTERPRET, PRECISION)
        _add_slot(dx_other, local, cols, cmask, g_o, C)
    tl.debug_barrier()


@triton.jit
def tiled_bwd_kernel(gy0_ptr, gy1_ptr, x0_ptr, x1_ptr, gx0_ptr, gx1_ptr,
                     w1_ptr, b1_ptr, w2_ptr, b2_ptr, kn_ptr, vn_ptr,
                     in_w0_ptr, in_b0_ptr, out_w0_ptr, out_b0_ptr,
                     in_w1_ptr, in_b1_ptr, out_w1_ptr, out_b1_ptr,
                     scratch_ptr, partials_ptr, n_pix, n_prog, scale,
                     C: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HT: tl.constexpr, DL: tl.constexpr,
                     PRECISION: tl.constexpr, INTERPRET: tl.constexpr = False):
    """Input gradients of the tiles ``pid, pid + P, ...`` and this program's weight-gradient partials.

    ``scratch_ptr``: (P, NUM_SLOTS, BM, C) float32 rows; ``partials_ptr``: (P, 11 C^2 + 14 C) float32,
    zeroed before the launch, in FusionParams order (float64 for float64 inputs).
    """
    pid = tl.program_id(0)
    scratch_ptr += pid.to(tl.int64) * (21 * BM * C)
    part_ptr = partials_ptr + pid.to(tl.int64) * (11 * C * C + 14 * C)
    dx0 = scratch_ptr + 17 * (BM * C)
    dx1 = scratch_ptr + 18 * (BM * C)
    # Offsets of the per-direction gradients in the flat FusionParams layout.
    g_kn = part_ptr + 3 * C * C + 2 * C
    g_vn = part_ptr + 3 * C * C + 4 * C
    g_in_w0 = part_ptr + 3 * C * C + 6 * C
    g_in_b0 = part_ptr + 6 * C * C + 6 * C
    g_out_w0 = part_ptr + 6 * C * C + 9 * C
    g_out_b0 = part_ptr + 7 * C * C + 9 * C
    g_in_w1 = part_ptr + 7 * C * C + 10 * C
    g_in_b1 = part_ptr + 10 * C * C + 10 * C
    g_out_w1 = part_ptr + 10 * C * C + 13 * C
    g_out_b1 = part_ptr + 11 * C * C + 13 * C
    local = tl.arange(0, BM)
    tile = pid
    while tile < tl.cdiv(n_pix, BM):
        rows = tile * BM + local
        row_mask = rows < n_pix
        for n0 in range(0, C, BN):
            cols, cmask = _tile_cols(n0, BN, C)
            zero = tl.zeros((BM, BN), dtype=tl.float64 if x0_ptr.dtype.element_ty == tl.float64 else tl.float32)
            _store_slot(dx0, local, cols, cmask, zero, C)
            _store_slot(dx1, local, cols, cmask, zero, C)
        tl.debug_barrier()
        _tiled_bwd_direction(x0_ptr, x1_ptr, gy0_ptr, rows, row_mask, local, scratch_ptr, dx0, dx1,
                             w1_ptr, b1_ptr, w2_ptr, b2_ptr, kn_ptr, vn_ptr, in_w0_ptr, in_b0_ptr, out_w0_ptr,
                             part_ptr, g_kn, g_vn, g_in_w0, g_in_b0, g_out_w0, g_out_b0, scale,
                             C, NUM_HEADS, HEAD_DIM, BM, BN, BK, HT, DL, PRECISION, INTERPRET)
        _tiled_bwd_direction(x1_ptr, x0_ptr, gy1_ptr, rows, row_mask, local, scratch_ptr, dx1, dx0,
                             w1_ptr, b1_ptr, w2_ptr, b2_ptr, kn_ptr + C, vn_ptr + C, in_w1_ptr, in_b1_ptr,
                             out_w1_ptr, part_ptr, g_kn + C, g_vn + C, g_in_w1, g_in_b1, g_out_w1, g_out_b1, scale,
                             C, NUM_HEADS, HEAD_DIM, BM, BN, BK, HT, DL, PRECISION, INTERPRET)
        for n0 in range(0, C, BN):
            cols, cmask = _tile_cols(n0, BN, C)
            out = rows.to(tl.int64)[:, None] * C + cols[None, :]
            keep = row_mask[:, None] & cmask[None, :]
            tl.store(gx0_ptr + out, _load_rows(dx0, local, local < BM, cols, cmask, C).to(gx0_ptr.dtype.element_ty),
                     mask=keep)
            tl.store(gx1_ptr + out, _load_rows(dx1, local, local < BM, cols, cmask, C).to(gx1_ptr.dtype.element_ty),
                     mask=keep)
        tl.debug_barrier()
        tile += n_prog


@triton.jit
def reduce_partials_kernel(partials_ptr, out_ptr, n_partials, total, BLOCK: tl.constexpr):
    """out[i] = sum over p = 0, 1, ... of partials[p, i], in that order (bitwise reproducible)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    acc = tl.load(partials_ptr + offs, mask=mask, other=0.0)
    p = 1
    while p < n_partials:
        acc += tl.load(partials_ptr + p * total + offs, mask=mask, other=0.0)
        p += 1
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
