"""The configuration table: which forward path and which launch settings every width and dtype gets.

The launchers and the sm_90a compile check (``gemini_kernels.ops.sm90_check``) both read these
functions, so what is checked is what runs. Every choice below was checked by compiling for sm_90a
on CPU (0 spills; the register counts are in the compile check's table).

Forward paths, per layer:

* ``narrow`` (``narrow.py``): 16-bit, power-of-two C from 16 to ``NARROW_MAX_WIDTH``; every row in
  registers, one launch.
* ``tiled`` (``tiled.py``): every other width in 16-bit dtypes, and float32 when TF32 is allowed;
  one persistent launch streaming weight tiles, row intermediates in per-program scratch.
* ``split`` (``launch.py``): float32 with IEEE products and float64: cuBLAS GEMMs with the per-pixel
  math in row kernels (``rows.py``). Triton runs IEEE float32 / float64 products on FMA units with
  operand tiles in registers, and those spill in the tiled kernel at some widths; these dtypes are
  for accuracy (float64: gradcheck), not speed.

Backward paths (``backward_path``): ``tiled`` (``tiled_bwd.py``) for 16-bit layers up to
``TILED_BWD_MAX_WIDTH``, ``wide`` (``wide_bwd.py``) for wider 16-bit layers whose heads fit one
product tile (``wide_bwd_config``), ``split`` elsewhere; the launcher also runs ``split`` where the
tiled one's grid would be starved at the call's pixel count (``launch.TILED_BWD_MIN_PROGRAMS``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from . import narrow, rows, tiled, tiled_bwd, wide_bwd

# A 64-pixel tile of rows in registers spills from C = 128 on (sm_90a, 4 warps).
NARROW_MAX_WIDTH = 64
# SMs of the device the counts and the CPU compile check assume (H100 SXM / H200).
DEFAULT_SMS = 132
# Parameter-gradient elements per program of the partials' reduction.
REDUCE_BLOCK = 1024

KERNELS = {
    "gelu_fwd": rows._gelu_fwd_kernel, "gelu_bwd": rows._gelu_bwd_kernel,
    "relation_fwd": rows._relation_fwd_kernel, "relation_bwd": rows._relation_bwd_kernel,
    "gate_fwd": rows._gate_fwd_kernel, "gate_bwd": rows._gate_bwd_kernel,
    "narrow_fwd": narrow.narrow_fwd_kernel, "tiled_fwd": tiled.tiled_fwd_kernel,
    "tiled_bwd": tiled_bwd.tiled_bwd_kernel, "reduce_partials": tiled_bwd.reduce_partials_kernel,
    "wide_bwd_heads": wide_bwd.wide_bwd_heads_kernel, "wide_bwd_relation": wide_bwd.wide_bwd_relation_kernel,
    "weight_grad": wide_bwd.weight_grad_kernel, "reduce_bias": wide_bwd.reduce_bias_kernel,
}


def _tile_pixels(n: int, block: int) -> int:
    return triton.cdiv(n, block) * block


def _narrow_flops(a: dict) -> int:
    """Per pixel and direction: judger 3 C^2, q and key 1 each, values 2, out 1, and the per-head sums
    as two products with the same-head matrix (2 C x CHUNK), on whole 64-pixel tiles."""
    c, chunk = a["C"], a["CHUNK"]
    macs = 8 * c * c + 2 * c * chunk
    return 2 * 2 * macs * _tile_pixels(a["n_pix"], a["BLOCK_M"])


def _tiled_flops(a: dict) -> int:
    """Per pixel and direction on the padded tiles: judger 3 C^2, q and key 1 each over the padded
    head columns, values 1 (the value identity) or 2, out 1."""
    bn, bk, ht, dl = a["BN"], a["BK"], a["HT"], a["DL"]
    cn, ck = triton.cdiv(a["C"], bn) * bn, triton.cdiv(a["C"], bk) * bk
    heads = triton.cdiv(a["NUM_HEADS"], ht) * triton.cdiv(a["HEAD_DIM"], dl) * ht * dl
    macs = 3 * cn * ck + (2 + (1 if ht == 1 else 2)) * heads * ck + cn * ck
    return 2 * 2 * macs * _tile_pixels(a["n_pix"], a["BM"])


def _tiled_bwd_flops(a: dict) -> int:
    """Per pixel and direction on the padded tiles: the recomputed forward (judger 3 C^2; q, key and
    the two value products over the padded head columns) and the backward's 16 C^2 (gm, four
    products back to the inputs through q, key and values, two through the judger's fc2 and fc1
    halves... : 7 input-gradient and 9 weight-gradient products)."""
    bn, bk, ht, dl = a["BN"], a["BK"], a["HT"], a["DL"]
    cn, ck = triton.cdiv(a["C"], bn) * bn, triton.cdiv(a["C"], bk) * bk
    heads = triton.cdiv(a["NUM_HEADS"], ht) * triton.cdiv(a["HEAD_DIM"], dl) * ht * dl
    macs = 3 * cn * ck + 4 * heads * ck + 16 * cn * ck
    return 2 * 2 * macs * _tile_pixels(a["n_pix"], a["BM"])


def _wide_heads_flops(a: dict) -> int:
    """Per pixel and direction on the padded tiles: the recomputed judger (3 C^2), q, key, the two
    value products and gm over the padded head columns, and the three products back (g_q Wq, gm Wv,
    (a gm) Wv)."""
    bn, bk, ht, dl = a["BN"], a["BK"], a["HT"], a["DL"]
    cn, ck = triton.cdiv(a["C"], bn) * bn, triton.cdiv(a["C"], bk) * bk
    heads = triton.cdiv(a["NUM_HEADS"], ht) * ht * dl
    macs = 6 * cn * ck + 5 * heads * ck
    return 2 * 2 * macs * _tile_pixels(a["n_pix"], a["BM"])


def _wide_relation_flops(a: dict) -> int:
    """Per pixel and direction: the recomputed judger (3 C^2), g_u, g_h and the two products through
    fc1's halves."""
    cn, ck = triton.cdiv(a["C"], a["BN"]) * a["BN"], triton.cdiv(a["C"], a["BK"]) * a["BK"]
    return 2 * 2 * 7 * cn * ck * _tile_pixels(a["n_pix"], a["BM"])


