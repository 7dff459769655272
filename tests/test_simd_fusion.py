"""The host path's SIMD forward and backward (csrc/simd_fusion.h): every instruction set this CPU runs,
each against the float64 oracle in float64 and float32 (outputs, gates and all 16 gradients), over head
widths and pixel counts that take its register transposes and its element-wise fallback, full tiles and
a partial last one; the calls the public API takes; refusals; empty and non-contiguous inputs; bitwise
reruns and 1 to 3 threads; inputs followed by NaN in memory; gradcheck of both through the public call.

An instruction set this CPU (or ATEN_CPU_CAPABILITY) lacks skips with that reason; the kernel is
compiled for AVX-512 and for AVX2 + FMA, so a CPU with AVX-512 tests both.
"""
import os
import subprocess
import sys

import pytest
import torch

from gemini_kernels import FusionParams, gemini_fusion
from gemini_kernels.ops import cuda_fusion
from gemini_kernels.reference import attention_weights
from helpers import assert_matches_oracle, gated_call, make_case, oracle_float64, rel_err


@pytest.fixture(autouse=True, scope="module")
def extension_built():
    reason = cuda_fusion.unavailable_reason(torch.device("cpu"))
    if reason is not None:
        pytest.fail(reason)


def supported_isas():
    cuda_fusion.unavailable_reason(torch.device("cpu"))  # loads the extension
    return list(torch.ops.gemini_kernels.simd_isas())


# Elements a register, per instruction set and dtype: the backward takes C a multiple of it.
LANES = {("avx512", torch.float32): 16, ("avx512", torch.float64): 8, ("avx2", torch.float32): 8,
         ("avx2", torch.float64): 4}


@pytest.fixture(params=["avx512", "avx2"])
def isa(request):
    if request.param not in supported_isas():
        pytest.skip(f"this CPU, or ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '')!r}, does not run "
                    f"{request.param} (runs {supported_isas()})")
    return request.param


def simd_forward(isa):
    def forward(x0, x1, params, heads):
        y0, y1, _, _ = torch.ops.gemini_kernels.simd_forward(x0, x1, list(params), heads, isa)
        return y0, y1
    return forward


BOUNDS = {torch.float64: 1e-13, torch.float32: 1e-5}
GRAD_BOUNDS = {torch.float64: 1e-12, torch.float32: 2e-5}

# (leading shape, C, heads). Tiles are 48 / 24 pixels (AVX-512 float / double), 24 / 12 (AVX2), and the
# register transposes take C a multiple of 16 / 8 / 4 lanes: 96 pixels are whole tiles only, the others
# end in a partial tile; C = 30 and 12 are never a multiple, 40 and 24 only for the narrower registers.
CASES = [
    ((2, 48), 64, 8),
    ((2, 100), 64, 8),
    ((37,), 128, 8),
    ((3, 5), 32, 8),
    ((7, 7), 24, 3),
    ((64,), 40, 5),
    ((9,), 30, 1),
    ((11,), 12, 3),
    ((1,), 16, 1),
]


@pytest.mark.parametrize("dtype", list(BOUNDS), ids=str)
@pytest.mark.parametrize("shape, dim, heads", CASES, ids=lambda v: str(v).replace(" ", ""))
def test_matches_the_oracle(isa, dtype, shape, dim, heads):
    x0, x1, params = make_case(shape, dim, dtype=dtype, seed=dim + len(shape))
    assert_matches_oracle(simd_forward(isa), x0, x1, params, heads, BOUNDS[dtype], grads=False)
    # The gates, which the backward reads: each head's first attention weight, in float64.
    _, _, gate, _ = torch.ops.gemini_kernels.simd_forward(x0, x1, list(params), heads, isa)
    assert gate.shape == (2, *shape, heads) and gate.dtype == dtype
    assert rel_err(gate, oracle_gates(x0, x1, params, heads)) < BOUNDS[dtype]


def oracle_gates(x0, x1, params, heads):
    """(2, ..., heads): per direction and head, the oracle's weight of the self key, in float64."""
    x0, x1 = x0.double(), x1.double()
    p = FusionParams(*(t.double() for t in params))
    return torch.stack([attention_weights(s, o, p, d, heads)[..., 0] for d, (s, o) in enumerate(((x0, x1), (x1, x0)))])


