"""backend="cuda": the host C++ path on CPU tensors (always), and the CUDA kernels (marked gpu).

Every output and every gradient (x0, x1 and all 14 parameters) is compared with the float64 oracle.
The host path runs the same per-pixel math (csrc/fusion_math.h) as the CUDA kernels. What every fused
backend promises (its declared bounds in every dtype, bitwise reruns, gradcheck, outputs that take
in-place ops, non-contiguous inputs and parameters, autocast, torch.compile, opcheck of its ops,
refused second derivatives and forward-mode AD) is in tests/test_backend_contract.py, in both
backward modes.
"""
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gemini_kernels

from gemini_kernels import FusionParams, GeminiFusion, gemini_fusion
from gemini_kernels.ops import cuda_fusion
from gemini_kernels.reference import gemini_fusion_reference
from helpers import GRAD_NAMES, assert_matches_oracle, make_case, outputs_and_grads, rel_err, upstream_grads


@pytest.fixture(autouse=True, scope="module")
def extension_built():
    # The extension is part of the build (scripts/setup_env.sh); a missing one is a failure, not a skip.
    reason = cuda_fusion.unavailable_reason(torch.device("cpu"))
    if reason is not None:
        pytest.fail(reason)


# The two ways the host backward gets the forward's intermediates: recomputed from the inputs and
# the gates, or read from the activations the forward saved (csrc/fusion_api.h); the library picks
# by width (cuda_fusion.saves_activations), the tests force each.
SAVE_MODES = {"recompute": 1 << 30, "saved": 0}


@pytest.fixture(params=list(SAVE_MODES))
def save_mode(request, monkeypatch):
    monkeypatch.setattr(cuda_fusion, "SAVE_ACTIVATIONS_FROM_WIDTH", SAVE_MODES[request.param])
    return request.param


def cuda_backend(x0, x1, params, heads):
    return gemini_fusion(x0, x1, params, heads, backend="cuda")


# (leading shape, dim, heads): head widths 3, 4, 5, 8, 12, 16, 40, 192; odd pixel counts; several leading dims.
WIDTH_CASES = [
    ((2, 5), 24, 8),
    ((3, 3, 3), 32, 8),
    ((7,), 40, 8),
    ((1, 13), 64, 8),
    ((3,), 96, 8),
    ((5,), 128, 8),
    ((1, 3), 320, 8),
    ((2,), 1536, 8),
    ((9,), 30, 1),
    ((11,), 12, 3),
]


@pytest.mark.parametrize("shape,dim,heads", WIDTH_CASES, ids=lambda v: str(v))
def test_float64_matches_oracle(shape, dim, heads, save_mode):
    x0, x1, params = make_case(shape, dim, requires_grad=True, seed=dim + heads)
    assert_matches_oracle(cuda_backend, x0, x1, params, heads, out_bound=1e-12, grad_bound=1e-11)


@pytest.mark.parametrize("shape,dim", [((2, 37), 64), ((1, 23), 128)], ids=str)
def test_float32_bounds(shape, dim, save_mode):
    x0, x1, params = make_case(shape, dim, dtype=torch.float32, requires_grad=True, seed=3)
    assert_matches_oracle(cuda_backend, x0, x1, params, 8, out_bound=1e-5, grad_bound=1e-4)


@pytest.mark.parametrize("dtype,bound", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)], ids=str)
def test_half_precision_on_host(dtype, bound, save_mode):
    x0, x1, params = make_case((2, 9), 64, dtype=dtype, requires_grad=True, seed=4)
    assert_matches_oracle(cuda_backend, x0, x1, params, 8, out_bound=bound, grad_bound=2 * bound)


