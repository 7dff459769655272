"""The tiled forward: the whole module, both directions, for any width, in one persistent launch.

Each program owns a tile of ``BM`` pixels at a time (a persistent grid walks the tiles) and runs the
SPEC §1 chain on it as a sequence of tile products ``(BM, BK) x (BK, BN)``, streaming weight tiles
(from L2) through the K loop. What a product's epilogue produces and a later product reads as its
A operand in another split of the columns (h, z, u, m: rows of C values) goes to the program's own
scratch rows, a grid-sized buffer that stays in L2 and does not grow with the pixel count; a
barrier separates writing a stage and reading it. So at every width DRAM sees x0 and x1 read and y0
and y1 written once, and the registers hold only product tiles, whatever C is.

Per direction (self ``s``, other ``o``), with the identities of SPEC §1:

1. ``h = GELU(s W1a^T + o W1b^T + b1)``                  -> scratch slot 0 (input dtype)
2. ``z = h W2^T + b2``, with the running max and sum of ``exp(z)`` of each row  -> z scratch
3. ``u = k_noise + s - s * softmax(z)``                  -> scratch slot 1
4. per group of heads: ``q = s Wq^T + bq``, ``key_delta = u Wk^T``, the gate ``a = sigmoid(q . key_delta / sqrt(dh))``
   per head, then the attention output ``m`` before Wo      -> scratch slot 0 (h is dead by then)
   - one head per group (head width 9 and up, ``configs.lane_chunk``): the value identity, one product
     ``m = (o + a (v_noise + s - o)) Wv^T + bv``;
   - several narrow heads per group: ``m = o Wv^T + bv + a ((v_noise + s - o) Wv^T)``, two products.
5. ``y = s + m Wo^T + bo``                                   -> DRAM

That is 7 C^2 multiply-adds per pixel and direction with one head per group (8 with narrow heads),
plus the zero columns of the padded head layout when the head width is not a multiple of the lane
chunk. A group's columns are laid out as ``[HT heads, DL lanes]``: column ``n`` is channel
``(g*HT + n // DL) * dh + l0 + n % DL`` of head group ``g`` and lane chunk ``l0``, masked beyond the
head's width, so the per-head sum is a reshape and a sum, for any head width.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import gelu, mm


@triton.jit
def _tile_cols(n0, BN: tl.constexpr, C: tl.constexpr):
    cols = n0 + tl.arange(0, BN)
    return cols, cols < C


@triton.jit
def _load_rows(ptr, rows, row_mask, cols, col_mask, LD: tl.constexpr):
    """Rows ``rows`` x columns ``cols`` of a row-major matrix with row stride LD (0 where masked)."""
    return tl.load(ptr + rows.to(tl.int64)[:, None] * LD + cols[None, :],
                   mask=row_mask[:, None] & col_mask[None, :], other=0.0)


@triton.jit
def _load_wt(w_ptr, k_idx, k_mask, n_idx, n_mask, LD: tl.constexpr):
    """A (K, N) tile of W^T for a row-major weight W with row stride LD: element (k, n) = W[n_idx[n], k_idx[k]]."""
    return tl.load(w_ptr + k_idx[:, None] + n_idx[None, :] * LD, mask=k_mask[:, None] & n_mask[None, :], other=0.0)


@triton.jit
def _rows_times_w(a_ptr, a_rows, a_mask, w_ptr, w_ld, n_idx, n_mask, TRANSPOSED: tl.constexpr,
                  C: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, N: tl.constexpr, dtype,
                  INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """(BM, N) = A[a_rows, :C] @ B[:, n_idx], A rows of stride C (cast to ``dtype`` for the product);
    B = W^T (element (k, n) = W[n, k]) when TRANSPOSED, else W (element (k, n) = W[k, n])."""
    acc_t = tl.float64 if dtype == tl.float64 else tl.float32
    acc = tl.zeros((BM, N), dtype=acc_t)
    for k0 in range(0, C, BK):
        ks, kmask = _tile_cols(k0, BK, C)
        a = _load_rows(a_ptr, a_rows, a_mask, ks, kmask, C).to(dtype)
        if TRANSPOSED:
            b = _load_wt(w_ptr, ks, kmask, n_idx, n_mask, w_ld)
        else:
            b = tl.load(w_ptr + ks[:, None] * w_ld + n_idx[None, :], mask=kmask[:, None] & n_mask[None, :], other=0.0)
        acc = mm(a, b, acc, INTERPRET, PRECISION)
    return acc


@triton.jit
def _group_cols(g, l0, HT: tl.constexpr, DL: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Channels of head group ``g``, lane chunk ``l0`` in the ``[HT, DL]`` layout, and their mask."""
    n = tl.arange(0, HT * DL)
    head = g * HT + n // DL
    lane = l0 + n % DL
    return head * HEAD_DIM + lane, (head < NUM_HEADS) & (lane < HEAD_DIM)