def _weight_grad_flops(a: dict) -> int:
    """C x C products over all pixels: g_Wo, g_Wq, g_Wk and g_Wv's two, per direction (early); g_W2
    and g_W1's two halves over both directions (late)."""
    side = triton.cdiv(a["C"], a["BO"]) * a["BO"]
    products = 6 if a["LATE"] else 10
    return 2 * products * side * side * _tile_pixels(a["n_pix"], a["BP"])


def _grid_buffers(*names):
    """(bytes of the named per-program buffers, tiles the grid walks): what a persistent kernel
    rereads and rewrites for every tile it walks."""
    def per_tile(a: dict):
        buffers = sum(a[k].numel() * a[k].element_size() for k in names)
        return buffers, triton.cdiv(a["n_pix"], a["BM"]), a["n_prog"]
    return per_tile


class LaunchSpec(NamedTuple):
    """What the launch ledger (gemini_kernels.ledger) needs of a kernel: the pointer arguments it
    writes (the others it reads), its matrix-product FLOPs from its bound arguments (row kernels:
    none), and for a persistent kernel its per-program buffers, which every tile rereads and
    rewrites (DRAM traffic unless they fit in L2)."""
    writes: tuple
    flops: object = None
    grid_buffers: object = None


LAUNCH_SPECS = {
    "gelu_fwd": LaunchSpec(("h_ptr",)), "gelu_bwd": LaunchSpec(("gpre_ptr",)),
    "relation_fwd": LaunchSpec(("u_ptr", "w_ptr")), "relation_bwd": LaunchSpec(("gz_ptr", "gs_ptr")),
    "gate_fwd": LaunchSpec(("m_ptr",)), "gate_bwd": LaunchSpec(("gq_ptr", "g_key_delta_ptr", "g_value_delta_ptr")),
    "narrow_fwd": LaunchSpec(("y0_ptr", "y1_ptr"), _narrow_flops),
    "tiled_fwd": LaunchSpec(("y0_ptr", "y1_ptr", "scratch_ptr", "z_ptr"), _tiled_flops,
                            _grid_buffers("scratch_ptr", "z_ptr")),
    "tiled_bwd": LaunchSpec(("gx0_ptr", "gx1_ptr", "scratch_ptr", "partials_ptr"), _tiled_bwd_flops,
                            _grid_buffers("scratch_ptr", "partials_ptr")),
    "reduce_partials": LaunchSpec(("out_ptr",)),
    "wide_bwd_heads": LaunchSpec(("gx0_ptr", "gx1_ptr", "u_ptr", "m_ptr", "gq_ptr", "g_kd_ptr", "gm_ptr", "gate_ptr",
                                  "scratch_ptr", "partials_ptr"), _wide_heads_flops,
                                 _grid_buffers("scratch_ptr", "partials_ptr")),
    "wide_bwd_relation": LaunchSpec(("gx0_ptr", "gx1_ptr", "h_ptr", "gz_ptr", "g_pre_ptr", "scratch_ptr",
                                     "partials_ptr"), _wide_relation_flops,
                                    _grid_buffers("scratch_ptr", "partials_ptr")),
    "weight_grad": LaunchSpec(("flat_ptr",), _weight_grad_flops),
    "reduce_bias": LaunchSpec(("flat_ptr",)),
}


