"""The fused forward of wide layers (csrc/wide_forward.h): its block logic on the host engine against
the float64 oracle, the backward from its gates, and its CUDA engine (marked gpu).

The CUDA forward of backend="cuda" takes it for float16 / bfloat16 layers that the narrow fused
forward does not take and whose heads group into blocks of a multiple of 16 channels, at most 128
(MiT stages 3-4 with 8 heads: blocks of 2 heads of 40 channels at C = 320, of 2 heads of 64 at
C = 512). On CPU the op torch.ops.gemini_kernels.wide_forward runs the same block logic with one
thread per block, summing the products in the accumulation type, so every line but the tensor-core
MMA runs here.
"""
import pytest
import torch

from gemini_kernels.backends import BACKENDS
from gemini_kernels.ops import cuda_fusion
from helpers import assert_matches_oracle, chain_backward, gated_call, make_case, oracle_float64, rel_err

if not cuda_fusion._load():
    pytest.fail(f"the compiled extension is not available: {cuda_fusion._load_error}", pytrace=False)

BOUNDS = BACKENDS["cuda"].bounds

# (leading shape, C, heads): partial last row tiles (1, 63, 65, 130 pixels), blocks of one head (C = 96,
# 2 heads of 48) to 128 heads of one channel, heads that only pairs make whole MMA tiles (C = 320 and
# 160 with 8 heads: 40 and 20 channels; 5 heads of 16), several chunks of k (C = 320: 2C = 640), 1 to
# 2 leading dims
CASES = [
    ((2, 70), 320, 8),
    ((130,), 160, 8),
    ((1,), 16, 1),
    ((65,), 96, 2),
    ((63,), 80, 5),
    ((9,), 128, 128),
    ((3, 37), 64, 8),
]


def wide(x0, x1, params, heads):
    return torch.ops.gemini_kernels.wide_forward(x0, x1, list(params), heads)


@pytest.mark.parametrize("dtype", list(BOUNDS), ids=str)
@pytest.mark.parametrize("shape,dim,heads", CASES, ids=str)
def test_host_engine_matches_the_oracle(shape, dim, heads, dtype):
    x0, x1, params = make_case(shape, dim, dtype=dtype, seed=dim + len(shape))
    y0, y1, gate = wide(x0, x1, params, heads)
    (r0, r1), _ = oracle_float64(x0, x1, params, heads)
    assert y0.shape == x0.shape and y0.dtype == dtype and gate.shape == (2, *shape, heads)
    errors = {"y0": rel_err(y0, r0), "y1": rel_err(y1, r1)}
    assert max(errors.values()) < BOUNDS[dtype], errors


@pytest.mark.parametrize("dim,heads", [(320, 8), (96, 2)], ids=str)
def test_gates_are_the_chains(dim, heads):
    """The backward reads the gates: the wide forward keeps what the chain's forward keeps."""
    x0, x1, params = make_case((2, 70), dim, seed=5)
    _, _, gate = wide(x0, x1, params, heads)
    _, _, chain_gate, _ = torch.ops.gemini_kernels.fusion_forward(x0, x1, list(params), heads)
    assert rel_err(gate, chain_gate) < 1e-14


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_a_saturated_relation_softmax_matches_the_oracle(dtype):
    """The softmax over C is put together from each block's max and sum of exp: with logits hundreds
    apart, blocks whose max lies far below the row's (exp(-378) in this case: 0 in float32) still give
    the oracle's relation."""
    x0, x1, params = make_case((40,), 160, dtype=dtype, seed=6)
    params = list(params)
    params[2] = params[2] * 300  # fc2 weight: logits spread over ~800 within a row
    y0, y1, _ = wide(x0, x1, params, 8)
    (r0, r1), _ = oracle_float64(x0, x1, params, 8)
    assert torch.isfinite(y0).all() and max(rel_err(y0, r0), rel_err(y1, r1)) < BOUNDS[dtype]


# What a CUDA training step of a wide 16-bit layer runs: the wide forward, then the backward op from its
# gates (recomputing the rest).
wide_then_chain = gated_call(wide, chain_backward)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_backward_from_the_wide_gates_matches_the_oracle(dtype):
    x0, x1, params = make_case((2, 45), 80, dtype=dtype, requires_grad=True, seed=9)
    assert_matches_oracle(wide_then_chain, x0, x1, params, 8,
                          out_bound=BOUNDS[dtype], grad_bound=10 * BOUNDS[dtype], seed=10)