# Pixel counts over the host path's tile size (about 1 MiB of intermediates, at least 256 pixels:
# 576 / 400 pixels at C=16 in float64, 288 / 256 at C=64 in float32, forward / backward; then
# evened out over the two threads: 512 / 384, 288 / 224 and 160 here), with a partial last tile:
# the tiles, their offsets and the per-thread gradient sums all take part.
@pytest.mark.parametrize("shape,dim,heads,dtype,out_bound,grad_bound", [
    ((3, 1001), 16, 4, torch.float64, 1e-12, 1e-11),
    ((2, 1111), 64, 8, torch.float32, 1e-5, 1e-4),
    ((1, 300), 128, 8, torch.float64, 1e-12, 1e-11),
], ids=str)
def test_many_tiles_on_two_threads(shape, dim, heads, dtype, out_bound, grad_bound, save_mode):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x0, x1, params = make_case(shape, dim, dtype=dtype, requires_grad=True, seed=8)
        assert_matches_oracle(cuda_backend, x0, x1, params, heads, out_bound=out_bound, grad_bound=grad_bound)
        first = outputs_and_grads(cuda_backend, x0, x1, params, heads)
        second = outputs_and_grads(cuda_backend, x0, x1, params, heads)
        for a, b in zip([*first[0], *first[1]], [*second[0], *second[1]]):
            assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("used", [0, 1], ids=["y0", "y1"])
def test_one_output_unused(used, save_mode):
    x0, x1, params = make_case((5,), 16, requires_grad=True, seed=7)
    inputs = [x0, x1, *params]
    y = gemini_fusion(x0, x1, params, 4, backend="cuda")[used]
    r = gemini_fusion_reference(x0, x1, params, 4)[used]
    grads = torch.autograd.grad(y.square().sum(), inputs)
    ref = torch.autograd.grad(r.square().sum(), inputs, allow_unused=True)
    for name, g, r in zip(GRAD_NAMES, grads, ref):
        r = torch.zeros_like(g) if r is None else r
        assert (g - r).norm() <= 1e-11 * max(r.norm(), 1.0), name


