"""The Triton backend against the float64 oracle: outputs and every gradient, every forward and
backward path (gradcheck of each), odd widths and head widths, leading dimensions, the configuration
table, the custom op's argument checks. On CPU the kernels run under TRITON_INTERPRET=1 (conftest.py),
so the CPU shapes are tiny; the GPU tests (marked) run the NYUDv2 stage shapes. What every fused
backend promises (its declared bounds in every dtype, bitwise reruns, gradcheck, outputs that take
in-place ops, non-contiguous inputs, autocast, torch.compile, opcheck of its ops, refused second
derivatives and forward-mode AD) is in tests/test_backend_contract.py."""
import pytest
import torch

import gemini_kernels as gk
from gemini_kernels import FusionParams, GeminiFusion, gemini_fusion
from gemini_kernels.shapes import stage_dims
from helpers import GRAD_NAMES, assert_matches_oracle, make_case, oracle_float64, rel_err, upstream_grads

pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_REASON = gk.backends.BACKENDS["triton"].unavailable_reason(DEVICE)
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"the triton backend cannot run here: {_REASON}")

if _REASON is None:
    from gemini_kernels.ops import triton_fusion as tf
    from gemini_kernels.ops.triton_kernels import configs, launch

# Bounds on ||out - ref|| / ||ref|| against the float64 oracle: the backend's declared ones. The
# oracle comparisons (tests/helpers.py: assert_matches_oracle) draw their upstream gradients with seed 7.
BOUNDS = gk.backends.BACKENDS["triton"].bounds


# (dim, num_heads, leading shape, dtype, forward path): head widths 2..192, pixel counts that no
# block divides, 1-3 leading dimensions. The paths are the ones the configuration table picks.
FORWARD_CASES = [
    (24, 8, (7,), torch.float64, "split"),  # head width 3
    (40, 8, (2, 3), torch.float32, "split"),  # head width 5 (float32 without TF32: IEEE products)
    (96, 8, (5,), torch.float32, "split"),  # head width 12
    (320, 8, (3,), torch.float32, "split"),  # head width 40
    (12, 4, (2, 2, 3), torch.bfloat16, "tiled"),  # the smallest width: 4 heads of 3 in one group
    (40, 8, (5,), torch.float16, "tiled"),  # head width 5: four heads per product tile
    (96, 8, (5,), torch.float16, "tiled"),  # head width 12: one padded head per tile
    (128, 8, (67,), torch.bfloat16, "tiled"),  # MiT stage 2: two tiles, the second partial
    (320, 8, (3,), torch.bfloat16, "tiled"),  # head width 40 in chunks of 16 lanes
    (512, 8, (5,), torch.bfloat16, "tiled"),  # MiT stage 4
    (1536, 8, (2,), torch.float16, "tiled"),  # Swin-L stage 4: head width 192 in chunks of 64
    (16, 8, (7,), torch.bfloat16, "narrow"),  # head width 2
    (32, 8, (2, 5), torch.float16, "narrow"),
    (64, 8, (9,), torch.bfloat16, "narrow"),
    (64, 4, (3,), torch.float16, "narrow"),
]


@pytest.mark.parametrize("dim, num_heads, shape, dtype, path", FORWARD_CASES)
def test_forward_matches_oracle(dim, num_heads, shape, dtype, path):
    x0, x1, params = make_case(shape, dim, dtype=dtype, device=DEVICE, seed=dim)
    (r0, r1), _ = oracle_float64(x0, x1, params, num_heads)
    rows = [t.reshape(-1, dim) for t in (x0, x1)]
    y0, y1 = launch.forward_rows(*rows, params, num_heads, path=path)
    assert rel_err(y0, r0.reshape(-1, dim)) < BOUNDS[dtype] and rel_err(y1, r1.reshape(-1, dim)) < BOUNDS[dtype]
    # The public entry point runs the path the configuration table picks for this case.
    assert configs.forward_path(dim, num_heads, dtype) == path
    p0, p1 = gemini_fusion(x0, x1, params, num_heads, backend="triton")
    assert torch.equal(p0.reshape(-1, dim), y0) and torch.equal(p1.reshape(-1, dim), y1)


# The tiled kernel in float64 (IEEE products; on a GPU these dtypes run split), for every kind of
# head group: several narrow heads per tile, one padded head, a head in several lane chunks, a
# partial last tile and more tiles than programs (the persistent loop).
TILED_FLOAT64_CASES = [(12, 4, 70), (16, 8, 5), (24, 8, 33), (96, 8, 9), (128, 8, 37), (320, 8, 7), (96, 2, 3)]