def simd_call(isa):
    """The differentiable call of the two ops on one instruction set."""
    def forward(x0, x1, params, heads):
        return torch.ops.gemini_kernels.simd_forward(x0, x1, params, heads, isa)

    def backward(g0, g1, x0, x1, params, gate, heads):
        return torch.ops.gemini_kernels.simd_backward(g0, g1, x0, x1, list(params), gate, heads, isa, [])
    return gated_call(forward, backward)


# (leading shape, C, heads) for the backward: C a multiple of 16, so that every instruction set and
# dtype takes it; the weight gradients' register blocks over C / lanes registers of columns (1, 2, 3, 4,
# 5, 8: blocks of 3 and 2).
BACKWARD_CASES = [
    ((2, 48), 64, 8),
    ((2, 100), 64, 8),
    ((37,), 128, 8),
    ((3, 5), 32, 8),
    ((50,), 48, 3),
    ((29,), 80, 5),
    ((1,), 16, 1),
]


@pytest.mark.parametrize("dtype", list(BOUNDS), ids=str)
@pytest.mark.parametrize("shape, dim, heads", BACKWARD_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_backward_matches_the_oracle(isa, dtype, shape, dim, heads):
    """All 16 gradients (the key bias's third exactly zero) from the forward's gates."""
    x0, x1, params = make_case(shape, dim, dtype=dtype, seed=2 * dim + len(shape))
    assert_matches_oracle(simd_call(isa), x0, x1, params, heads, BOUNDS[dtype], GRAD_BOUNDS[dtype])


def best_isa():
    isas = supported_isas()
    if not isas:
        pytest.skip("this CPU runs no instruction set of the SIMD kernels: the chain saves every forward's activations")
    return isas[0]


@pytest.mark.parametrize("dtype", list(BOUNDS), ids=str)
@pytest.mark.parametrize("shape, dim, heads", BACKWARD_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_saved_products_give_the_recomputed_bits(dtype, shape, dim, heads):
    """A training forward keeps its products (u, r, q, dk, mixed) in 10 tensors of the documented
    shape; the backward reading them gives the bits of the one recomputing them (the same code on the
    same values), and reads them only (a retained graph's backward runs again)."""
    isa = best_isa()
    x0, x1, params = make_case(shape, dim, dtype=dtype, seed=3 * dim + len(shape))
    params = list(params)
    op_forward, op_backward = torch.ops.gemini_kernels.simd_forward, torch.ops.gemini_kernels.simd_backward
    y0, y1, gate, none = op_forward(x0, x1, params, heads, isa)
    s0, s1, saved_gate, activations = op_forward(x0, x1, params, heads, isa, True)
    assert none == [] and torch.equal(y0, s0) and torch.equal(y1, s1) and torch.equal(gate, saved_gate)
    pixels = x0.numel() // dim
    assert torch.ops.gemini_kernels.simd_saved_pixel_multiple() == 48
    shape_of = (-(-pixels // 48) * 48, dim)
    assert len(activations) == 10 and all(a.shape == shape_of and a.dtype == dtype for a in activations)
    kept = [a.clone() for a in activations]
    g0, g1 = torch.randn_like(x0), torch.randn_like(x1)
    recomputed = op_backward(g0, g1, x0, x1, params, gate, heads, isa, [])
    for _ in range(2):
        resumed = op_backward(g0, g1, x0, x1, params, gate, heads, isa, activations)
        assert all(torch.equal(a, b) for a, b in zip(recomputed, resumed))
    assert all(torch.equal(a, b) for a, b in zip(activations, kept))
    # A function of the inputs, up to the rounding of the pixels (past the last tile, zeros).
    again = op_forward(x0, x1, params, heads, isa, True)[3]
    assert all(torch.equal(a, b) for a, b in zip(activations, again))


def test_the_public_training_call_saves_and_reads_the_products():
    """At C >= SAVE_ACTIVATIONS_FROM_WIDTH a differentiated forward saves the SIMD forward's products
    (fusion_forward's activations) and the backward reads them: all 16 gradients against the oracle."""
    best_isa()
    dim = cuda_fusion.SAVE_ACTIVATIONS_FROM_WIDTH
    x0, x1, params = make_case((2, 61), dim, dtype=torch.float64, seed=21)
    _, _, _, activations = torch.ops.gemini_kernels.fusion_forward(x0, x1, list(params), 8, True)
    assert len(activations) == 10
    assert cuda_fusion.saves_activations(x0) and not cuda_fusion.saves_activations(x0[..., :dim - 8])

    def public(a, b, p, heads):
        return gemini_fusion(a, b, p, heads, backend="cuda")

    assert_matches_oracle(public, x0, x1, params, 8, BOUNDS[torch.float64], GRAD_BOUNDS[torch.float64])


def test_saved_products_refusals():
    """Activations of the wrong count, shape, dtype or layout, or on an instruction set that is not the
    one that saves them (whose tile may differ), raise naming what was expected."""
    isa = best_isa()
    x0, x1, params = make_case((2, 30), 32, dtype=torch.float32, seed=22)
    params = list(params)
    op_forward, op_backward = torch.ops.gemini_kernels.simd_forward, torch.ops.gemini_kernels.simd_backward
    _, _, gate, activations = op_forward(x0, x1, params, 8, isa, True)
    g0, g1 = torch.randn_like(x0), torch.randn_like(x1)
    with pytest.raises(RuntimeError, match="activations must be empty or the 10 tensors.*got 9"):
        op_backward(g0, g1, x0, x1, params, gate, 8, isa, activations[:9])
    bad = {"shape": activations[3][:-1], "dtype": activations[3].double(), "layout": activations[3].t().contiguous().t()}
    for what, tensor in bad.items():
        given = [*activations[:3], tensor, *activations[4:]]
        with pytest.raises(RuntimeError, match=r"activations\[3\] .*expected a contiguous Float\[96, 32\]"):
            op_backward(g0, g1, x0, x1, params, gate, 8, isa, given)
    # fusion_backward hands a SIMD-shaped list to the SIMD backward, which checks it the same way.
    with pytest.raises(RuntimeError, match=r"activations\[3\]"):
        torch.ops.gemini_kernels.fusion_backward(g0, g1, x0, x1, params, gate,
                                                 [*activations[:3], bad["shape"], *activations[4:]], 8)
    for other in supported_isas()[1:]:
        with pytest.raises(RuntimeError, match=f'saved and read on {isa} only.*isa="{other}"'):
            op_forward(x0, x1, params, 8, other, True)
        with pytest.raises(RuntimeError, match=f'saved and read on {isa} only.*isa="{other}"'):
            op_backward(g0, g1, x0, x1, params, gate, 8, other, activations)


def test_backward_refuses_a_width_the_registers_do_not_divide(isa):
    x0, x1, params = make_case((2, 3), 24, dtype=torch.float32, seed=12)
    _, _, gate, _ = torch.ops.gemini_kernels.simd_forward(x0, x1, list(params), 8, isa)
    op = torch.ops.gemini_kernels.simd_backward
    if 24 % LANES[isa, torch.float32]:
        with pytest.raises(RuntimeError, match=f"multiple of {LANES[isa, torch.float32]}; got 24"):
            op(x0, x1, x0, x1, list(params), gate, 8, isa, [])
    else:
        assert len(op(x0, x1, x0, x1, list(params), gate, 8, isa, [])) == 16
    with pytest.raises(RuntimeError, match="gate"):
        op(x0, x1, x0, x1, list(params), gate[:, :1], 8, isa, [])


def test_the_public_backward_takes_it_and_reruns_bitwise():
    isas = supported_isas()
    x0, x1, params = make_case((2, 60), 64, dtype=torch.float32, seed=13, requires_grad=True)
    if not isas:
        assert not torch.ops.gemini_kernels.takes_simd_backward(x0)
        pytest.skip("this CPU runs no instruction set of the SIMD kernels: the chain runs every backward")
    assert torch.ops.gemini_kernels.takes_simd_backward(x0)
    lanes = LANES[isas[0], torch.float32]
    assert not torch.ops.gemini_kernels.takes_simd_backward(torch.zeros(1, 2 * lanes + lanes // 2))
    leaves = [x0, x1, *params]
    g0, g1 = torch.randn_like(x0), torch.randn_like(x1)

    def public():
        y0, y1 = gemini_fusion(x0, x1, params, 8, backend="cuda")
        return torch.autograd.grad((y0 * g0).sum() + (y1 * g1).sum(), leaves)

    def ops():
        y0, y1 = simd_call(isas[0])(x0, x1, params, 8)
        return torch.autograd.grad((y0 * g0).sum() + (y1 * g1).sum(), leaves)

    first, again, direct = public(), public(), ops()
    for a, b, c in zip(first, again, direct):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_backward_threads_strides_and_what_lies_past_the_last_pixel(isa):
    """The backward on 1, 2 and 3 threads: grad_x bitwise the same (no sum across pixels), the
    parameters' gradients (a set a thread, added in order) within the bounds; strided inputs, upstream
    gradients and parameters give the contiguous ones' bits; and inputs followed in memory by NaN rows
    (a partial last tile) change nothing, so no tile reads past pixel M."""
    dtype, heads = torch.float32, 8
    x0, x1, params = make_case((37,), 64, dtype=dtype, seed=14)
    params = list(params)
    g0, g1 = torch.randn_like(x0), torch.randn_like(x1)
    op_forward, op_backward = torch.ops.gemini_kernels.simd_forward, torch.ops.gemini_kernels.simd_backward
    gate = op_forward(x0, x1, params, heads, isa)[2]
    ref = op_backward(g0, g1, x0, x1, params, gate, heads, isa, [])
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            got = op_backward(g0, g1, x0, x1, params, gate, heads, isa, [])
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), n
            assert all(rel_err(a, b) < GRAD_BOUNDS[dtype] for a, b in zip(got[2:], ref[2:])), n
    finally:
        torch.set_num_threads(threads)

    def strided(t):
        return torch.stack([t, torch.full_like(t, float("nan"))], dim=-1)[..., 0]

    got = op_backward(strided(g0), strided(g1), strided(x0), strided(x1), [strided(p) for p in params], gate,
                      heads, isa, [])  # the gates must be the forward's own, contiguous (checked)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))

    def tailed(t):
        big = torch.full((t.shape[0] + 64, *t.shape[1:]), float("nan"), dtype=t.dtype)
        big[:t.shape[0]] = t
        return big[:t.shape[0]]

    assert all(torch.equal(a, b) for a, b in zip(op_forward(tailed(x0), tailed(x1), params, heads, isa)[:3],
                                                 op_forward(x0, x1, params, heads, isa)[:3]))
    got = op_backward(tailed(g0), tailed(g1), tailed(x0), tailed(x1), params, gate, heads, isa, [])
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_the_public_forward_takes_it_without_activations():
    isas = supported_isas()
    x0, x1, params = make_case((2, 50), 64, dtype=torch.float32, seed=5)
    if not isas:
        assert not torch.ops.gemini_kernels.takes_simd_forward(x0, False)
        pytest.skip("this CPU runs no instruction set of the SIMD forward: the chain runs every forward")
    assert torch.ops.gemini_kernels.takes_simd_forward(x0, False)
    # Saving, only where the SIMD backward takes what it saves.
    assert torch.ops.gemini_kernels.takes_simd_forward(x0, True)
    narrow = x0[..., :24]
    assert torch.ops.gemini_kernels.takes_simd_forward(narrow, False)
    assert torch.ops.gemini_kernels.takes_simd_forward(narrow, True) == (24 % LANES[isas[0], torch.float32] == 0)
    for dtype, dim in ((torch.float16, 64), (torch.bfloat16, 64), (torch.float32, 160)):
        assert not torch.ops.gemini_kernels.takes_simd_forward(torch.zeros(1, dim, dtype=dtype), False)
    y0, y1, gate, none = torch.ops.gemini_kernels.simd_forward(x0, x1, list(params), 8, isas[0])
    assert none == []
    with torch.no_grad():
        got = gemini_fusion(x0, x1, params, 8, backend="cuda")
    assert torch.equal(got[0], y0) and torch.equal(got[1], y1)
    f0, f1, f_gate, _ = torch.ops.gemini_kernels.fusion_forward(x0, x1, list(params), 8, False)
    assert torch.equal(f0, y0) and torch.equal(f1, y1) and torch.equal(f_gate, gate)


def test_capability_narrows_the_instruction_sets():
    """ATEN_CPU_CAPABILITY narrows the kernel's instruction sets as it narrows torch's."""
    code = ("import torch, gemini_kernels.ops.cuda_fusion as f; f.unavailable_reason(torch.device('cpu')); "
            "x = torch.zeros(1, 64); "
            "print(list(torch.ops.gemini_kernels.simd_isas()), torch.ops.gemini_kernels.takes_simd_forward(x))")
    outputs = {}
    for capability in ("default", "avx2"):
        proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ATEN_CPU_CAPABILITY": capability},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        outputs[capability] = proc.stdout.strip().splitlines()[-1]
    assert outputs["default"] == "[] False"
    assert outputs["avx2"] in ("['avx2'] True", "[] False")  # the latter on a CPU without AVX2 and FMA


def test_saved_products_under_the_avx2_capability():
    """Under ATEN_CPU_CAPABILITY=avx2 the best (and saving) instruction set is AVX2, whose tiles are 24
    pixels: its saved products give the recomputed bits too, with the shapes of AVX-512's."""
    code = """
import torch, gemini_kernels.ops.cuda_fusion as f
from gemini_kernels.params import random_params
f.unavailable_reason(torch.device('cpu'))
ops = torch.ops.gemini_kernels
if list(ops.simd_isas()) != ['avx2']:
    print('no avx2')
else:
    g = torch.Generator().manual_seed(0)
    x0, x1, g0, g1 = (torch.randn(2, 37, 32, generator=g) for _ in range(4))
    params = list(random_params(32, dtype=torch.float32, generator=g))
    y0, y1, gate, acts = ops.simd_forward(x0, x1, params, 8, 'avx2', True)
    a = ops.simd_backward(g0, g1, x0, x1, params, gate, 8, 'avx2', [])
    b = ops.simd_backward(g0, g1, x0, x1, params, gate, 8, 'avx2', acts)
    print(len(acts), tuple(acts[0].shape), all(torch.equal(u, v) for u, v in zip(a, b)))
"""
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.strip().splitlines()[-1]
    if out == "no avx2":
        pytest.skip("this CPU has no AVX2 and FMA")
    assert out == "10 (96, 32) True"


def test_refusals_name_the_argument(isa):
    x0, x1, params = make_case((2, 3), 32, dtype=torch.float32, seed=7)
    op = torch.ops.gemini_kernels.simd_forward
    with pytest.raises(RuntimeError, match=r'isa="sse".*expected one of \['):
        op(x0, x1, list(params), 8, "sse")
    with pytest.raises(RuntimeError, match="float32 or float64.*Half"):
        op(x0.half(), x1.half(), [p.half() for p in params], 8, isa)
    with pytest.raises(RuntimeError, match="at most 128 channels.*160"):
        wide0, wide1, wide_params = make_case((2, 3), 160, dtype=torch.float32, seed=7)
        op(wide0, wide1, list(wide_params), 8, isa)
    with pytest.raises(RuntimeError, match="num_heads=5"):
        op(x0, x1, list(params), 5, isa)


@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 64)], ids=str)
def test_empty_inputs(isa, shape):
    """The public call returns empty outputs; the op itself refuses them as fusion_forward does."""
    x0, x1, params = make_case(shape[:-1], 64, dtype=torch.float32, seed=8)
    with torch.no_grad():
        y0, y1 = gemini_fusion(x0, x1, params, 8, backend="cuda")
    assert y0.shape == y1.shape == x0.shape
    with pytest.raises(RuntimeError, match=r"non-empty .* got shape \[" + ", ".join(map(str, shape))):
        torch.ops.gemini_kernels.simd_forward(x0, x1, list(params), 8, isa)


def test_non_contiguous_inputs_and_threads(isa):
    """Strided inputs give the contiguous ones' bits, and so does any thread count: no value depends
    on another pixel."""
    x0, x1, params = make_case((100, 2), 64, dtype=torch.float32, seed=9)
    x0, x1 = x0.transpose(0, 1), x1.transpose(0, 1)
    assert not x0.is_contiguous()
    op = torch.ops.gemini_kernels.simd_forward
    ref = op(x0.contiguous(), x1.contiguous(), list(params), 8, isa)[:3]
    got = op(x0, x1, [p.t().contiguous().t() for p in params], 8, isa)[:3]
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(x0, x1, list(params), 8, isa)[:3]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, ref))


def test_gradcheck_of_the_public_call():
    """float64 gradcheck of the public call, whose forward and backward both run here: every input and
    parameter."""
    x0, x1, params = make_case((2, 3), 16, seed=10, requires_grad=True)
    assert torch.ops.gemini_kernels.takes_simd_forward(x0, False) == bool(supported_isas())
    assert torch.ops.gemini_kernels.takes_simd_backward(x0) == bool(supported_isas())

    def f(a, b, *p):
        return gemini_fusion(a, b, FusionParams(*p), 2, backend="cuda")

    with cuda_fusion.weight_cache_disabled():  # gradcheck perturbs the parameters in place
        assert torch.autograd.gradcheck(f, (x0, x1, *params), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_oracle_agreement_at_a_stage_shape(isa):
    """MiT stage 1 (C = 64, 8 heads) in float32 over two images' worth of tiles of a small map."""
    x0, x1, params = make_case((2, 30 * 40), 64, dtype=torch.float32, seed=11)
    y0, y1 = simd_forward(isa)(x0, x1, params, 8)
    (r0, r1), _ = oracle_float64(x0, x1, params, 8)
    assert max(rel_err(y0, r0), rel_err(y1, r1)) < 1e-6