class _OpLog(TorchDispatchMode):
    """The ops dispatched while it is on (factory functions too), as (name, output shapes)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = out if isinstance(out, (list, tuple)) else [out]
        self.ops.append((str(func), [tuple(t.shape) for t in tensors if isinstance(t, torch.Tensor)]))
        return out


def test_the_backward_is_the_extension_op_alone(save_mode):
    """Autograd hands the backward no zero-filled gradients for the gates and the saved activations,
    which nothing reads (as large as the activations: 13 % of a forward + backward at C = 128 on CPU)."""
    x0, x1, params = make_case((2, 7), 32, requires_grad=True, seed=3)
    y0, y1 = cuda_backend(x0, x1, params, 8)
    g0, g1 = upstream_grads(y0, y1, seed=4)
    with _OpLog() as log:
        torch.autograd.grad((y0, y1), [x0, x1, *params], (g0, g1))
    assert [name for name, _ in log.ops] == ["gemini_kernels.fusion_backward.default"], log.ops
    # One output used: the other's gradient is (contiguous) zeros of its shape, and nothing else is made.
    y0, _ = cuda_backend(x0, x1, params, 8)
    with _OpLog() as log:
        torch.autograd.grad(y0, [x0, x1, *params], g0)
    assert [op for op in log.ops if op[0] != "gemini_kernels.fusion_backward.default"] == [
        ("aten.new_zeros.default", [tuple(x1.shape)])], log.ops


def test_module_backend_cuda_matches_torch_backend():
    torch.manual_seed(9)
    fused = GeminiFusion(40, backend="cuda").double()
    plain = GeminiFusion(40, backend="torch").double()
    plain.load_state_dict(fused.state_dict())
    x0, x1 = torch.randn(2, 5, 40, dtype=torch.float64), torch.randn(2, 5, 40, dtype=torch.float64)
    for a, b in zip(fused(x0, x1), plain(x0, x1)):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_saved_activations_match_the_recomputed_ones_and_stay_unwritten(dtype):
    """float64 saves them from the tiled host chain (at C = 136, wider than the SIMD kernels, which save
    their own: test_simd_fusion.py), bfloat16 from the untiled one that the CUDA build shares."""
    x0, x1, params = make_case((2, 333), 136, dtype=dtype, seed=13)
    params = list(params)
    op_forward, op_backward = torch.ops.gemini_kernels.fusion_forward, torch.ops.gemini_kernels.fusion_backward
    y0, y1, gate, none = op_forward(x0, x1, params, 8, False)
    s0, s1, saved_gate, activations = op_forward(x0, x1, params, 8, True)
    assert none == []
    assert torch.equal(y0, s0) and torch.equal(y1, s1) and torch.equal(gate, saved_gate)
    m = x0.numel() // 136
    assert [tuple(a.shape) for a in activations] == [(m, 680), (m, 680), (2, m, 136), (2, m, 136)]
    kept = [a.clone() for a in activations]
    grad_y0, grad_y1 = torch.randn_like(y0), torch.randn_like(y1)
    recomputed = op_backward(grad_y0, grad_y1, x0, x1, params, gate, [], 8)
    # Equal up to the GEMMs' rounding: the forward's tiles and the backward's differ in length.
    bound = 1e-13 if dtype == torch.float64 else 1e-2
    for _ in range(2):  # as autograd runs a retained graph's backward again
        resumed = op_backward(grad_y0, grad_y1, x0, x1, params, gate, activations, 8)
        for name, a, b in zip(GRAD_NAMES, recomputed, resumed):
            assert rel_err(b, a) <= bound, name
    for a, b in zip(activations, kept):
        assert torch.equal(a, b)


def test_retained_graph_backward_twice_with_saved_activations(monkeypatch):
    monkeypatch.setattr(cuda_fusion, "SAVE_ACTIVATIONS_FROM_WIDTH", 0)
    x0, x1, params = make_case((4, 9), 32, requires_grad=True, seed=14)
    inputs = [x0, x1, *params]
    y0, y1 = cuda_backend(x0, x1, params, 8)
    loss = (y0 * y1).sum()
    first = torch.autograd.grad(loss, inputs, retain_graph=True)
    second = torch.autograd.grad(loss, inputs)
    for name, a, b in zip(GRAD_NAMES, first, second):
        assert torch.equal(a, b), name


def test_activations_are_saved_only_for_a_differentiated_wide_cpu_forward(monkeypatch):
    calls = []
    real_forward = torch.ops.gemini_kernels.fusion_forward

    def spy(x0, x1, params, num_heads, save_activations):
        calls.append(save_activations)
        return real_forward(x0, x1, params, num_heads, save_activations)

    monkeypatch.setattr(cuda_fusion, "SAVE_ACTIVATIONS_FROM_WIDTH", 32)
    monkeypatch.setattr(torch.ops.gemini_kernels, "fusion_forward", spy)
    for dim, grad, expected in ((16, True, False), (32, True, True), (32, False, False)):
        x0, x1, params = make_case((2, 3), dim, requires_grad=grad, seed=dim)
        cuda_backend(x0, x1, params, 8)
        with torch.no_grad():
            cuda_backend(x0, x1, params, 8)
        assert calls == [expected, False], (dim, grad)
        calls.clear()
    assert not cuda_fusion.saves_activations(torch.empty(2, 1024, device="meta"))


def test_unavailable_reasons(monkeypatch):
    assert "CPU and CUDA tensors only" in cuda_fusion.unavailable_reason(torch.device("meta"))
    if not cuda_fusion._has_cuda_kernels():
        assert "without CUDA kernels" in cuda_fusion.unavailable_reason(torch.device("cuda"))
    # Without the compiled module: the reason says how to build it, and the backend raises it.
    monkeypatch.setattr(cuda_fusion, "_loaded", False)
    monkeypatch.setattr(cuda_fusion, "_load_error", None)
    monkeypatch.setenv("GK_NO_JIT_BUILD", "1")  # else the first use would compile the extension
    monkeypatch.setitem(sys.modules, "gemini_kernels._C", None)
    monkeypatch.delattr(gemini_kernels, "_C")
    reason = cuda_fusion.unavailable_reason(torch.device("cpu"))
    assert "pip install --no-build-isolation -e ." in reason
    x0, x1, params = make_case((2,), 8)
    with pytest.raises(RuntimeError, match="no-build-isolation"):
        gemini_fusion(x0, x1, params, 2, backend="cuda")


@pytest.mark.parametrize("entry", ["gemini_fusion", "backend", "raw op"])
def test_forward_mode_ad_names_what_is_unsupported(entry):
    x0, x1, params = make_case((2, 3), 16, seed=22)
    calls = {
        "gemini_fusion": lambda a: gemini_fusion(a, x1, params, 4, backend="cuda")[0],
        "backend": lambda a: cuda_fusion.fusion(a, x1, params, 4)[0],
        "raw op": lambda a: torch.ops.gemini_kernels.fusion_forward(a, x1, list(params), 4)[0],
    }
    f = calls[entry]
    tangent = torch.randn_like(x0)
    # Named as the caller named it; the module and the raw op name what runs on CPU tensors.
    name = "cuda" if entry == "gemini_fusion" else "cpu_cpp"
    with pytest.raises(RuntimeError, match=f"backend='{name}' has no forward-mode derivative.*torch.func"):
        torch.func.jvp(f, (x0,), (tangent,))
    import torch.autograd.forward_ad as forward_ad

    with forward_ad.dual_level(), pytest.raises(RuntimeError, match="no forward-mode derivative.*dual tensors"):
        f(forward_ad.make_dual(x0, tangent))


@pytest.mark.parametrize("save", [False, True], ids=["recompute", "saved"])
def test_raw_op_is_differentiable(save):
    """torch.ops.gemini_kernels.fusion_forward has an autograd formula: its gradients are the oracle's."""
    x0, x1, params = make_case((3, 4), 16, requires_grad=True, seed=23)
    inputs = [x0, x1, *params]
    y0, y1, gate, activations = torch.ops.gemini_kernels.fusion_forward(x0, x1, list(params), 4, save)
    assert not gate.requires_grad and not any(a.requires_grad for a in activations)
    g0, g1 = upstream_grads(y0, y1, seed=24)
    grads = torch.autograd.grad((y0 * g0).sum() + (y1 * g1).sum(), inputs)
    r0, r1 = gemini_fusion_reference(x0, x1, params, 4)
    ref = torch.autograd.grad((r0 * g0).sum() + (r1 * g1).sum(), inputs)
    for name, g, r in zip(GRAD_NAMES, grads, ref):
        assert rel_err(g, r) < 1e-11, name