@pytest.mark.parametrize("dim, num_heads, pixels", TILED_FLOAT64_CASES)
def test_tiled_forward_float64(dim, num_heads, pixels):
    x0, x1, params = make_case((pixels,), dim, device=DEVICE, seed=dim + 3)
    (r0, r1), _ = oracle_float64(x0, x1, params, num_heads)
    y0, y1 = launch.forward_rows(x0, x1, params, num_heads, path="tiled")
    assert rel_err(y0, r0) < BOUNDS[torch.float64] and rel_err(y1, r1) < BOUNDS[torch.float64]


def test_tiled_forward_with_few_programs():
    """Each program walks several tiles (the persistent loop) and reuses its scratch rows."""
    x0, x1, params = make_case((200,), 40, dtype=torch.float16, device=DEVICE, seed=4)
    (r0, r1), _ = oracle_float64(x0, x1, params, 8)
    cfg = configs.tiled_config(40, 8, torch.float16)._replace(block_m=16)
    with launch.programs_at_most(3):
        y0, y1 = launch._tiled_forward(x0, x1, params, 8, cfg)
    assert rel_err(y0, r0) < BOUNDS[torch.float16] and rel_err(y1, r1) < BOUNDS[torch.float16]


# The tiled backward in float64 on every kind of head group ((40, 5), (24, 6): a last group with fewer
# heads; (80, 2): head width 40 in padded chunks of 16 lanes), several tiles per program, a partial
# last tile; all 16 gradients against the oracle's.
TILED_BACKWARD_CASES = [(12, 4, 70), (16, 8, 5), (40, 8, 33), (40, 5, 9), (24, 6, 7), (96, 8, 9), (128, 8, 37),
                        (80, 2, 5)]


@pytest.mark.parametrize("dim, num_heads, pixels", TILED_BACKWARD_CASES)
def test_tiled_backward_float64(dim, num_heads, pixels):
    x0, x1, params = make_case((pixels,), dim, device=DEVICE, seed=dim + 5)
    with launch.forced_path("tiled"), launch.programs_at_most(2):
        assert_matches_oracle("triton", x0, x1, params, num_heads, BOUNDS[torch.float64], seed=7)


# The wide backward (wide_bwd.py) in float64 on every kind of head group: several heads per product
# tile (head widths 3, 4, 5, 8), a last group with fewer heads, padded lanes (head width 12), several
# tiles per program and a partial last tile; all 16 gradients against the oracle's.
WIDE_BACKWARD_CASES = [(12, 4, 70), (40, 5, 33), (24, 6, 7), (96, 8, 9)]


@pytest.mark.parametrize("dim, num_heads, pixels", WIDE_BACKWARD_CASES)
def test_wide_backward_float64(dim, num_heads, pixels):
    x0, x1, params = make_case((pixels,), dim, device=DEVICE, seed=dim + 6)
    with launch.forced_path("wide"), launch.programs_at_most(2):
        assert_matches_oracle("triton", x0, x1, params, num_heads, BOUNDS[torch.float64], seed=7)


def test_wide_backward_float64_in_the_16_bit_configuration():
    """The 16-bit configuration's tiles (64-pixel row tiles, 64-wide products, a head group of 32
    lanes, 64 x 64 weight-gradient tiles over 32 pixels a step) in float64, against the split one."""
    dim = 192
    x0, x1, params = make_case((37,), dim, device=DEVICE, seed=10)
    gy0, gy1 = upstream_grads(x0, x1, seed=7)
    cfg = configs.wide_bwd_config(dim, 8, torch.bfloat16)
    assert (cfg.block_m, cfg.block_n, cfg.block_k, cfg.lane_chunk, cfg.weight_block, cfg.weight_pixels) == \
        (64, 64, 32, 32, 64, 32)
    got = launch._wide_backward(gy0, gy1, x0, x1, FusionParams(*params), 8, cfg)
    want = launch.backward_rows(gy0, gy1, x0, x1, FusionParams(*params), 8, path="split")
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-12