@triton.jit
def _fc1(s_ptr, o_ptr, rows, row_mask, w1_ptr, b1_ptr, cols, cmask, C: tl.constexpr, BM: tl.constexpr,
         BK: tl.constexpr, BN: tl.constexpr, dtype, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """Columns ``cols`` of the relation judger's pre-activation s W1a^T + o W1b^T + b1 (float32)."""
    acc_t = tl.float64 if dtype == tl.float64 else tl.float32
    acc = _rows_times_w(s_ptr, rows, row_mask, w1_ptr, 2 * C, cols, cmask, True, C, BM, BK, BN, dtype,
                        INTERPRET, PRECISION)
    acc += _rows_times_w(o_ptr, rows, row_mask, w1_ptr + C, 2 * C, cols, cmask, True, C, BM, BK, BN, dtype,
                         INTERPRET, PRECISION)
    return acc + tl.load(b1_ptr + cols, mask=cmask, other=0.0).to(acc_t)[None, :]


@triton.jit
def _value_products(s_ptr, o_ptr, rows, row_mask, vn_ptr, wv_ptr, chans, nmask, C: tl.constexpr,
                    BM: tl.constexpr, BK: tl.constexpr, N: tl.constexpr, dtype, INTERPRET: tl.constexpr,
                    PRECISION: tl.constexpr):
    """(o Wv^T, (v_noise + s - o) Wv^T) at the channels ``chans``: the cross value before its bias
    and the value difference, one pass over the K tiles for both."""
    acc_t = tl.float64 if dtype == tl.float64 else tl.float32
    vc = tl.zeros((BM, N), dtype=acc_t)
    value_delta = tl.zeros((BM, N), dtype=acc_t)
    for k0 in range(0, C, BK):
        ks, kmask = _tile_cols(k0, BK, C)
        s = _load_rows(s_ptr, rows, row_mask, ks, kmask, C)
        o = _load_rows(o_ptr, rows, row_mask, ks, kmask, C)
        vn = tl.load(vn_ptr + ks, mask=kmask, other=0.0).to(acc_t)
        w_in = vn[None, :] + s.to(acc_t) - o.to(acc_t)
        wv_t = _load_wt(wv_ptr, ks, kmask, chans, nmask, C)
        vc = mm(o, wv_t, vc, INTERPRET, PRECISION)
        value_delta = mm(w_in.to(dtype), wv_t, value_delta, INTERPRET, PRECISION)
    return vc, value_delta


@triton.jit
def _relation_logits(h_ptr, local, all_rows, w2_ptr, b2_ptr, z_ptr, C: tl.constexpr, BM: tl.constexpr,
                     BK: tl.constexpr, BN: tl.constexpr, dtype, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """z = h W2^T + b2 for the tile's rows of ``h_ptr`` into ``z_ptr`` (both of row stride C), and
    z's softmax statistics per row (running max, sum of exp). z is rounded to the input dtype, as the
    oracle's F.linear output is, before the statistics (the forward and the backward's recompute)."""
    acc_t = tl.float64 if dtype == tl.float64 else tl.float32
    z_max = tl.full((BM,), float("-inf"), dtype=acc_t)
    z_sum = tl.zeros((BM,), dtype=acc_t)
    for n0 in range(0, C, BN):
        cols, cmask = _tile_cols(n0, BN, C)
        acc = _rows_times_w(h_ptr, local, all_rows, w2_ptr, C, cols, cmask, True, C, BM, BK, BN, dtype,
                            INTERPRET, PRECISION)
        b2 = tl.load(b2_ptr + cols, mask=cmask, other=0.0).to(acc_t)
        z = tl.where(cmask[None, :], (acc + b2[None, :]).to(dtype).to(acc_t), float("-inf"))
        tl.store(z_ptr + local[:, None] * C + cols[None, :], z.to(z_ptr.dtype.element_ty), mask=cmask[None, :])
        new_max = tl.maximum(z_max, tl.max(z, axis=1))
        z_sum = z_sum * tl.exp(z_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        z_max = new_max
    return z_max, z_sum


@triton.jit
def _key_input(z_ptr, z_max, z_sum, s_ptr, rows, row_mask, local, kn_ptr, u_ptr, C: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, dtype):
    """u = k_noise + s - s * r with r = softmax(z) from its row statistics, rounded to the input
    dtype as the oracle's is, into ``u_ptr`` (row stride C): the forward and the backward's recompute."""
    acc_t = tl.float64 if dtype == tl.float64 else tl.float32
    all_rows = local < BM
    for n0 in range(0, C, BN):
        cols, cmask = _tile_cols(n0, BN, C)
        z = _load_rows(z_ptr, local, all_rows, cols, cmask, C).to(acc_t)
        r = tl.exp(z - z_max[:, None]) / z_sum[:, None]
        s = _load_rows(s_ptr, rows, row_mask, cols, cmask, C).to(acc_t)
        kn = tl.load(kn_ptr + cols, mask=cmask, other=0.0).to(acc_t)
        u = (kn[None, :] + s - s * r).to(dtype)
        tl.store(u_ptr + local[:, None] * C + cols[None, :], u.to(u_ptr.dtype.element_ty), mask=cmask[None, :])


@triton.jit
def _tiled_direction(s_ptr, o_ptr, y_ptr, rows, row_mask, local, scratch_ptr, z_ptr,
                     w1_ptr, b1_ptr, w2_ptr, b2_ptr, kn_ptr, vn_ptr, in_w_ptr, in_b_ptr, out_w_ptr, out_b_ptr,
                     scale,
                     C: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HT: tl.constexpr, DL: tl.constexpr,
                     PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    dtype = s_ptr.dtype.element_ty
    acc_t = tl.float64 if dtype == tl.float64 else tl.float32
    all_rows = local < BM  # scratch rows always exist
    h_slot = scratch_ptr  # slot 0: h, later m
    u_slot = scratch_ptr + BM * C  # slot 1: u

    # 1. h = GELU(fc1([s, o])), BN hidden units at a time.
    for n0 in range(0, C, BN):
        cols, cmask = _tile_cols(n0, BN, C)
        h = gelu(_fc1(s_ptr, o_ptr, rows, row_mask, w1_ptr, b1_ptr, cols, cmask, C, BM, BK, BN, dtype, INTERPRET,
                      PRECISION))
        tl.store(h_slot + local[:, None] * C + cols[None, :], h.to(dtype), mask=cmask[None, :])
    tl.debug_barrier()

    # 2. z = h W2^T + b2 and its softmax statistics per row (running max, sum of exp).
    z_max, z_sum = _relation_logits(h_slot, local, all_rows, w2_ptr, b2_ptr, z_ptr, C, BM, BK, BN, dtype,
                                    INTERPRET, PRECISION)
    tl.debug_barrier()

    # 3. The key input u = k_noise + s - s * r (the key bias cancels out of the two-key softmax).
    _key_input(z_ptr, z_max, z_sum, s_ptr, rows, row_mask, local, kn_ptr, u_slot, C, BM, BN, dtype)
    tl.debug_barrier()

    # 4. Per head group: the gates, then the attention output m (into slot 0; h is dead).
    for g in range(0, tl.cdiv(NUM_HEADS, HT)):
        logit = tl.zeros((BM, HT), dtype=acc_t)
        for l0 in range(0, HEAD_DIM, DL):
            chans, nmask = _group_cols(g, l0, HT, DL, NUM_HEADS, HEAD_DIM)
            q = _rows_times_w(s_ptr, rows, row_mask, in_w_ptr, C, chans, nmask, True, C, BM, BK, HT * DL, dtype,
                              INTERPRET, PRECISION)
            key_delta = _rows_times_w(u_slot, local, all_rows, in_w_ptr + C * C, C, chans, nmask, True, C, BM, BK,
                                      HT * DL, dtype, INTERPRET, PRECISION)
            bq = tl.load(in_b_ptr + chans, mask=nmask, other=0.0).to(acc_t)
            qk = (q + bq[None, :]) * key_delta  # zero in masked columns: their weights load as 0
            logit += tl.sum(tl.reshape(qk, (BM, HT, DL)), axis=2)
        a = tl.sigmoid(logit * scale)
        for l0 in range(0, HEAD_DIM, DL):
            chans, nmask = _group_cols(g, l0, HT, DL, NUM_HEADS, HEAD_DIM)
            bv = tl.load(in_b_ptr + 2 * C + chans, mask=nmask, other=0.0).to(acc_t)
            if HT == 1:
                # The value identity: one product with the head's own input o + a (v_noise + s - o).
                m = tl.zeros((BM, DL), dtype=acc_t)
                for k0 in range(0, C, BK):
                    ks, kmask = _tile_cols(k0, BK, C)
                    s = _load_rows(s_ptr, rows, row_mask, ks, kmask, C).to(acc_t)
                    o = _load_rows(o_ptr, rows, row_mask, ks, kmask, C).to(acc_t)
                    vn = tl.load(vn_ptr + ks, mask=kmask, other=0.0).to(acc_t)
                    v_in = o + a * (vn[None, :] + s - o)
                    m = mm(v_in.to(dtype), _load_wt(in_w_ptr + 2 * C * C, ks, kmask, chans, nmask, C), m,
                           INTERPRET, PRECISION)
                m += bv[None, :]
            else:
                vc, value_delta = _value_products(s_ptr, o_ptr, rows, row_mask, vn_ptr, in_w_ptr + 2 * C * C, chans,
                                                  nmask, C, BM, BK, HT * DL, dtype, INTERPRET, PRECISION)
                a_cols = tl.reshape(tl.broadcast_to(a[:, :, None], (BM, HT, DL)), (BM, HT * DL))
                m = vc + bv[None, :] + a_cols * value_delta
            tl.store(h_slot + local[:, None] * C + chans[None, :], m.to(dtype), mask=nmask[None, :])
    tl.debug_barrier()

    # 5. y = s + m Wo^T + bo.
    for n0 in range(0, C, BN):
        cols, cmask = _tile_cols(n0, BN, C)
        acc = _rows_times_w(h_slot, local, all_rows, out_w_ptr, C, cols, cmask, True, C, BM, BK, BN, dtype,
                            INTERPRET, PRECISION)
        bo = tl.load(out_b_ptr + cols, mask=cmask, other=0.0).to(acc_t)
        out = (acc + bo[None, :]).to(dtype).to(acc_t)  # rounded as the oracle's F.linear output is
        s = _load_rows(s_ptr, rows, row_mask, cols, cmask, C).to(acc_t)
        tl.store(y_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], (s + out).to(dtype),
                 mask=row_mask[:, None] & cmask[None, :])
    tl.debug_barrier()  # the next direction reuses the scratch


@triton.jit
def tiled_fwd_kernel(x0_ptr, x1_ptr, y0_ptr, y1_ptr,
                     w1_ptr, b1_ptr, w2_ptr, b2_ptr, kn_ptr, vn_ptr,
                     in_w0_ptr, in_b0_ptr, out_w0_ptr, out_b0_ptr,
                     in_w1_ptr, in_b1_ptr, out_w1_ptr, out_b1_ptr,
                     scratch_ptr, z_ptr, n_pix, n_prog, scale,
                     C: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HT: tl.constexpr, DL: tl.constexpr,
                     PRECISION: tl.constexpr, INTERPRET: tl.constexpr = False):
    """Both directions for the tiles ``pid, pid + P, ...`` of BM pixels (P programs).

    ``scratch_ptr``: (P, 2, BM, C) and ``z_ptr``: (P, BM, C), in the input dtype: the program's own
    rows, rewritten for every tile and direction.
    ``n_prog`` is the grid size (an argument; a while loop, because the interpreter cannot take a program id as a range bound).
    """
    pid = tl.program_id(0)
    scratch_ptr += pid.to(tl.int64) * (2 * BM * C)
    z_ptr += pid.to(tl.int64) * (BM * C)
    local = tl.arange(0, BM)
    tile = pid
    while tile < tl.cdiv(n_pix, BM):
        rows = tile * BM + local
        row_mask = rows < n_pix
        _tiled_direction(x0_ptr, x1_ptr, y0_ptr, rows, row_mask, local, scratch_ptr, z_ptr,
                         w1_ptr, b1_ptr, w2_ptr, b2_ptr, kn_ptr, vn_ptr, in_w0_ptr, in_b0_ptr, out_w0_ptr,
                         out_b0_ptr, scale, C, NUM_HEADS, HEAD_DIM, BM, BN, BK, HT, DL, PRECISION, INTERPRET)
        _tiled_direction(x1_ptr, x0_ptr, y1_ptr, rows, row_mask, local, scratch_ptr, z_ptr,
                         w1_ptr, b1_ptr, w2_ptr, b2_ptr, kn_ptr + C, vn_ptr + C, in_w1_ptr, in_b1_ptr, out_w1_ptr,
                         out_b1_ptr, scale, C, NUM_HEADS, HEAD_DIM, BM, BN, BK, HT, DL, PRECISION, INTERPRET)
        tile += n_prog
