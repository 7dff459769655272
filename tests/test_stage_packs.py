"""The CUDA row-stage kernels' lane groups and packs (csrc/fusion_math.h, "teams and packs"), run on
the host.

On CUDA a lane of a stage kernel takes 16 bytes of channels a step (4 floats, 8 float16 / bfloat16),
loaded and stored as one access, where stage_pack finds C and the head width multiples of that and
every buffer 16-byte aligned, and a row belongs to a group of 2 to 32 lanes; it falls back to one
element a lane elsewhere. The ops packed_chain_forward / packed_chain_backward run the untiled chain
with its stages run as such a group runs them, by `lanes` threads a row (fusion_host.cpp's
LaneThreadsTeam: the lanes' offsets, their packs, idle lanes, reductions across lanes), so every line
of the stages' lane and pack code runs here against the float64 oracle; only the shuffles and the
vector instructions are the GPU's own. The ops refuse what the CUDA kernels would not pack, so that
a test cannot pass unpacked. tests/test_cuda_compile.py checks that the packed kernels' loads and
stores are 16-byte accesses.
"""
import pytest
import torch

from gemini_kernels import gemini_fusion
from gemini_kernels.backends import BACKENDS
from gemini_kernels.ops import cuda_fusion
from helpers import assert_matches_oracle, gated_call, make_case, rel_err

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


def packed(lanes):
    """The packed forward, then the packed backward from its gates, by `lanes` threads a row."""
    ops = torch.ops.gemini_kernels
    return gated_call(lambda x0, x1, params, heads: ops.packed_chain_forward(x0, x1, params, heads, lanes),
                      lambda g0, g1, x0, x1, params, gate, heads: ops.packed_chain_backward(
                          g0.contiguous(), g1.contiguous(), x0, x1, params, gate, heads, lanes))


@pytest.mark.parametrize("dtype", PACKED_DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim,heads", CASES, ids=str)
def test_packed_stages_match_the_oracle(shape, dim, heads, dtype):
    x0, x1, params = make_case(shape, dim, dtype=dtype, requires_grad=True, seed=dim + heads)
    assert_matches_oracle(packed(1), x0, x1, params, heads, out_bound=BOUNDS[dtype], grad_bound=2 * BOUNDS[dtype],
                          seed=3)


# Groups of 2 and 8 lanes: at head width 8 in float32 (two packs a head) 2 lanes share each head and
# 8 leave 6 idle; at C = 320 (heads of ten float packs) 8 lanes take one or two packs each.
@pytest.mark.parametrize("lanes", [2, 8])
@pytest.mark.parametrize("shape,dim,heads,dtype", [((2, 7), 64, 8, torch.float32), ((5,), 320, 8, torch.float32),
                                                   ((9,), 128, 2, torch.bfloat16)], ids=str)
def test_lane_groups_match_the_oracle(shape, dim, heads, dtype, lanes):
    x0, x1, params = make_case(shape, dim, dtype=dtype, requires_grad=True, seed=dim + lanes)
    assert_matches_oracle(packed(lanes), x0, x1, params, heads, out_bound=BOUNDS[dtype],
                          grad_bound=2 * BOUNDS[dtype], seed=4)


# How far the packed stages may differ from the host's own: only the order of the sums within a row
# (float32 accumulators in every dtype) differs, far below the 16-bit dtypes' rounding; a value
# rounded to the storage dtype where the host keeps it in float32 (the parked softmax numerators of a
# 16-bit layer, say) would move a large fraction of the outputs by a unit of their last place.
AGREEMENT = {torch.float32: 1e-6, torch.float16: 2e-4, torch.bfloat16: 1e-3}


@pytest.mark.parametrize("dtype", PACKED_DTYPES, ids=str)
def test_packed_and_unpacked_stages_agree(dtype):
    """Forward and backward of the same untiled chain, packed by 2 lanes and by the host's stages."""
    x0, x1, params = make_case((2, 30), 64, dtype=dtype, seed=4)
    gy0, gy1 = (torch.randn(x0.shape, generator=torch.Generator().manual_seed(s)).to(dtype) for s in (5, 6))
    y0, y1, gate = torch.ops.gemini_kernels.packed_chain_forward(x0, x1, list(params), 8, 2)
    u0, u1, ugate, _ = torch.ops.gemini_kernels.fusion_forward(x0, x1, list(params), 8)
    grads = torch.ops.gemini_kernels.packed_chain_backward(gy0, gy1, x0, x1, list(params), gate, 8, 2)
    ugrads = torch.ops.gemini_kernels.fusion_backward(gy0, gy1, x0, x1, list(params), ugate, [], 8)
    pairs = {"y0": (y0, u0), "y1": (y1, u1), "gate": (gate, ugate)}
    pairs.update({f"grad {i}": (g, u) for i, (g, u) in enumerate(zip(grads, ugrads))})
    errors = {name: rel_err(a, b) for name, (a, b) in pairs.items()}
    assert max(errors.values()) < AGREEMENT[dtype], errors


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



def test_refuses_a_lane_count_it_does_not_emulate():
    x0, x1, params = make_case((5,), 64, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="lanes must be 1, 2 or 8; got 3"):
        torch.ops.gemini_kernels.packed_chain_forward(x0, x1, list(params), 8, 3)

# ---- GPU: the stage kernels themselves ----------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", PACKED_DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim,heads", [((2, 333), 64, 8), ((3, 41), 320, 8)], ids=str)
@pytest.mark.parametrize("aligned", [True, False], ids=["vectors", "x0 misaligned, scalars"])
def test_gpu_stage_kernels_match_the_oracle(shape, dim, heads, dtype, aligned, monkeypatch):
    """The chain's stage kernels on CUDA: packed where the buffers allow, one element a lane where x0
    starts off a 16-byte boundary. float32 layers run the chain; 16-bit ones run it when the forward
    saves its activations (forced here; the fused and wide kernels take them otherwise)."""
    reason = cuda_fusion.unavailable_reason(torch.device("cuda"))
    if reason is not None:
        pytest.fail(reason)
    monkeypatch.setattr(cuda_fusion, "saves_activations", lambda x0: True)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    x0, x1, params = make_case(shape, dim, dtype=dtype, device="cuda", requires_grad=True, seed=dim)
    if not aligned:
        x0 = _offset(x0.detach()).requires_grad_()
        assert x0.is_leaf and x0.data_ptr() % 16 != 0
    assert_matches_oracle(lambda a, b, p, h: gemini_fusion(a, b, p, h, backend="cuda"), x0, x1, params, heads,
                          out_bound=BOUNDS[dtype], grad_bound=BOUNDS[dtype])