def _row_stage_capabilities():
    """The CPU capabilities the host row stages are compiled for (csrc/fusion_host.cpp): the x86-64
    baseline, and AVX2+FMA where the CPU has them (AVX512 machines run the AVX2 code)."""
    caps = ["default"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        caps.append("avx2")
    return caps


@pytest.mark.parametrize("capability", _row_stage_capabilities())
def test_numerics_follow_the_oracle_on_every_capability(capability):
    """Products are rounded before they are summed, as in the oracle (no fma contraction): float32
    near overflow gives the NaN of inf - inf, and a saturated relation softmax float64 gradients of
    ~1e-129, not fma rounding residue of ~1e-16 (before the fix, on AVX2: 22 finite gates, and
    relative errors of 1e112)."""
    import json
    import os
    import subprocess
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability,
               PYTHONPATH=os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(tests / "numerics_probe.py")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["capability"] == ("DEFAULT" if capability == "default" else "AVX2")
    assert out["overflow_heads"] > 50, out  # the case must exercise the overflow
    assert out["overflow_heads_not_nan"] == 0, out
    bad = {k: v for k, v in out["saturated"].items() if not (v[0] < 1e-9 and 1e-135 < v[2] < 1e-120)}
    assert not bad, f"[rel. error, max |ours|, max |oracle|] off: {bad}"


@pytest.fixture
def weight_cache():
    cuda_fusion.clear_weight_cache()
    yield cuda_fusion.weight_cache_info
    cuda_fusion.clear_weight_cache()


# The forwards below go through the packed weights: at C = 160 the tiled chain runs every forward (up
# to C = 128 the SIMD forward, where the CPU has one, reads the parameters as they are), at C = 320
# the untiled chain.
@pytest.mark.parametrize("dim", [160, 320], ids=["tiled", "untiled"])
def test_weights_are_packed_once_per_parameter_version(dim, weight_cache):
    x0, x1, params = make_case((2, 3), dim, requires_grad=True, seed=41)
    cuda_backend(x0, x1, params, 8)
    assert weight_cache()["misses"] == 1
    y0, y1 = cuda_backend(x0, x1, params, 8)
    (y0 * y1).sum().backward()  # the backward packs nothing either
    info = weight_cache()
    assert (info["misses"], info["hits"]) == (1, 2), info
    # An in-place update of any one parameter bumps its version: packed again, and right.
    for i in (0, 6, 13):
        with torch.no_grad():
            params[i].mul_(1.5)
        assert_matches_oracle(cuda_backend, x0, x1, params, 8, 1e-12, grads=False, note=f"{GRAD_NAMES[2 + i]}: ")
    assert weight_cache()["misses"] == 4


def test_weight_cache_after_optimizer_steps_and_fresh_parameters(weight_cache):
    torch.manual_seed(42)
    module = GeminiFusion(160, num_heads=8, backend="cuda").double()
    with torch.no_grad():  # non-zero biases and noises
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    opt = torch.optim.SGD(module.parameters(), lr=0.5, momentum=0.9)
    x0, x1, _ = make_case((2, 5), 160, seed=43)
    for _ in range(3):
        y0, y1 = module(x0, x1)
        (y0 * y1).sum().backward()
        opt.step()
        opt.zero_grad()
        r0, _ = gemini_fusion_reference(x0, x1, FusionParams.from_state_dict(module.state_dict()), 8)
        assert rel_err(module(x0, x1)[0], r0) < 1e-12
    # Parameters freed and new ones made in their place (the allocator may hand out the same
    # addresses, with version 0 again): never a stale hit.
    for seed in range(3):
        _, _, params = make_case((2, 5), 160, seed=44 + seed)
        assert_matches_oracle(cuda_backend, x0, x1, params, 8, 1e-12, grads=False)
        del params


def test_writes_past_the_version_counter_need_the_cache_cleared_or_off(weight_cache):
    x0, x1, params = make_case((2, 5), 320, seed=46)
    assert_matches_oracle(cuda_backend, x0, x1, params, 8, 1e-12, grads=False)
    params[6].data.mul_(1.5)  # .data has a version counter of its own
    cuda_fusion.clear_weight_cache()
    assert_matches_oracle(cuda_backend, x0, x1, params, 8, 1e-12, grads=False)
    with cuda_fusion.weight_cache_disabled():
        params[6].data.mul_(1.5)
        assert_matches_oracle(cuda_backend, x0, x1, params, 8, 1e-12, grads=False)
        assert weight_cache()["entries"] == 0
    assert torch.ops.gemini_kernels.set_weight_cache_enabled(True)  # restored


def test_inference_tensors_are_not_cached(weight_cache):
    with torch.inference_mode():
        x0, x1, params = make_case((2, 5), 320, seed=45)
        assert_matches_oracle(cuda_backend, x0, x1, params, 8, 1e-12, grads=False)
        params[2].mul_(2.0)  # inference tensors have no version counter: nothing could see this
        assert_matches_oracle(cuda_backend, x0, x1, params, 8, 1e-12, grads=False)
    info = weight_cache()
    assert info["uncached"] == 2 and info["entries"] == 0, info


def test_the_extension_reads_the_parameter_table_of_params_py():
    """csrc/fusion_params.h and params.py's table: the same names, order and shapes."""
    from gemini_kernels.params import PARAM_NAMES, param_shapes

    assert tuple(torch.ops.gemini_kernels.param_names()) == PARAM_NAMES
    for dim in (1, 24, 320):
        flat, shapes = list(torch.ops.gemini_kernels.param_shapes(dim)), []
        while flat:
            rank, flat = flat[0], flat[1:]
            shapes.append(tuple(flat[:rank]))
            flat = flat[rank:]
        assert shapes == list(param_shapes(dim).values()), dim


# ---- GPU: the CUDA kernels ----------------------------------------------------------------------

BOUNDS = gemini_kernels.backends.BACKENDS["cuda"].bounds  # the backend's declared bounds
# NYUDv2 480x640 stages (SPEC §4) at batch 2, and odd shapes (odd pixel counts, head widths 3 to 192).
GPU_CASES = [
    ((2, 19200), 64, 8),
    ((2, 4800), 128, 8),
    ((2, 1200), 320, 8),
    ((2, 300), 512, 8),
    ((3, 1001), 24, 8),
    ((7, 33), 40, 8),
    ((1, 257), 96, 8),
    ((5,), 1536, 8),
]


@pytest.fixture
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(BOUNDS), ids=str)
@pytest.mark.parametrize("shape,dim,heads", GPU_CASES, ids=str)
def test_gpu_matches_oracle(shape, dim, heads, dtype, no_tf32):
    reason = cuda_fusion.unavailable_reason(torch.device("cuda"))
    if reason is not None:
        pytest.fail(reason)
    x0, x1, params = make_case(shape, dim, dtype=dtype, device="cuda", requires_grad=True, seed=dim)
    bound = BOUNDS[dtype]
    assert_matches_oracle(cuda_backend, x0, x1, params, heads, out_bound=bound, grad_bound=bound)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_gpu_saved_activations_match_the_oracle(monkeypatch, dtype, no_tf32):
    """The op's save_activations path on CUDA, which the library leaves off there by default."""
    monkeypatch.setattr(cuda_fusion, "saves_activations", lambda x0: True)
    x0, x1, params = make_case((2, 1200), 320, dtype=dtype, device="cuda", requires_grad=True, seed=16)
    bound = BOUNDS[dtype]
    assert_matches_oracle(cuda_backend, x0, x1, params, 8, out_bound=bound, grad_bound=bound)