def test_wide_backward_at_mit_stage_4_width():
    """C = 512 (MiT stage 4, where batches of training run the wide backward), bf16: all 16
    gradients against the float64 oracle's."""
    x0, x1, params = make_case((3,), 512, dtype=torch.bfloat16, device=DEVICE, seed=513)
    with launch.forced_path("wide"):
        assert_matches_oracle("triton", x0, x1, params, 8, BOUNDS[torch.bfloat16], seed=7)


@pytest.mark.parametrize("dim, tiles", [(64, (32, 32, 8)), (128, (64, 64, 16))])
def test_tiled_backward_float64_in_the_16_bit_configuration(dim, tiles):
    """The 16-bit configurations' tiles (product tiles, lanes per head chunk, 8 warps) in float64:
    32-wide products up to C = 64, 64-wide ones at C = 96 ... 128."""
    x0, x1, params = make_case((5,), dim, device=DEVICE, seed=9)
    gy0, gy1 = upstream_grads(x0, x1, seed=7)
    cfg = configs.tiled_bwd_config(dim, 8, torch.bfloat16)
    assert (cfg.block_n, cfg.block_k, cfg.lane_chunk) == tiles
    got = launch._tiled_backward(gy0, gy1, x0, x1, FusionParams(*params), 8, cfg)
    want = launch.backward_rows(gy0, gy1, x0, x1, FusionParams(*params), 8, path="split")
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-12


def test_backward_paths_agree_and_rerun_bitwise():
    """The tiled backward (the table's for 16-bit), the wide one and the split one give the same
    gradients to rounding, and a rerun gives bitwise the same (partials reduced in a fixed order; under the
    interpreter, which runs programs one by one, this holds by construction: the GPU test of
    determinism is test_backend_contract.py's
    test_gpu_reruns_give_bitwise_equal_outputs_and_gradients)."""
    x0, x1, params = make_case((45,), 64, dtype=torch.float16, device=DEVICE, seed=8)
    gy0, gy1 = upstream_grads(x0, x1, seed=7)
    p = FusionParams(*params)
    tiled = launch.backward_rows(gy0, gy1, x0, x1, p, 8)  # the table's path
    assert configs.backward_path(64, 8, torch.float16) == "tiled"
    again = launch.backward_rows(gy0, gy1, x0, x1, p, 8)
    split = launch.backward_rows(gy0, gy1, x0, x1, p, 8, path="split")
    wide = launch.backward_rows(gy0, gy1, x0, x1, p, 8, path="wide")
    wide_again = launch.backward_rows(gy0, gy1, x0, x1, p, 8, path="wide")
    for a, b, c, w, w_again in zip(tiled, again, split, wide, wide_again):
        assert torch.equal(a, b) and torch.equal(w, w_again)
        assert rel_err(a, c) < 5e-3 and rel_err(w, c) < 5e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_narrow_forward_in_several_chunks(dtype):
    """The narrow kernel's chunk loops (relation hidden units, attention output channels), which the
    table runs as one chunk up to C = 64, give the same function over several chunks."""
    x0, x1, params = make_case((37,), 64, dtype=dtype, device=DEVICE, seed=2)
    (r0, r1), _ = oracle_float64(x0, x1, params, 8)
    cfg = configs.NarrowConfig(block_m=64, chunk=16, num_warps=4, num_stages=1)
    y0, y1 = launch._narrow_forward(x0, x1, params, 8, cfg)
    assert rel_err(y0, r0) < BOUNDS[dtype] and rel_err(y1, r1) < BOUNDS[dtype]


@pytest.mark.parametrize(
    "dim, num_heads, shape, dtype",
    [
        (24, 8, (2, 5), torch.float64),  # head width 3
        (40, 8, (7,), torch.float32),  # head width 5
        (96, 8, (3,), torch.float32),  # head width 12
        (320, 8, (3,), torch.float64),  # head width 40
        (64, 8, (2, 3), torch.bfloat16),  # narrow forward, tiled backward
        (40, 8, (5,), torch.float16),  # tiled forward and backward
        (128, 8, (33,), torch.bfloat16),
    ],
)
def test_every_gradient_matches_oracle(dim, num_heads, shape, dtype):
    x0, x1, params = make_case(shape, dim, dtype=dtype, device=DEVICE, seed=dim + 1)
    assert_matches_oracle("triton", x0, x1, params, num_heads, BOUNDS[dtype], seed=7)


