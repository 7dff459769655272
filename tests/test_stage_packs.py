"""The CUDA row-stage kernels' packs (csrc/fusion_math.h, "teams and packs"), run on the host.

On CUDA a lane of a stage kernel takes 16 bytes of channels a step (4 floats, 8 float16 / bfloat16),
loaded and stored as one access, where stage_pack finds C and the head width multiples of that and
every buffer 16-byte aligned; it falls back to one element a lane elsewhere. The ops
packed_chain_forward / packed_chain_backward run the untiled chain with its stages walking the row
in those packs on one host thread (SerialPackTeam), so every line of the pack code (offsets, the
per-head bounds, the parked softmax numerators, the in-place stores) runs here against the float64
oracle; they refuse what the CUDA kernels would not pack, so that a test cannot pass unpacked.
tests/test_cuda_compile.py checks that the packed kernels' loads and stores are 16-byte accesses.
"""
import pytest
import torch

from gemini_kernels import gemini_fusion
from gemini_kernels.backends import BACKENDS
from gemini_kernels.ops import cuda_fusion
from helpers import assert_matches_oracle, make_case

if not cuda_fusion._load():
    pytest.fail(f"the compiled extension is not available: {cuda_fusion._load_error}", pytrace=False)

BOUNDS = BACKENDS["cuda"].bounds
PACKED_DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # float64 stays a value a lane

# (leading shape, C, heads): head widths 8 (one bfloat16 pack, two float ones), 40 (MiT stage 3's C =
# 320 with 8 heads: five and ten packs), 64 and 16; C from 32 to 320; rows not a multiple of anything
CASES = [
    ((3, 37), 64, 8),
    ((23,), 320, 8),
    ((2, 9), 128, 2),
    ((7,), 32, 2),
    ((5,), 48, 6),
]


class _PackedChain(torch.autograd.Function):
    """The packed forward, then the packed backward from its gates."""

    @staticmethod
    def forward(ctx, x0, x1, heads, *params):
        y0, y1, gate = torch.ops.gemini_kernels.packed_chain_forward(x0, x1, list(params), heads)
        ctx.save_for_backward(x0, x1, gate, *params)
        ctx.heads = heads
        return y0, y1

    @staticmethod
    def backward(ctx, g0, g1):
        x0, x1, gate, *params = ctx.saved_tensors
        grads = torch.ops.gemini_kernels.packed_chain_backward(g0.contiguous(), g1.contiguous(), x0, x1, params,
                                                               gate, ctx.heads)
        return grads[0], grads[1], None, *grads[2:]


@pytest.mark.parametrize("dtype", PACKED_DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim,heads", CASES, ids=str)
def test_packed_stages_match_the_oracle(shape, dim, heads, dtype):
    x0, x1, params = make_case(shape, dim, dtype=dtype, requires_grad=True, seed=dim + heads)
    assert_matches_oracle(lambda a, b, p, h: _PackedChain.apply(a, b, h, *p), x0, x1, params, heads,
                          out_bound=BOUNDS[dtype], grad_bound=10 * BOUNDS[dtype], seed=3)


def test_packed_and_unpacked_stages_agree():
    """The same chain with one element a step (the host's own stages): float32 sums in another order
    only."""
    x0, x1, params = make_case((2, 50), 64, dtype=torch.float32, seed=4)
    packed = torch.ops.gemini_kernels.packed_chain_forward(x0, x1, list(params), 8)
    unpacked = torch.ops.gemini_kernels.fusion_forward(x0, x1, list(params), 8)[:3]
    for a, b in zip(packed, unpacked):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def _offset(x):
    """x's values in a tensor whose data starts one element past a 16-byte boundary."""
    flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    y = flat[1:].view(x.shape)
    y.copy_(x)
    return y


@pytest.mark.parametrize("case", ["float64", "C not a multiple of the pack", "head width 5", "x0 misaligned"])
def test_refuses_what_the_cuda_kernels_would_not_pack(case):
    dtype, dim, heads = torch.float32, 64, 8
    if case == "float64":
        dtype = torch.float64
    elif case == "C not a multiple of the pack":
        dim, heads = 18, 2
    elif case == "head width 5":
        dim, heads = 40, 8
    x0, x1, params = make_case((5,), dim, dtype=dtype)
    if case == "x0 misaligned":
        x0 = _offset(x0)
        assert x0.is_contiguous() and x0.data_ptr() % 16 != 0
    with pytest.raises(RuntimeError, match="the CUDA stage kernels would not pack these buffers"):
        torch.ops.gemini_kernels.packed_chain_forward(x0, x1, list(params), heads)


# ---- GPU: the stage kernels themselves ----------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("shape,dim,heads", [((2, 333), 64, 8), ((3, 41), 320, 8)], ids=str)
@pytest.mark.parametrize("aligned", [True, False], ids=["packed", "x0 misaligned, unpacked"])
def test_gpu_stage_kernels_match_the_oracle(shape, dim, heads, aligned):
    """float32 on CUDA runs the chain's stage kernels: packed where the buffers allow, one element a
    lane where x0 starts off a 16-byte boundary."""
    reason = cuda_fusion.unavailable_reason(torch.device("cuda"))
    if reason is not None:
        pytest.fail(reason)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        x0, x1, params = make_case(shape, dim, dtype=torch.float32, device="cuda", requires_grad=True, seed=dim)
        if not aligned:
            x0 = _offset(x0.detach()).requires_grad_()
            assert x0.is_leaf and x0.data_ptr() % 16 != 0
        assert_matches_oracle(lambda a, b, p, h: gemini_fusion(a, b, p, h, backend="cuda"), x0, x1, params, heads,
                              out_bound=BOUNDS[torch.float32], grad_bound=BOUNDS[torch.float32])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