@pytest.mark.gpu
def test_gpu_autocast_follows_the_oracle():
    x0, x1, params = make_case((2, 300), 64, dtype=torch.float32, device="cuda", seed=3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y0, y1 = gemini_fusion(x0, x1, params, 8, backend="cuda")
        r0, r1 = gemini_fusion_reference(x0, x1, params, 8)
    assert y0.dtype == r0.dtype == torch.float32
    assert rel_err(y0, r0) < 2e-2 and rel_err(y1, r1) < 2e-2


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda x0, x1, p, h: (x0, x1[:-1], p, h), r"x1 has shape \[2, 16\] but x0 has \[3, 16\]"),
        (lambda x0, x1, p, h: (x0, x1.float(), p, h), "x1 has dtype Float but x0 has Double"),
        (lambda x0, x1, p, h: (x0, x1, p, 3), "num_heads=3 must be positive and divide the channel count C=16"),
        (lambda x0, x1, p, h: (x0, x1, [*p[:6], p[6][:-1], *p[7:]], h),
         r"params\['cross_attn_0_to_1.in_proj_weight'\] has shape \[47, 16\]; expected \[48, 16\]"),
        (lambda x0, x1, p, h: (x0, x1, [*p[:4], p[4].float(), *p[5:]], h), r"params\['k_noise.weight'\] is Float"),
        (lambda x0, x1, p, h: (x0.long(), x1.long(), p, h), "x0 must be a floating-point tensor"),
        (lambda x0, x1, p, h: (x0[0, 0], x1[0, 0], p, h), r"x0 must be a non-empty \(..., C\) tensor; got shape \[\]"),
        (lambda x0, x1, p, h: (x0[:0], x1[:0], p, h), r"x0 must be a non-empty \(..., C\) tensor; got shape \[0, 16\]"),
    ],
    ids=["x1 shape", "x1 dtype", "heads", "param shape", "param dtype", "integer input", "0-d input", "empty input"],
)
def test_ops_called_directly_validate_their_arguments(mutate, fragment):
    """torch.ops.gemini_kernels.fusion_forward is public: bad arguments raise before any kernel runs."""
    x0, x1, params = make_case((3,), 16)
    with pytest.raises(RuntimeError, match=fragment):
        torch.ops.gemini_kernels.fusion_forward(*mutate(x0, x1, list(params), 4))