def test_backward_at_the_widest_width():
    """Swin-L stage 4 (C = 1536, head width 192): the table's backward (split) against the float64
    oracle's 16 gradients. The launcher directly: the interpreter takes minutes over the tiled
    forward at this width, which test_forward_matches_oracle checks."""
    dim, num_heads = 1536, 8
    x0, x1, params = make_case((2,), dim, dtype=torch.bfloat16, device=DEVICE, seed=15)
    gy0, gy1 = upstream_grads(x0, x1, seed=7)
    _, ref = oracle_float64(x0, x1, params, num_heads, seed=7)
    assert configs.backward_path(dim, num_heads, torch.bfloat16) == "split"
    gx0, gx1, flat = launch.backward_rows(gy0, gy1, x0, x1, FusionParams(*params), num_heads)
    got = [gx0, gx1, *torch.split(flat, [t.numel() for t in params])]
    for name, g, r in zip(GRAD_NAMES, got, ref):
        assert rel_err(g.reshape(r.shape), r) < BOUNDS[torch.bfloat16], name


@pytest.mark.parametrize("path", ["split", "tiled", "wide"])
def test_gradcheck_float64(path):
    """Numerical derivatives of the path's forward against its hand-written backward."""
    x0, x1, params = make_case((3,), 24, device=DEVICE, requires_grad=True)

    def f(a, b, *ps):
        return gemini_fusion(a, b, FusionParams(*ps), num_heads=8, backend="triton")

    with launch.forced_path(path):
        assert torch.autograd.gradcheck(f, (x0, x1, *params), fast_mode=True)


def test_availability_and_path_table():
    assert "triton" in gk.available_backends(DEVICE)
    assert "need CUDA tensors" in tf.unavailable_reason("meta")
    expected = {
        (64, 8, torch.bfloat16): "narrow", (32, 8, torch.float16): "narrow", (16, 8, torch.bfloat16): "narrow",
        (40, 8, torch.bfloat16): "tiled", (128, 8, torch.bfloat16): "tiled", (96, 8, torch.float16): "tiled",
        (1536, 8, torch.bfloat16): "tiled", (12, 4, torch.float16): "tiled",
        (64, 8, torch.float64): "split",
    }
    for (dim, heads, dtype), path in expected.items():
        assert configs.forward_path(dim, heads, dtype) == path, (dim, heads, dtype)
    # float32 follows torch.backends.cuda.matmul.allow_tf32: tensor-core products only where allowed.
    assert configs.forward_path(320, 8, torch.float32, allow_tf32=False) == "split"
    assert configs.forward_path(320, 8, torch.float32, allow_tf32=True) == "tiled"
    assert configs.tiled_config(320, 8, torch.float32, allow_tf32=True).precision == "tf32"


def test_backward_path_table():
    """16-bit: the tiled backward up to C = 128 (MiT stages 1-2), the wide one beyond where the heads
    are at most 64 lanes wide (MiT stages 3-4, Swin up to C = 512), the split one elsewhere."""
    for dim in (16, 64, 96, 128):
        assert configs.backward_path(dim, 8, torch.bfloat16) == "tiled", dim
    for dim in (160, 192, 256, 320, 384, 512):
        assert configs.backward_path(dim, 8, torch.float16) == "wide", dim
    for dim, dtype in ((768, torch.float16), (1536, torch.bfloat16), (64, torch.float32), (64, torch.float64)):
        assert configs.backward_path(dim, 8, dtype) == "split", (dim, dtype)


@pytest.mark.parametrize("version, ok", [("3.6.0", True), ("3.7.1+git1234", True), ("4.0", True),
                                         ("3.5.1", False), ("2.3.0", False)])
def test_triton_version_floor(version, ok):
    if ok:
        tf.check_triton_version(version)
    else:
        with pytest.raises(ImportError, match=r"triton >= 3\.6; found triton " + version.replace(".", r"\.")):
            tf.check_triton_version(version)


@pytest.mark.parametrize("head_dim, expected", [(2, (2, 8)), (3, (4, 4)), (8, (8, 2)), (12, (16, 1)),
                                                (16, (16, 1)), (40, (16, 1)), (64, (64, 1)), (80, (16, 1)),
                                                (192, (64, 1))])
def test_lane_chunks_pad_heads_least(head_dim, expected):
    assert configs.lane_chunk(head_dim, 64) == expected


# ----------------------------------------------------------------------------------------------
# GPU (H100): `python -m pytest tests/test_triton.py -m gpu -ra`
# ----------------------------------------------------------------------------------------------

