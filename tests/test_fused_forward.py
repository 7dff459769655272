"""The fused forward of narrow layers (csrc/fused_forward.h): its tile logic on the host engine against
the float64 oracle, the backward from its gates, and its CUDA engine (marked gpu).

The CUDA forward of backend="cuda" takes it for float16 / bfloat16 layers of C <= 128 channels (a
multiple of 16); on CPU the op torch.ops.gemini_kernels.fused_forward runs the same tile logic with
one thread per tile, summing the products in the accumulation type, so every line but the
tensor-core MMA runs here.
"""
import pytest
import torch

from gemini_kernels.backends import BACKENDS
from gemini_kernels.ops import cuda_fusion
from helpers import assert_matches_oracle, chain_backward, gated_call, make_case, oracle_float64, rel_err

if not cuda_fusion._load():
    pytest.fail(f"the compiled extension is not available: {cuda_fusion._load_error}", pytrace=False)

BOUNDS = BACKENDS["cuda"].bounds

# (leading shape, C, heads): partial last tiles (1, 63, 65, 130 pixels), one and many tiles, head
# widths 1 to 32 (three heads of 16: not a power of two in count), leading dims 1 to 2
CASES = [
    ((3, 37), 64, 8),
    ((130,), 128, 8),
    ((1,), 16, 2),
    ((2, 32), 32, 1),
    ((65,), 48, 3),
    ((63,), 128, 128),
]


def fused(x0, x1, params, heads):
    return torch.ops.gemini_kernels.fused_forward(x0, x1, list(params), heads)


@pytest.mark.parametrize("dtype", list(BOUNDS), ids=str)
@pytest.mark.parametrize("shape,dim,heads", CASES, ids=str)
def test_host_engine_matches_the_oracle(shape, dim, heads, dtype):
    x0, x1, params = make_case(shape, dim, dtype=dtype, seed=dim + len(shape))
    y0, y1, gate = fused(x0, x1, params, heads)
    (r0, r1), _ = oracle_float64(x0, x1, params, heads)
    assert y0.shape == x0.shape and y0.dtype == dtype and gate.shape == (2, *shape, heads)
    errors = {"y0": rel_err(y0, r0), "y1": rel_err(y1, r1)}
    assert max(errors.values()) < BOUNDS[dtype], errors


def test_gates_are_the_chains():
    """The backward reads the gates: the fused forward keeps what the chain's forward keeps."""
    x0, x1, params = make_case((2, 70), 64, seed=5)
    _, _, gate = fused(x0, x1, params, 8)
    _, _, chain_gate, _ = torch.ops.gemini_kernels.fusion_forward(x0, x1, list(params), 8)
    assert rel_err(gate, chain_gate) < 1e-14


# What a CUDA training step of a narrow 16-bit layer runs: the fused forward, then the backward op from
# its gates (recomputing the rest).
fused_then_chain = gated_call(fused, chain_backward)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_backward_from_the_fused_gates_matches_the_oracle(dtype):
    x0, x1, params = make_case((2, 45), 32, dtype=dtype, requires_grad=True, seed=9)
    assert_matches_oracle(fused_then_chain, x0, x1, params, 4,
                          out_bound=BOUNDS[dtype], grad_bound=10 * BOUNDS[dtype], seed=10)


def test_gradcheck_through_the_fused_forward():
    x0, x1, params = make_case((2, 3), 16, requires_grad=True, seed=11)
    with cuda_fusion.weight_cache_disabled():  # gradcheck perturbs the parameters through .data
        assert torch.autograd.gradcheck(lambda a, b, *p: fused_then_chain(a, b, p, 2),
                                        (x0, x1, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_non_contiguous_inputs_and_weights():
    x0, x1, params = make_case((40,), 64, seed=12)
    wide0, wide1 = (torch.stack([x, x], dim=-1)[..., 0] for x in (x0, x1))  # the same values, stride 2
    params = list(params)
    params[2] = params[2].t().contiguous().t()  # fc2 weight, column-major
    y0, y1, _ = fused(wide0, wide1, params, 8)
    (r0, r1), _ = oracle_float64(x0, x1, params, 8)
    assert max(rel_err(y0, r0), rel_err(y1, r1)) < BOUNDS[torch.float64]


@pytest.mark.parametrize("dim,heads,fragment", [
    (24, 8, r"the fused forward takes C <= 128 channels, a multiple of 16; got x0 of shape \[5, 24\]"),
    (160, 8, r"the fused forward takes C <= 128 channels, a multiple of 16; got x0 of shape \[5, 160\]"),
    (64, 3, "num_heads=3 must be positive and divide the channel count C=64"),
], ids=["C=24", "C=160", "heads"])
def test_refuses_what_it_does_not_take(dim, heads, fragment):
    x0, x1, params = make_case((5,), dim)
    with pytest.raises(RuntimeError, match=fragment):
        fused(x0, x1, params, heads)


def test_reruns_are_bitwise_equal_on_any_thread_count():
    x0, x1, params = make_case((300,), 64, dtype=torch.float32, seed=13)
    first = fused(x0, x1, params, 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        second = fused(x0, x1, params, 8)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ---- the CUDA engine ------------------------------------------------------------------------------

# NYUDv2 stages 1-2 at batch 2, and every split of the products over the warps (MmaSplit: items of 4,
# 2 and 1 row tiles, some warps idle at C = 16), a head spanning the warp (C = 32, one head)
GPU_CASES = [((2, 19200), 64, 8), ((2, 4800), 128, 8), ((3, 37), 64, 8), ((65,), 48, 3), ((63,), 128, 128),
             ((1,), 16, 2), ((2, 32), 32, 1)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,dim,heads", GPU_CASES, ids=str)
def test_gpu_fused_forward_matches_the_oracle_and_the_host_engine(shape, dim, heads, dtype):
    x0, x1, params = make_case(shape, dim, dtype=dtype, device="cuda", seed=dim)
    y0, y1, gate = fused(x0, x1, params, heads)
    (r0, r1), _ = oracle_float64(x0, x1, params, heads)
    assert max(rel_err(y0, r0), rel_err(y1, r1)) < BOUNDS[dtype]
    # The host engine sums the same rounded operands in another order: the gates agree to float rounding.
    _, _, host_gate = fused(x0.cpu(), x1.cpu(), [p.cpu() for p in params], heads)
    assert rel_err(gate.cpu(), host_gate) < 1e-3


@pytest.mark.gpu
def test_gpu_backend_forward_takes_the_fused_kernel():
    x0, x1, params = make_case((2, 300), 64, dtype=torch.bfloat16, device="cuda", seed=14)
    y0, y1, gate, activations = torch.ops.gemini_kernels.fusion_forward(x0, x1, list(params), 8)
    f0, f1, fgate = fused(x0, x1, params, 8)
    assert activations == [] and torch.equal(y0, f0) and torch.equal(y1, f1) and torch.equal(gate, fgate)


@pytest.mark.gpu
def test_gpu_fused_forward_refuses_float32():
    x0, x1, params = make_case((5,), 64, dtype=torch.float32, device="cuda")
    with pytest.raises(RuntimeError, match=r"the fused forward on CUDA takes float16 \(sm_70 on\) or bfloat16"):
        fused(x0, x1, params, 8)