def test_backward_op_checks_the_gate():
    x0, x1, params = make_case((3,), 16)
    y0, y1, gate, _ = torch.ops.gemini_kernels.fusion_forward(x0, x1, list(params), 4)
    for bad in (gate.to(torch.float32), gate.flatten()[:-1]):
        with pytest.raises(RuntimeError, match="gate must be the third output of fusion_forward"):
            torch.ops.gemini_kernels.fusion_backward(y0, y1, x0, x1, list(params), bad, [], 4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("mutate, fragment", [
    (lambda a: a[:3], "activations must be empty or the 4 tensors"),
    (lambda a: [a[0][:-1], *a[1:]], r"activations\[0\] \(g0\) is \w+\[2, 680\]"),
    (lambda a: [*a[:2], a[2].float() if a[2].dtype != torch.float32 else a[2].double(), a[3]],
     r"activations\[2\] \(z\) is"),
    (lambda a: [*a[:3], a[3].transpose(1, 2).contiguous().transpose(1, 2)], r"activations\[3\] \(dk\).*not contiguous"),
], ids=["count", "shape", "dtype", "layout"])
def test_backward_op_checks_the_activations(mutate, fragment, dtype):
    """The chain's activations (C = 136: the SIMD kernels' own are tested in test_simd_fusion.py)."""
    x0, x1, params = make_case((3,), 136, dtype=dtype)
    y0, y1, gate, activations = torch.ops.gemini_kernels.fusion_forward(x0, x1, list(params), 4, True)
    with pytest.raises(RuntimeError, match=fragment):
        torch.ops.gemini_kernels.fusion_backward(y0, y1, x0, x1, list(params), gate, mutate(activations), 4)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dim,heads", [((2, 5), 24, 8), ((7,), 40, 4)], ids=str)
def test_gpu_gradcheck_float64(shape, dim, heads):
    """The CUDA kernels (warp reductions in double included) under gradcheck, every input and parameter."""
    x0, x1, params = make_case(shape, dim, device="cuda", requires_grad=True, seed=dim)

    def f(x0, x1, *params):
        return cuda_backend(x0, x1, FusionParams(*params), heads)

    with cuda_fusion.weight_cache_disabled():  # gradcheck perturbs the parameters through .data
        assert torch.autograd.gradcheck(f, (x0, x1, *params), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_gradient_assembly_op_checks_its_parts():
    """torch.ops.gemini_kernels.assemble_gradients (the chain backward's last launch) reads raw pointers:
    a part of the wrong size, dtype or layout is refused, naming it, instead of read out of bounds."""
    C = 8
    sizes = [5 * C * C] * 2 + [5 * C] * 2 + [C * C, C, C, C] + [C * C] * 4 + [C, C, 2 * C * C, 2 * C]
    parts = [torch.randn(n, dtype=torch.float64) for n in sizes]
    grads = torch.ops.gemini_kernels.assemble_gradients(parts, C)
    assert [tuple(g.shape) for g in grads] == [tuple(s) for s in gemini_kernels.params.param_shapes(C).values()]
    bad = {
        "short": (parts[:3] + [parts[3][:-1]] + parts[4:], r"part 3 must have 40 elements for channels=8; got Double\[39\]"),
        "dtype": (parts[:5] + [parts[5].float()] + parts[6:], r"part 5 must have 8 elements"),
        "strided": (parts[:14] + [parts[14].view(2 * C, C).t().reshape(-1)[::1].view(C, 2 * C).t()] + parts[15:],
                    r"part 14 must have 128 elements.*not contiguous"),
        "count": (parts[:-1], r"assemble_gradients takes 16 tensors; got 15"),
    }
    for name, (args, fragment) in bad.items():
        with pytest.raises(RuntimeError, match=fragment):
            torch.ops.gemini_kernels.assemble_gradients(args, C)


def test_a_refusal_names_the_transform_that_wraps_the_inputs():
    """vmap over the inputs inside grad over an unrelated scalar: the inputs are batched, not
    differentiated, and the message says vmap."""
    x0, x1, params = make_case((3, 2), 16, seed=29)
    scale = torch.tensor(2.0, dtype=x0.dtype)

    def loss(s):
        return (s * torch.vmap(lambda a, b: cuda_backend(a, b, params, 4)[0])(x0, x1)).sum()

    with pytest.raises(RuntimeError, match="does not run under torch.func.vmap"):
        torch.func.grad(loss)(scale)
