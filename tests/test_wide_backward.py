"""The fused backward of wide layers (csrc/wide_backward.h): its block logic on the host engine against
the float64 oracle (all 16 gradients), gradcheck through the wide forward and backward, its fixed-order
weight-gradient sums, and its CUDA engine (marked gpu).

The CUDA backward of backend="cuda" takes it for float16 / bfloat16 layers that the narrow fused
backward does not take, of C a multiple of 64 and heads grouping into blocks of a multiple of 16
channels (MiT stages 3-4 with 8 heads). On CPU the op torch.ops.gemini_kernels.wide_backward runs
the same block logic with the host engine, so every line but the tensor-core MMA runs here.
"""
import pytest
import torch

from gemini_kernels import FusionParams
from gemini_kernels.backends import BACKENDS
from gemini_kernels.ops import cuda_fusion
from helpers import assert_matches_oracle, gated_call, make_case, rel_err, upstream_grads

if not cuda_fusion._load():
    pytest.fail(f"the compiled extension is not available: {cuda_fusion._load_error}", pytrace=False)

BOUNDS = BACKENDS["cuda"].bounds
ops = torch.ops.gemini_kernels


# The wide forward, then the wide backward from its gates: a training step of a wide layer.
wide = gated_call(ops.wide_forward, ops.wide_backward)


# (leading shape, C, heads): partial last row tiles (37, 65, 130, 63 pixels a row), blocks of two heads of
# 40 (C = 320, 8 heads: MiT stage 3), of one head of 64 (C = 128, 2 heads), of 16 heads of 8 (C = 128,
# 16 heads) and of 32 heads of 4, one head (C = 64), several 64-column weight-gradient tiles, several
# chunks of k, leading dims 1 to 2
CASES = [
    ((2, 37), 320, 8),
    ((130,), 128, 2),
    ((65,), 192, 8),
    ((3,), 64, 1),
    ((63,), 128, 16),
    ((20,), 128, 32),
]


@pytest.mark.parametrize("dtype", list(BOUNDS), ids=str)
@pytest.mark.parametrize("shape,dim,heads", CASES, ids=str)
def test_host_engine_matches_the_oracle(shape, dim, heads, dtype):
    """All 16 gradients (and the wide forward's outputs) against the float64 oracle's, within the
    backend's bounds; the key-bias third of in_proj_bias's gradient exactly zero."""
    x0, x1, params = make_case(shape, dim, dtype=dtype, seed=dim + heads)
    assert_matches_oracle(wide, x0, x1, params, heads, out_bound=BOUNDS[dtype], seed=dim)


def test_gradients_are_the_chains():
    """The same gradients as the chain's backward from the same gates, in float64: only the order of
    the sums differs."""
    x0, x1, params = make_case((2, 70), 192, seed=5)
    _, _, gate, _ = ops.fusion_forward(x0, x1, list(params), 8)
    g0, g1 = upstream_grads(x0, x1, 6)
    got = ops.wide_backward(g0, g1, x0, x1, list(params), gate, 8)
    chain = ops.fusion_backward(g0, g1, x0, x1, list(params), gate, [], 8)
    assert max(rel_err(a, b) for a, b in zip(got, chain)) < 1e-13


