"""The fused backward of narrow layers (csrc/fused_backward.h): its tile logic on the host engine against
the float64 oracle, its deterministic partial sums, gradcheck through the fused forward and backward,
and its CUDA engine (marked gpu).

The CUDA backward of backend="cuda" takes it for float16 / bfloat16 layers of C <= 128 channels (a
multiple of 16); on CPU the op torch.ops.gemini_kernels.fused_backward runs the same tile logic with
the host engine, so every line but the tensor-core MMA runs here.
"""
import pytest
import torch

from gemini_kernels import FusionParams
from gemini_kernels.backends import BACKENDS
from gemini_kernels.ops import cuda_fusion
from helpers import assert_matches_oracle, gated_call, make_case, rel_err, upstream_grads
from gemini_kernels.shapes import stage_dims

if not cuda_fusion._load():
    pytest.fail(f"the compiled extension is not available: {cuda_fusion._load_error}", pytrace=False)

BOUNDS = BACKENDS["cuda"].bounds
ops = torch.ops.gemini_kernels


def fused(programs):
    """The fused forward, then the fused backward from its gates over `programs` programs: a training
    step of a narrow layer."""
    return gated_call(ops.fused_forward,
                      lambda g0, g1, x0, x1, params, gate, heads: ops.fused_backward(g0, g1, x0, x1, params, gate,
                                                                                     heads, programs))


# (leading shape, C, heads, programs): partial last tiles (37, 65, 130, 63 pixels a row), one and many
# tiles a program, more programs than tiles, head widths 1 to 32 (three heads of 16), leading dims 1 to 2
CASES = [
    ((3, 37), 64, 8, 2),
    ((130,), 128, 8, 1),
    ((1,), 16, 2, 4),
    ((2, 32), 32, 1, 3),
    ((65,), 48, 3, 2),
    ((63,), 128, 128, 1),
]


@pytest.mark.parametrize("dtype", list(BOUNDS), ids=str)
@pytest.mark.parametrize("shape,dim,heads,programs", CASES, ids=str)
def test_host_engine_matches_the_oracle(shape, dim, heads, programs, dtype):
    """All 16 gradients (and the fused forward's outputs) against the float64 oracle's, within the
    backend's bounds; the key-bias third of in_proj_bias's gradient exactly zero."""
    x0, x1, params = make_case(shape, dim, dtype=dtype, seed=dim + heads)
    assert_matches_oracle(fused(programs), x0, x1, params, heads, out_bound=BOUNDS[dtype], seed=dim)