class RowConfig(NamedTuple):
    """Rows per program and warps of a row kernel whose rows are ``width`` (padded) lanes wide."""
    block_m: int
    num_warps: int


class NarrowConfig(NamedTuple):
    block_m: int
    chunk: int  # output channels of the attention per step (whole heads)
    num_warps: int
    num_stages: int


class TiledConfig(NamedTuple):
    block_m: int  # pixels per tile (one warpgroup's 64 rows, or fewer)
    block_n: int  # output columns per product
    block_k: int  # reduction step
    heads_per_group: int  # HT: heads whose gates one product tile covers
    lane_chunk: int  # DL: lanes of each head per product tile
    num_warps: int
    num_stages: int
    ctas_per_sm: int  # the persistent grid: SMs x this many programs
    precision: str  # tl.dot input precision of float32 operands

    @property
    def value_identity(self) -> bool:
        """One value product per head (SPEC §1) when a product tile holds a single head."""
        return self.heads_per_group == 1


def _row_config(width: int) -> RowConfig:
    # ~2048 elements per program keeps the 4-6 live tiles of the widest row kernel within the
    # register file with no spills, even at one row of 2048 lanes (dim 1536). From 256 lanes on, 8
    # warps: float32 relation_bwd at (8 rows, 256 lanes, 4 warps) spills on sm_90a.
    return RowConfig(block_m=max(1, min(64, 2048 // width)), num_warps=4 if width < 256 else 8)


def head_layout(dim: int, num_heads: int):
    """(H_PAD, DH_PAD): the padded head layout of a width-``dim`` row (row kernels)."""
    return triton.next_power_of_2(num_heads), triton.next_power_of_2(dim // num_heads)


def split_configs(dim: int, num_heads: int):
    """The row-kernel configurations of the split path and of the backward, keyed by kernel family."""
    h_pad, dh_pad = head_layout(dim, num_heads)
    return {"row": _row_config(triton.next_power_of_2(dim)), "head": _row_config(h_pad * dh_pad)}


def narrow_config(dim: int, num_heads: int, dtype: torch.dtype) -> Optional[NarrowConfig]:
    """The narrow forward's configuration, or None where it does not run.

    4 warps, one warpgroup on the 64-row tile: with 8, one of the MMA layouts put two warpgroups on
    the same 64 rows (``warpsPerCTA=[8, 1]``, 16-row instructions), computing everything twice.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    if not (16 <= dim <= NARROW_MAX_WIDTH and dim & (dim - 1) == 0 and num_heads & (num_heads - 1) == 0):
        return None
    return NarrowConfig(block_m=64, chunk=min(dim, 64), num_warps=4, num_stages=1)


def lane_chunk(head_dim: int, max_lanes: int):
    """(DL, HT): lanes per head and heads per product tile of the tiled kernel's head groups.

    A product tile is at least 16 columns wide (tl.dot's minimum): heads narrower than 16 are
    grouped, HT of them, each padded to a power of two. Wider heads are walked in chunks of DL lanes,
    the power of two from 16 to ``max_lanes`` that pads the head least (ties: the wider chunk), so
    head widths 40 and 80 cost 48 and 80 columns, not 64 and 128.
    """
    if head_dim < 16:
        dl = triton.next_power_of_2(head_dim)
        return dl, 16 // dl
    candidates = [d for d in (16, 32, 64) if d <= max_lanes]
    dl = min(candidates, key=lambda d: (triton.cdiv(head_dim, d) * d, -d))
    return dl, 1


def tiled_config(dim: int, num_heads: int, dtype: torch.dtype,
                 allow_tf32: Optional[bool] = None) -> Optional[TiledConfig]:
    """The tiled forward's configuration, or None where the split path runs instead.

    ``allow_tf32`` defaults to ``torch.backends.cuda.matmul.allow_tf32`` (what cuBLAS would do with
    the oracle's float32 products).
    """
    if allow_tf32 is None:
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    head_dim = dim // num_heads
    if dtype in (torch.bfloat16, torch.float16):
        dl, ht = lane_chunk(head_dim, 64)
        return TiledConfig(block_m=64, block_n=_block(dim, 64), block_k=_block(dim, 32), heads_per_group=ht,
                           lane_chunk=dl, num_warps=4, num_stages=2, ctas_per_sm=2, precision="ieee")
    if dtype == torch.float32 and allow_tf32:
        dl, ht = lane_chunk(head_dim, 32)
        return TiledConfig(block_m=64, block_n=_block(dim, 32), block_k=16, heads_per_group=ht,
                           lane_chunk=dl, num_warps=4, num_stages=1, ctas_per_sm=2, precision="tf32")
    return None


def _block(dim: int, most: int) -> int:
    return max(16, min(most, triton.next_power_of_2(dim)))


def forward_path(dim: int, num_heads: int, dtype: torch.dtype, allow_tf32: Optional[bool] = None) -> str:
    """``"narrow"``, ``"tiled"`` or ``"split"``: the forward a layer of this shape and dtype runs."""
    if narrow_config(dim, num_heads, dtype) is not None:
        return "narrow"
    if tiled_config(dim, num_heads, dtype, allow_tf32) is not None:
        return "tiled"
    return "split"


# The widest layer the tiled backward serves. Beyond it the per-program weight-gradient partials
# (11 C^2 floats) that must stay in L2 leave too few programs for any real batch (15 at C = 192, 6 at
# 320, 2 at 512): wider layers run the wide backward. (The tiled backward also spills 16-232 bytes
# on sm_90a at C = 160 and from 768 on.)
TILED_BWD_MAX_WIDTH = 128


def _bwd_block(dim: int) -> int:
    # 32-wide product tiles spill 72 to 120 bytes at C = 96 and 128 (sm_90a, 8 warps); 64-wide ones
    # compile clean there (234 / 255 registers).
    return 64 if 64 < dim <= 128 else _block(dim, 32)


def tiled_bwd_config(dim: int, num_heads: int, dtype: torch.dtype) -> Optional[TiledConfig]:
    """The tiled backward's configuration (16-bit dtypes up to ``TILED_BWD_MAX_WIDTH``), or None.

    Two warpgroups on the 64-pixel tile from C = 64 on (the second takes the other half of each
    product's columns): the backward's chain holds more rows live than the forward's. Narrower
    layers have product tiles too narrow to split between two warpgroups (they would compute the
    same rows): one warpgroup there. One CTA per SM (255 registers x 256 threads).
    """
    if dtype not in (torch.bfloat16, torch.float16) or dim > TILED_BWD_MAX_WIDTH:
        return None
    dl, ht = lane_chunk(dim // num_heads, 32)
    block = _bwd_block(dim)
    return TiledConfig(block_m=64, block_n=block, block_k=block, heads_per_group=ht,
                       lane_chunk=dl, num_warps=8 if dim >= 64 else 4, num_stages=1, ctas_per_sm=1,
                       precision="ieee")


class WideConfig(NamedTuple):
    """The wide backward's settings: its two row-tile kernels' (as TiledConfig's) and the weight
    gradients' output tiles (``weight_block`` square) and pixels per step (``weight_pixels``)."""
    block_m: int
    block_n: int
    block_k: int
    heads_per_group: int
    lane_chunk: int  # lanes per head: the whole head (one chunk), padded to a power of two
    num_warps: int
    ctas_per_sm: int
    precision: str
    weight_block: int
    weight_pixels: int
    weight_warps: int

    def row_constexprs(self, dim: int, num_heads: int) -> dict:
        return dict(C=dim, NUM_HEADS=num_heads, HEAD_DIM=dim // num_heads, BM=self.block_m, BN=self.block_n,
                    BK=self.block_k, HT=self.heads_per_group, DL=self.lane_chunk, PRECISION=self.precision)

    def weight_constexprs(self, dim: int, num_heads: int, late: bool) -> dict:
        return dict(C=dim, NUM_HEADS=num_heads, HEAD_DIM=dim // num_heads, LATE=late, BO=self.weight_block,
                    BP=self.weight_pixels, PRECISION=self.precision)


def wide_head_group(head_dim: int):
    """(DL, HT) of the wide backward: a head group is one product tile holding whole heads (its
    gates' backward needs every lane of a head at once), at least 16 columns (tl.dot's minimum)."""
    dl = triton.next_power_of_2(head_dim)
    return dl, max(1, 16 // dl)


# The wide backward keeps a head group's q, key_delta, value_delta and gm tiles in registers:
# heads wider than this run the split backward.
WIDE_MAX_HEAD_LANES = 64


def wide_bwd_config(dim: int, num_heads: int, dtype: torch.dtype, any_width: bool = False) -> Optional[WideConfig]:
    """The wide backward's configuration (16-bit dtypes wider than ``TILED_BWD_MAX_WIDTH``, heads of at
    most 64 lanes), or None. ``any_width``: also narrower layers, for a forced wide backward
    (``GK_TRITON_BACKWARD=wide``: the GPU check times it at stage 2 beside the tiled one).

    Two warpgroups on the 64-pixel tile (each takes half of a product's columns; with one, the heads
    kernel spills 144-248 bytes on sm_90a at C = 40 ... 256).
    """
    if dtype not in (torch.bfloat16, torch.float16) or (dim <= TILED_BWD_MAX_WIDTH and not any_width):
        return None
    dl, ht = wide_head_group(dim // num_heads)
    if dl > WIDE_MAX_HEAD_LANES:
        return None
    return WideConfig(block_m=64, block_n=_block(dim, 64), block_k=_block(dim, 32), heads_per_group=ht,
                      lane_chunk=dl, num_warps=8, ctas_per_sm=1, precision="ieee",
                      weight_block=64, weight_pixels=32, weight_warps=4)


def backward_path(dim: int, num_heads: int, dtype: torch.dtype) -> str:
    """``"tiled"``, ``"wide"`` or ``"split"``: the backward a layer of this shape and dtype runs where
    the tiled one's grid is not starved (``launch.backward_rows`` moves starved layers to ``"wide"``)."""
    if tiled_bwd_config(dim, num_heads, dtype) is not None:
        return "tiled"
    return "wide" if wide_bwd_config(dim, num_heads, dtype) is not None else "split"


def acc_type(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# Representative widths: every MiT stage width (32, 64, 128, 160, 256, 320, 512), the smallest the
# API takes with 4 heads (12), head width 2 (16), odd head widths (24 -> 3, 40 -> 5, 96 -> 12,
# 320 -> 40) and every Swin width (96, 192, 384, 768, 1536: head width up to 192).
CHECKED_WIDTHS = (12, 16, 24, 32, 40, 64, 96, 128, 160, 192, 256, 320, 384, 512, 768, 1536)
CHECKED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _heads_for(dim: int) -> int:
    return 4 if dim == 12 else 8


def config_table(dims: Sequence[int] = CHECKED_WIDTHS, dtypes: Sequence[torch.dtype] = CHECKED_DTYPES):
    """Every distinct (kernel, constexprs, launch options) the launchers pick for these widths and
    dtypes (float32 both with and without TF32): what the sm_90a compile check enumerates."""
    seen = {}
    for dtype in dtypes:
        for dim in dims:
            num_heads = _heads_for(dim)
            h_pad, dh_pad = head_layout(dim, num_heads)
            block_c = triton.next_power_of_2(dim)
            cfgs = split_configs(dim, num_heads)
            row, head = cfgs["row"], cfgs["head"]
            entries = []
            # The split path's row kernels: where a forward or backward is split, or may become split
            # (a tiled backward whose grid a small batch starves: launch.TILED_BWD_MIN_PROGRAMS).
            if "split" in {forward_path(dim, num_heads, dtype, tf32) for tf32 in (False, True)} or \
                    backward_path(dim, num_heads, dtype) in ("split", "tiled"):
                entries += [
                    (name, dict(BLOCK_M=row.block_m, BLOCK_C=block_c), row.num_warps, 1)
                    for name in ("gelu_fwd", "gelu_bwd", "relation_fwd", "relation_bwd")
                ] + [
                    (name, dict(BLOCK_M=head.block_m, H_PAD=h_pad, DH_PAD=dh_pad), head.num_warps, 1)
                    for name in ("gate_fwd", "gate_bwd")
                ]
            nar = narrow_config(dim, num_heads, dtype)
            if nar is not None:
                entries.append(("narrow_fwd", dict(C=dim, HEAD_DIM=dim // num_heads, BLOCK_M=nar.block_m,
                                                   CHUNK=nar.chunk), nar.num_warps, nar.num_stages))
            for tf32 in ((False, True) if dtype == torch.float32 else (False,)):
                til = tiled_config(dim, num_heads, dtype, allow_tf32=tf32)
                if til is not None and nar is None:
                    entries.append(("tiled_fwd", tiled_constexprs(dim, num_heads, til),
                                    til.num_warps, til.num_stages))
            bwd = tiled_bwd_config(dim, num_heads, dtype)
            if bwd is not None:
                entries.append(("tiled_bwd", tiled_constexprs(dim, num_heads, bwd), bwd.num_warps, bwd.num_stages))
                entries.append(("reduce_partials", dict(BLOCK=REDUCE_BLOCK), 4, 1))
            wide = wide_bwd_config(dim, num_heads, dtype)
            if wide is not None:
                rows_cx = wide.row_constexprs(dim, num_heads)
                entries.append(("wide_bwd_heads", rows_cx, wide.num_warps, 1))
                entries.append(("wide_bwd_relation", {k: rows_cx[k] for k in ("C", "BM", "BN", "BK", "PRECISION")},
                                wide.num_warps, 1))
                for late in (False, True):
                    entries.append(("weight_grad", wide.weight_constexprs(dim, num_heads, late), wide.weight_warps, 1))
                entries.append(("reduce_bias", dict(C=dim, BLOCK=REDUCE_BLOCK), 4, 1))
            # Triton also specialises integer arguments divisible by 16: a distinct compilation.
            aligned = (dim % 16 == 0, (dim // num_heads) % 16 == 0)
            for name, constexprs, num_warps, num_stages in entries:
                key = (name, dtype, tuple(sorted(constexprs.items())), num_warps, num_stages, aligned)
                seen.setdefault(key, dict(kernel=name, dtype=dtype, dim=dim, num_heads=num_heads,
                                          constexprs=constexprs, num_warps=num_warps, num_stages=num_stages))
    return list(seen.values())


def tiled_constexprs(dim: int, num_heads: int, cfg: TiledConfig) -> dict:
    return dict(C=dim, NUM_HEADS=num_heads, HEAD_DIM=dim // num_heads, BM=cfg.block_m, BN=cfg.block_n,
                BK=cfg.block_k, HT=cfg.heads_per_group, DL=cfg.lane_chunk, PRECISION=cfg.precision)