def test_gradcheck_through_the_wide_forward_and_backward():
    """Numerical derivatives of the wide forward against the wide backward, in float64, over two row
    tiles (the second partial)."""
    x0, x1, params = make_case((70,), 64, requires_grad=True, seed=11)
    with cuda_fusion.weight_cache_disabled():  # gradcheck perturbs the parameters through .data
        assert torch.autograd.gradcheck(lambda a, b, *p: wide(a, b, p, 4), (x0, x1, *params),
                                        eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def _backward(x0, x1, params, heads, seed=3):
    y0, y1, gate = ops.wide_forward(x0, x1, list(params), heads)
    g0, g1 = upstream_grads(y0, y1, seed)
    return ops.wide_backward(g0, g1, x0, x1, list(params), gate, heads)


def test_reruns_are_bitwise_equal_on_any_thread_count():
    """The weight gradients are sums over the pixels in a fixed order, one block a 64 x 64 tile, not
    atomics or per-thread partials: the same bits on 1 and 2 threads."""
    x0, x1, params = make_case((300,), 128, dtype=torch.float32, seed=13)
    first = _backward(x0, x1, params, 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        second = _backward(x0, x1, params, 2)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_non_contiguous_inputs_and_output_gradients():
    x0, x1, params = make_case((40,), 128, seed=16)
    y0, y1, gate = ops.wide_forward(x0, x1, list(params), 8)
    g0, g1 = upstream_grads(y0, y1, 4)
    strided = [torch.stack([t, t], dim=-1)[..., 0] for t in (x0, x1, g0, g1)]  # the same values, stride 2
    assert not strided[0].is_contiguous()
    expected = ops.wide_backward(g0, g1, x0, x1, list(params), gate, 8)
    got = ops.wide_backward(strided[2], strided[3], strided[0], strided[1], list(params), gate, 8)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("dim,heads,change,fragment", [
    (96, 2, None, r"the wide backward takes C a multiple of 64 and heads that group into blocks of a multiple of 16 "
                  r"channels, at most 128; got x0 of shape \[5, 96\] and num_heads=2"),
    (256, 1, None, r"got x0 of shape \[5, 256\] and num_heads=1"),
    (64, 8, "gate", "gate must be the third output of fusion_forward"),
    (64, 8, "grad_y0", r"grad_y0 is Double\[5, 65\]"),
], ids=["C=96", "head-too-wide", "gate", "grad_y0"])
def test_refuses_what_it_does_not_take(dim, heads, change, fragment):
    x0, x1, params = make_case((5,), dim, seed=17)
    gate = torch.rand(2, 5, heads, dtype=torch.float64)
    g0 = g1 = torch.randn(5, dim, dtype=torch.float64)
    if change == "gate":
        gate = gate.float()
    if change == "grad_y0":
        g0 = torch.randn(5, dim + 1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=fragment):
        ops.wide_backward(g0, g1, x0, x1, list(params), gate, heads)


# ---- the CUDA engine (a GPU) -----------------------------------------------------------------------

# NYUDv2 stages 3-4 at batch 2, and the odd shapes above
GPU_CASES = [((2, 1200), 320, 8), ((2, 300), 512, 8), ((130,), 128, 2), ((65,), 192, 8), ((63,), 128, 16)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,dim,heads", GPU_CASES, ids=str)
def test_gpu_wide_backward_matches_the_oracle(shape, dim, heads, dtype):
    x0, x1, params = make_case(shape, dim, dtype=dtype, device="cuda", seed=dim)
    assert_matches_oracle(wide, x0, x1, params, heads, out_bound=BOUNDS[dtype], seed=dim, note="cuda engine: ")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_engine_agrees_with_the_host_engine(dtype):
    """The same block logic on both engines: the CUDA MMAs against the host engine's sums, in float32 on
    the host (the 16-bit rounding of every stored value is the only difference that may remain)."""
    x0, x1, params = make_case((2, 300), 320, dtype=dtype, device="cuda", seed=21)
    got = _backward(x0, x1, params, 8)
    host = _backward(x0.cpu().float(), x1.cpu().float(), [p.cpu().float() for p in params], 8)
    for a, b in zip(got, host):
        assert rel_err(a.cpu(), b) < BOUNDS[dtype]


@pytest.mark.gpu
def test_gpu_backend_training_step_is_deterministic_and_matches_the_oracle():
    """backend="cuda" takes the wide forward and backward at a wide bf16 layer: bitwise reruns, the
    oracle's gradients within the bounds."""
    x0, x1, params = make_case((2, 1200), 320, dtype=torch.bfloat16, device="cuda", seed=22)
    first = assert_matches_oracle("cuda", x0, x1, params, 8, out_bound=BOUNDS[torch.bfloat16], seed=5)
    leaves = [t.detach().requires_grad_() for t in (x0, x1, *params)]
    from gemini_kernels import gemini_fusion
    runs = []
    for _ in range(2):
        y0, y1 = gemini_fusion(leaves[0], leaves[1], FusionParams(*leaves[2:]), 8, backend="cuda")
        runs.append(torch.autograd.grad((y0.float().sum() + 2 * y1.float().sum()), leaves))
    assert all(torch.equal(a, b) for a, b in zip(*runs)), first


@pytest.mark.gpu
def test_gpu_wide_backward_refuses_float32():
    x0, x1, params = make_case((5,), 320, dtype=torch.float32, device="cuda", seed=23)
    gate = torch.rand(2, 5, 8, device="cuda")
    with pytest.raises(RuntimeError, match=r"the wide backward on CUDA takes float16 \(sm_70 on\) or bfloat16"):
        ops.wide_backward(x0, x1, x0, x1, list(params), gate, 8)