def test_gradcheck_through_the_fused_forward_and_backward():
    """Numerical derivatives of the fused forward against the fused backward, in float64, over two tiles
    (the second partial) in two programs."""
    x0, x1, params = make_case((2, 35), 16, requires_grad=True, seed=11)
    with cuda_fusion.weight_cache_disabled():  # gradcheck perturbs the parameters through .data
        assert torch.autograd.gradcheck(lambda a, b, *p: fused(2)(a, b, p, 2), (x0, x1, *params),
                                        eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def _backward(x0, x1, params, heads, programs, seed=3):
    y0, y1, gate = ops.fused_forward(x0, x1, list(params), heads)
    g0, g1 = upstream_grads(y0, y1, seed)
    return ops.fused_backward(g0, g1, x0, x1, list(params), gate, heads, programs)


def test_reruns_are_bitwise_equal_on_any_thread_count():
    """The weight gradients are sums in a fixed order (each program's tiles, then the programs), not
    atomics: the same programs give the same bits on 1 and 2 threads."""
    x0, x1, params = make_case((300,), 64, dtype=torch.float32, seed=13)
    first = _backward(x0, x1, params, 8, 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        second = _backward(x0, x1, params, 8, 3)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_the_number_of_programs_changes_only_the_order_of_the_sums():
    x0, x1, params = make_case((500,), 32, seed=14)
    one = _backward(x0, x1, params, 4, 1)
    for programs in (2, 5, 8, 1000):  # 1000: more than the 8 tiles, so one tile each
        many = _backward(x0, x1, params, 4, programs)
        assert torch.equal(many[0], one[0]) and torch.equal(many[1], one[1])  # dx: per pixel, no sums
        assert max(rel_err(a, b) for a, b in zip(many[2:], one[2:])) < 1e-14


def test_zero_pixels_are_refused_by_the_op():
    """The entry points return empty outputs for empty inputs before any kernel runs (functional.py);
    the op itself says what it takes instead of launching nothing."""
    x0, x1, params = make_case((2, 0), 32, seed=15)
    gate = torch.empty(2, 2, 0, 4, dtype=torch.float64)
    empty = torch.empty(2, 0, 32, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"x0 must be a non-empty \(..., C\) tensor; got shape \[2, 0, 32\]"):
        ops.fused_backward(empty, empty, x0, x1, list(params), gate, 4, 3)


def test_non_contiguous_inputs_and_output_gradients():
    x0, x1, params = make_case((40,), 64, seed=16)
    y0, y1, gate = ops.fused_forward(x0, x1, list(params), 8)
    g0, g1 = upstream_grads(y0, y1, 4)
    strided = [torch.stack([t, t], dim=-1)[..., 0] for t in (x0, x1, g0, g1)]  # the same values, stride 2
    assert not strided[0].is_contiguous()
    expected = ops.fused_backward(g0, g1, x0, x1, list(params), gate, 8, 2)
    got = ops.fused_backward(strided[2], strided[3], strided[0], strided[1], list(params), gate, 8, 2)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("change,fragment", [
    ("programs", "programs must be in \\[1, 2\\^31\\); got 0"),
    ("width", "the fused backward takes C <= 128 channels, a multiple of 16; got x0 of shape \\[5, 24\\]"),
    ("gate", "gate must be the third output of fusion_forward"),
    ("grad_y0", "grad_y0 is Double\\[5, 32\\]"),
], ids=str)
def test_refuses_what_it_does_not_take(change, fragment):
    dim = 24 if change == "width" else 32
    x0, x1, params = make_case((5,), dim, seed=17)
    gate = torch.rand(2, 5, 4, dtype=torch.float64)
    g0 = g1 = torch.randn(5, dim, dtype=torch.float64)
    programs = 0 if change == "programs" else 2
    if change == "gate":
        gate = gate.float()
    if change == "grad_y0":
        g0 = torch.randn(5, dim + 1, dtype=torch.float64)
        fragment = fragment.replace("32", "33", 1)
    with pytest.raises(RuntimeError, match=fragment):
        ops.fused_backward(g0, g1, x0, x1, list(params), gate, 4, programs)


# ---- the CUDA engine (a GPU) -----------------------------------------------------------------------

GPU_CASES = [(2, tokens, dim) for tokens, dim in list(stage_dims("nyudv2", "mit-b1").values())[:2]] + [
    (1, 333, 16), (3, 65, 48), (1, 1000, 128)]


def _gpu_case(batch, tokens, dim, dtype, seed):
    x0, x1, params = make_case((batch, tokens), dim, dtype=dtype, device="cuda", seed=seed)
    return x0, x1, params


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("batch,tokens,dim", GPU_CASES, ids=str)
def test_gpu_fused_backward_matches_the_oracle(batch, tokens, dim, dtype):
    x0, x1, params = _gpu_case(batch, tokens, dim, dtype, seed=dim)
    assert_matches_oracle(fused(132), x0, x1, params, 8, out_bound=BOUNDS[dtype], seed=dim, note="cuda engine: ")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_engine_agrees_with_the_host_engine(dtype):
    """The same tile logic on both engines: the CUDA MMAs against the host engine's sums, in float32 on
    the host (the 16-bit rounding of every stored value is the only difference that may remain)."""
    x0, x1, params = _gpu_case(2, 300, 64, dtype, seed=21)
    got = _backward(x0, x1, params, 8, 7)
    host = _backward(x0.cpu().float(), x1.cpu().float(), [p.cpu().float() for p in params], 8, 7)
    for a, b in zip(got, host):
        assert rel_err(a.cpu(), b) < BOUNDS[dtype]


@pytest.mark.gpu
def test_gpu_backend_backward_is_deterministic_and_matches_the_oracle():
    """backend="cuda" takes the fused backward at a narrow bf16 layer: bitwise reruns, the oracle's
    gradients within the bounds."""
    x0, x1, params = _gpu_case(2, 4800, 128, torch.bfloat16, seed=22)
    first = assert_matches_oracle("cuda", x0, x1, params, 8, out_bound=BOUNDS[torch.bfloat16], seed=5)
    leaves = [t.detach().requires_grad_() for t in (x0, x1, *params)]
    from gemini_kernels import gemini_fusion
    runs = []
    for _ in range(2):
        y0, y1 = gemini_fusion(leaves[0], leaves[1], FusionParams(*leaves[2:]), 8, backend="cuda")
        runs.append(torch.autograd.grad((y0.float().sum() + 2 * y1.float().sum()), leaves))
    assert all(torch.equal(a, b) for a, b in zip(*runs)), first


@pytest.mark.gpu
def test_gpu_fused_backward_refuses_float32():
    """TF32 MMAs would miss float32's bound: the op refuses, and the backend runs the chain instead."""
    x0, x1, params = make_case((5,), 64, dtype=torch.float32, device="cuda", seed=23)
    gate = torch.rand(2, 5, 8, device="cuda")
    with pytest.raises(RuntimeError, match=r"the fused backward on CUDA takes float16 \(sm_70 on\) or bfloat16"):
        ops.fused_backward(x0, x1, x0, x1, list(params), gate, 8, 4)