def test_gradcheck_through_the_wide_forward():
    x0, x1, params = make_case((2, 3), 32, requires_grad=True, seed=11)
    with cuda_fusion.weight_cache_disabled():  # gradcheck perturbs the parameters through .data
        assert torch.autograd.gradcheck(lambda a, b, *p: wide_then_chain(a, b, p, 4),
                                        (x0, x1, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_non_contiguous_inputs_and_weights():
    x0, x1, params = make_case((40,), 160, seed=12)
    wide0, wide1 = (torch.stack([x, x], dim=-1)[..., 0] for x in (x0, x1))  # the same values, stride 2
    params = list(params)
    params[2] = params[2].t().contiguous().t()  # fc2 weight, column-major
    y0, y1, _ = wide(wide0, wide1, params, 8)
    (r0, r1), _ = oracle_float64(x0, x1, params, 8)
    assert max(rel_err(y0, r0), rel_err(y1, r1)) < BOUNDS[torch.float64]


@pytest.mark.parametrize("dim,heads,fragment", [
    (24, 8, r"the wide forward takes layers whose heads group into blocks of a multiple of 16 channels, at most "
            r"128; got x0 of shape \[5, 24\] and num_heads=8 \(3 channels a head\)"),
    (168, 8, r"got x0 of shape \[5, 168\] and num_heads=8 \(21 channels a head\)"),
    (272, 1, r"got x0 of shape \[5, 272\] and num_heads=1 \(272 channels a head\)"),
    (64, 3, "num_heads=3 must be positive and divide the channel count C=64"),
], ids=["C=24", "odd-heads", "head-too-wide", "heads"])
def test_refuses_what_it_does_not_take(dim, heads, fragment):
    x0, x1, params = make_case((5,), dim)
    with pytest.raises(RuntimeError, match=fragment):
        wide(x0, x1, params, heads)


def test_reruns_are_bitwise_equal_on_any_thread_count():
    x0, x1, params = make_case((300,), 160, dtype=torch.float32, seed=13)
    first = wide(x0, x1, params, 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        second = wide(x0, x1, params, 8)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ---- the CUDA engine ------------------------------------------------------------------------------

# NYUDv2 stages 3-4 at batch 2 (blocks of 80 and 128 columns, 8 heads), blocks of one head (96, 2) and of
# 128 heads, partial row tiles, every split of the products over the warps (MmaSplit: 16 columns leave
# warps idle)
GPU_CASES = [((2, 1200), 320, 8), ((2, 300), 512, 8), ((130,), 160, 8), ((65,), 96, 2), ((63,), 80, 5),
             ((9,), 128, 128), ((1,), 16, 1)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,dim,heads", GPU_CASES, ids=str)
def test_gpu_wide_forward_matches_the_oracle_and_the_host_engine(shape, dim, heads, dtype):
    x0, x1, params = make_case(shape, dim, dtype=dtype, device="cuda", seed=dim)
    y0, y1, gate = wide(x0, x1, params, heads)
    (r0, r1), _ = oracle_float64(x0, x1, params, heads)
    assert max(rel_err(y0, r0), rel_err(y1, r1)) < BOUNDS[dtype]
    # The host engine sums the same rounded operands in another order: the gates agree to float rounding.
    _, _, host_gate = wide(x0.cpu(), x1.cpu(), [p.cpu() for p in params], heads)
    assert rel_err(gate.cpu(), host_gate) < 1e-3


@pytest.mark.gpu
def test_gpu_backend_forward_takes_the_wide_kernel():
    x0, x1, params = make_case((2, 300), 320, dtype=torch.bfloat16, device="cuda", seed=14)
    y0, y1, gate, activations = torch.ops.gemini_kernels.fusion_forward(x0, x1, list(params), 8)
    w0, w1, wgate = wide(x0, x1, params, 8)
    assert activations == [] and torch.equal(y0, w0) and torch.equal(y1, w1) and torch.equal(gate, wgate)


@pytest.mark.gpu
def test_gpu_wide_forward_refuses_float32():
    x0, x1, params = make_case((5,), 320, dtype=torch.float32, device="cuda")
    with pytest.raises(RuntimeError, match=r"the wide forward on CUDA takes float16 \(sm_70 on\) or bfloat16"):
        wide(x0, x1, params, 8)