NYUDV2_STAGES = [(2, tokens, dim) for tokens, dim in stage_dims("nyudv2", "mit-b1").values()]  # batch 2
ODD_SHAPES = [(3, 1001, 40), (1, 777, 96), (2, 333, 24), (1, 257, 1536), (5, 63, 32)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch, pixels, dim", NYUDV2_STAGES + ODD_SHAPES)
def test_gpu_outputs_and_gradients(batch, pixels, dim, dtype):
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        x0, x1, params = make_case((batch, pixels), dim, dtype=dtype, device="cuda", seed=dim)
        assert_matches_oracle("triton", x0, x1, params, 8, BOUNDS[dtype], seed=7)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.mark.gpu
@pytest.mark.parametrize("batch, pixels, dim", NYUDV2_STAGES)
def test_gpu_float32_with_tf32(batch, pixels, dim):
    """With TF32 on, float32 products keep 10 mantissa bits: the bound is TF32's, not float32's."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        x0, x1, params = make_case((batch, pixels), dim, dtype=torch.float32, device="cuda", seed=dim)
        assert_matches_oracle("triton", x0, x1, params, 8, 5e-3, seed=7)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [64, 320])
def test_gpu_torch_compile_inductor_fullgraph(dim):
    """Inductor (not only aot_eager) compiles a model containing the layer without a graph break."""
    torch._dynamo.reset()
    module = GeminiFusion(dim, backend="triton").to(device="cuda", dtype=torch.bfloat16)
    x0, x1 = (torch.randn(2, 300, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    compiled = torch.compile(module, fullgraph=True)
    y0, y1 = compiled(x0, x1)
    e0, e1 = module(x0, x1)
    assert torch.equal(y0, e0) and torch.equal(y1, e1)
    (y0.float().sum() + y1.float().sum()).backward()
    assert all(p.grad is not None for p in module.parameters())


@pytest.mark.parametrize(
    "mutate, exc, fragment",
    [
        (lambda x0, x1, p, h: (x0, x1[:-1], p, h), ValueError, "x1 has shape"),
        (lambda x0, x1, p, h: (x0, x1, p, 0), ValueError, "num_heads must be positive"),
        (lambda x0, x1, p, h: (x0, x1, p, 5), ValueError, "is not divisible by num_heads=5"),
        (lambda x0, x1, p, h: (x0, x1, [*p[:6], p[6][:-1], *p[7:]], h), ValueError,
         r"params\['cross_attn_0_to_1.in_proj_weight'\] has shape"),
        (lambda x0, x1, p, h: (x0, x1, [t.float() for t in p], h), TypeError, "has dtype torch.float32"),
    ],
    ids=["x1 rows", "zero heads", "heads do not divide", "short weight", "param dtype"],
)
def test_custom_op_called_directly_validates_its_arguments(mutate, exc, fragment):
    """torch.ops.gemini_kernels.triton_fusion_fwd is public: bad arguments raise, never reach a kernel."""
    x0, x1, params = make_case((3, 4), 16)
    args = mutate(x0, x1, list(params), 4)
    with pytest.raises(exc, match=fragment):
        torch.ops.gemini_kernels.triton_fusion_fwd(*args)
    y = torch.ops.gemini_kernels.triton_fusion_fwd(x0[:0], x1[:0], list(params), 4)
    assert y[0].shape == (0, 4, 16)


def test_the_backend_entry_and_the_backward_check_their_arguments():
    """Every way to the kernels checks: the backend's own entry point (public through
    backends.get_fusion), and the backward op with the tensors that saved-tensor hooks hand back,
    which need not be the forward's."""
    x0, x1, params = make_case((3, 4), 16)
    with pytest.raises(ValueError, match="is not divisible by num_heads=3"):
        tf.fusion(x0, x1, params, 3)
    short = FusionParams(*params[:4], params[4][:1], *params[5:])
    with pytest.raises(ValueError, match=r"params\['k_noise.weight'\] has shape \(1, 16\)"):
        tf.fusion(x0, x1, short, 4)
    x0, x1, params = make_case((3, 4), 16, requires_grad=True)
    fc1_weight = params[0]

    def unpack(t):
        return t.float() if t is fc1_weight else t

    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack):
        y0, y1 = gemini_fusion(x0, x1, params, 4, backend="triton")
    with pytest.raises(TypeError, match=r"params\['relation_judger.0.fc1.weight'\] has dtype torch.float32"):
        (y0.sum() + y1.sum()).backward()
