"""What every fused backend promises, one suite over the backends available on this machine's device
(on CPU: the Triton kernels under the interpreter and the extension's host path, cpu_cpp; on a GPU the
Triton and CUDA kernels), each held to the bounds it declares (``Backend.bounds``). A backend's own files test its
own paths, shapes and entry points (tests/test_triton.py, tests/test_cuda_host.py).

A backend with more than one way to run its backward is tested in each: the compiled extension either
recomputes the forward's GEMM outputs or saves them (``cuda_fusion.SAVE_ACTIVATIONS_FROM_WIDTH``).

The promises: outputs and all 16 gradients within the declared bounds in every dtype (the one statement
of that comparison, shared with the backends' own files, is tests/helpers.py: assert_matches_oracle),
gradcheck, bitwise reruns, outputs that are not views and take in-place ops under autograd, non-contiguous
inputs and parameters, autocast as the oracle's, torch.compile(fullgraph=True) as eager, opcheck of the
custom ops, and refused second derivatives and forward-mode AD. Shapes are tiny: on CPU the Triton
kernels run under the interpreter.
"""
import contextlib

import pytest
import torch

import gemini_kernels as gk
from gemini_kernels import FusionParams, GeminiFusion, gemini_fusion, gemini_fusion_reference
from helpers import (GRAD_NAMES, assert_matches_oracle, make_case, oracle_float64, outputs_and_grads, randomise_,
                     rel_err, upstream_grads)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FUSED = [name for name in gk.available_backends(DEVICE) if name != "torch"]
# The CUDA extension's backward modes: the threshold width from which its forward saves activations.
_CUDA_MODES = {"recompute": 1 << 30, "saved": 0}
_EXTENSION = ".ops.cuda_fusion"  # the compiled extension's module: backends "cuda" and "cpu_cpp"
VARIANTS = [pytest.param((name, mode), id=name if mode is None else f"{name}-{mode}")
            for name in FUSED
            for mode in (_CUDA_MODES if gk.backends.BACKENDS[name].module == _EXTENSION else (None,))]


@pytest.fixture(params=VARIANTS)
def backend(request, monkeypatch):
    """The backend's name, in the backward mode of the parameter."""
    name, mode = request.param
    if mode is not None:
        from gemini_kernels.ops import cuda_fusion

        monkeypatch.setattr(cuda_fusion, "SAVE_ACTIVATIONS_FROM_WIDTH", _CUDA_MODES[mode])
    return name


def _bounds(backend):
    return gk.backends.BACKENDS[backend].bounds


def _module(backend):
    """The backend's module, by which the per-backend tables below are keyed."""
    return gk.backends.BACKENDS[backend].module


def _parameters_writable_by_gradcheck(backend):
    """A context in which gradcheck may perturb the parameters in place (through ``.data``, which no
    version counter sees): the compiled extension's packed-weight cache off, else nothing."""
    return getattr(gk.backends.BACKENDS[backend].load(), "weight_cache_disabled", contextlib.nullcontext)()


_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _dtype_id(dtype):
    return str(dtype).replace("torch.", "")


@pytest.mark.parametrize("dtype", _DTYPES, ids=_dtype_id)
def test_outputs_and_every_gradient_within_the_declared_bounds(backend, dtype):
    """Outputs and all 16 gradients against the float64 oracle's, within the bounds the backend
    declares (``Backend.bounds``: what the benchmark's guard applies too), on odd pixel counts
    and a leading dimension; the key bias's gradient exactly zero."""
    x0, x1, params = make_case((2, 5), 40, dtype=dtype, device=DEVICE, requires_grad=True, seed=40)
    assert_matches_oracle(backend, x0, x1, params, 8, _bounds(backend)[dtype], seed=3)


def _assert_a_rerun_is_bitwise_equal(backend, x0, x1, params, seed):
    first_y, first_g = outputs_and_grads(backend, x0, x1, params, 8, seed=seed)
    second_y, second_g = outputs_and_grads(backend, x0, x1, params, 8, seed=seed)
    for name, a, b in zip(("y0", "y1", *GRAD_NAMES), [*first_y, *first_g], [*second_y, *second_g]):
        assert torch.equal(a, b), name


def test_reruns_give_bitwise_equal_outputs_and_gradients(backend):
    """Weight gradients summed in a fixed order (no float atomics): a rerun is bitwise the same."""
    x0, x1, params = make_case((3, 17), 64, dtype=torch.float32, device=DEVICE, requires_grad=True, seed=6)
    _assert_a_rerun_is_bitwise_equal(backend, x0, x1, params, seed=3)


@pytest.mark.gpu
@pytest.mark.parametrize("shape, dim", [((2, 19200), 64), ((2, 4800), 128), ((2, 1200), 320)], ids=str)
def test_gpu_reruns_give_bitwise_equal_outputs_and_gradients(backend, shape, dim):
    """At NYUDv2 stage shapes in bfloat16, where many programs / blocks share each weight gradient."""
    x0, x1, params = make_case(shape, dim, dtype=torch.bfloat16, device=DEVICE, requires_grad=True, seed=dim)
    _assert_a_rerun_is_bitwise_equal(backend, x0, x1, params, seed=7)


def test_gradcheck_float64(backend):
    """Numerical derivatives against the hand-written backward, every input and parameter (the full
    Jacobian: a layer of C = 4, two heads of width 2)."""
    x0, x1, params = make_case((3,), 4, device=DEVICE, requires_grad=True, seed=5)

    def f(a, b, *ps):
        return gemini_fusion(a, b, FusionParams(*ps), 2, backend=backend)

    with _parameters_writable_by_gradcheck(backend):
        assert torch.autograd.gradcheck(f, (x0, x1, *params), eps=1e-6, atol=1e-7, rtol=1e-6)


# (C, dtype): the Triton forward paths (narrow, tiled, split: configs.forward_path), and the extension's
# host chain tiled (float32 / float64 under C = 256: C = 24) and not (C = 320, the 16-bit dtypes).
_IN_PLACE_CASES = [(16, torch.bfloat16), (40, torch.float16), (24, torch.float64), (320, torch.float64)]


@pytest.mark.parametrize("inplace", ["add", "relu"])
@pytest.mark.parametrize("dim, dtype", _IN_PLACE_CASES, ids=[f"{d}-{_dtype_id(t)}" for d, t in _IN_PLACE_CASES])
def test_outputs_are_not_views_and_take_in_place_ops_under_autograd(backend, dim, dtype, inplace):
    """As the oracle's: ``y0 += x0`` or ``relu_(y1)`` under autograd works (a view of an internal (M, C)
    tensor would raise "returns multiple views"), and all 16 gradients are the oracle's."""
    x0, x1, params = make_case((2, 3), dim, dtype=dtype, device=DEVICE, requires_grad=True, seed=25)

    def grads(fn, leaves):
        y0, y1 = fn(leaves[0], leaves[1], FusionParams(*leaves[2:]), 8)
        assert y0._base is None and y1._base is None
        if inplace == "add":
            y0 += leaves[0]
        else:
            torch.relu_(y1)
        return torch.autograd.grad((y0.double() * y1.double()).sum(), leaves)

    got = grads(lambda *args: gemini_fusion(*args, backend=backend), [x0, x1, *params])
    ref = grads(gemini_fusion_reference, [t.detach().double().requires_grad_() for t in (x0, x1, *params)])
    bound = _bounds(backend)[dtype]
    errors = {name: rel_err(g, r) for name, g, r in zip(GRAD_NAMES, got, ref)}
    bad = {name: e for name, e in errors.items() if not e < bound}
    assert not bad, f"rel_err over {bound:.0e}: {bad}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_dtype_id)
def test_non_contiguous_inputs_and_params_and_leading_dims(backend, dtype):
    """Three leading dimensions, x0 with permuted strides, x1 every other element of a wider buffer,
    the 2-D parameters column-major: the same outputs as contiguous copies, bitwise, and outputs and
    all 16 gradients within the declared bounds."""
    x0, x1, params = make_case((3, 2, 5), 40, dtype=dtype, device=DEVICE, seed=3)
    t0 = x0.transpose(0, 2).contiguous().transpose(0, 2)
    t1 = x1.new_empty(*x1.shape[:-1], 80)[..., ::2].copy_(x1)  # last dim strided
    tp = FusionParams(*(p.t().contiguous().t() if p.dim() == 2 else p for p in params))
    assert not t0.is_contiguous() and not t1.is_contiguous() and t1.stride(-1) == 2
    assert not tp.fc1_weight.is_contiguous() and not tp.in_proj_weight_0.is_contiguous()
    ref = gemini_fusion(x0, x1, params, 8, backend=backend)
    out = gemini_fusion(t0, t1, tp, 8, backend=backend)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    assert_matches_oracle(backend, t0, t1, tp, 8, _bounds(backend)[dtype], seed=3)


def test_autocast_follows_the_oracle(backend):
    """Under bfloat16 autocast: float32 outputs, as the oracle's under autocast, computed in bfloat16
    (not the float32 oracle's to 1e-6), and float32 gradients."""
    x0, x1, params = make_case((2, 7), 64, dtype=torch.float32, device=DEVICE, seed=11)
    leaves = [t.detach().requires_grad_() for t in (x0, x1, *params)]
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y0, y1 = gemini_fusion(leaves[0], leaves[1], FusionParams(*leaves[2:]), 8, backend=backend)
        r0, r1 = gemini_fusion_reference(x0, x1, params, 8)
    assert y0.dtype == y1.dtype == r0.dtype == r1.dtype == torch.float32
    (d0, d1), _ = oracle_float64(x0, x1, params, 8)
    assert rel_err(y0, d0) < 2e-2 and rel_err(y1, d1) < 2e-2
    assert rel_err(y0, d0) > 1e-6  # the products really ran in bfloat16
    assert rel_err(y0, r0) < 2e-2 and rel_err(y1, r1) < 2e-2
    (y0.sum() + y1.sum()).backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in leaves)


def test_torch_compile_fullgraph_matches_eager_bitwise(backend):
    """No graph break (fullgraph=True raises on one); the compiled forward and backward of a module
    give bitwise what eager ones do. The aot_eager backend traces exactly what inductor would,
    without needing a C++ toolchain."""
    torch._dynamo.reset()
    module = GeminiFusion(16, num_heads=4, backend=backend).to(DEVICE)
    randomise_(module, seed=12)
    x0, x1, _ = make_case((2, 5), 16, dtype=torch.float32, device=DEVICE, requires_grad=True, seed=12)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    leaves = [x0, x1, *module.parameters()]
    y0, y1 = compiled(x0, x1)
    e0, e1 = module(x0, x1)
    assert torch.equal(y0, e0) and torch.equal(y1, e1)
    compiled_grads = torch.autograd.grad((y0 * y1).sum(), leaves)
    eager_grads = torch.autograd.grad((e0 * e1).sum(), leaves)
    for name, a, b in zip(("x0", "x1", *(n for n, _ in module.named_parameters())), compiled_grads, eager_grads):
        assert torch.equal(a, b), name


def _triton_op_calls(inputs, heads):
    from gemini_kernels.ops import triton_fusion

    x0, x1, *params = inputs
    x0_, x1_, *params_ = (t.detach() for t in inputs)
    gy0, gy1 = upstream_grads(x0_, x1_, seed=2)
    return [(triton_fusion.fusion_fwd_op, (x0, x1, params, heads)),
            (triton_fusion.fusion_bwd_op, (gy0, gy1, x0_, x1_, params_, heads))]


def _extension_op_calls(inputs, heads):
    """The forward op with the activations saved or not, as the backward mode of the backend fixture
    has it, and the backward op on the forward's gate and activations."""
    from gemini_kernels.ops import cuda_fusion

    x0, x1, *params = inputs
    x0_, x1_, *params_ = (t.detach() for t in inputs)
    save = x0.shape[-1] >= cuda_fusion.SAVE_ACTIVATIONS_FROM_WIDTH
    y0, y1, gate, activations = torch.ops.gemini_kernels.fusion_forward(x0_, x1_, params_, heads, save)
    # The SIMD forward's products (test_simd_fusion.py) or the chain's GEMM outputs.
    assert len(activations) == (0 if not save else 10 if torch.ops.gemini_kernels.takes_simd_forward(x0_, True) else 4)
    gy0, gy1 = upstream_grads(y0, y1, seed=2)
    return [(torch.ops.gemini_kernels.fusion_forward.default, (x0, x1, params, heads, save)),
            (torch.ops.gemini_kernels.fusion_backward.default,
             (gy0, gy1, x0_, x1_, params_, gate, activations, heads))]


# The custom ops each backend's module runs, keyed by the module: ([x0, x1, *params], heads) -> [(op, args)],
# the forward's inputs requiring grad (opcheck then checks its autograd registration), the backward's not.
_OP_CALLS = {".ops.triton_fusion": _triton_op_calls, ".ops.cuda_fusion": _extension_op_calls}


def test_custom_ops_pass_opcheck(backend):
    """Schemas, fake (meta) kernels, autograd registration and torch.compile tracing of the backend's ops."""
    x0, x1, params = make_case((2, 3), 16, device=DEVICE, requires_grad=True, seed=10)
    for op, args in _OP_CALLS[_module(backend)]([x0, x1, *params], 4):
        torch.library.opcheck(op, args)


def test_second_derivatives_raise(backend):
    """The backward is not itself differentiable: asking for it raises, instead of returning zeros."""
    x0, x1, params = make_case((2, 3), 16, device=DEVICE, requires_grad=True, seed=17)
    y0, y1 = gemini_fusion(x0, x1, params, 4, backend=backend)
    (grad_x0,) = torch.autograd.grad((y0 * y1).sum(), [x0], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad_x0.sum().backward()


def test_a_gradient_penalty_raises_instead_of_a_wrong_gradient(backend):
    """create_graph=True, then a loss on the gradient: the second derivative is not available, so it
    raises (a once_differentiable backward would have run and returned a gradient ~100 % wrong)."""
    x0, x1, params = make_case((2, 5), 16, device=DEVICE, requires_grad=True, seed=21)
    y0, y1 = gemini_fusion(x0, x1, params, 4, backend=backend)
    (grad_x0,) = torch.autograd.grad(y0.sum(), x0, create_graph=True)  # upstream gradient: no grad of its own
    penalty = (y0 * y1).sum() + grad_x0.square().sum()
    with pytest.raises(RuntimeError, match="cannot differentiate twice"):
        torch.autograd.grad(penalty, [x0, *params])


@pytest.mark.parametrize("transform", ["grad", "vjp", "vmap"])
def test_torch_func_transforms_raise_naming_them(backend, transform):
    """The kernels have no torch.func rules: under grad / vjp / vmap the call raises naming the
    transform, where torch raised internal errors (a missing HigherOrderOperator kernel, the
    setup_context requirement, a missing batching rule)."""
    x0, x1, params = make_case((2, 3), 16, device=DEVICE, seed=23)

    def f(a, b):
        return gemini_fusion(a, b, params, num_heads=4, backend=backend)[0]

    run = {"grad": lambda: torch.func.grad(lambda a: f(a, x1).sum())(x0),
           "vjp": lambda: torch.func.vjp(lambda a: f(a, x1), x0),
           "vmap": lambda: torch.vmap(f)(x0, x1)}[transform]
    name = "torch.func.vmap" if transform == "vmap" else "reverse-mode transform"
    with pytest.raises(RuntimeError, match=f"backend='{backend}' does not run under .*{name}"):
        run()
    # A call on constants only, inside the same transform, runs (below it, untransformed).
    scale = torch.randn((), device=DEVICE, dtype=x0.dtype)
    ref = gemini_fusion(x0, x1, params, num_heads=4, backend="torch")[0]
    if transform == "vmap":
        out = torch.vmap(lambda s: s * f(x0, x1))(scale.expand(3))
        assert rel_err(out, scale * ref.expand(3, *ref.shape)) < 1e-5
    else:
        g = torch.func.grad(lambda s: (s * f(x0, x1)).sum())(scale)
        assert rel_err(g, ref.sum()) < 1e-5


def test_forward_mode_ad_raises_instead_of_a_zero_tangent(backend):
    x0, x1, params = make_case((3,), 16, device=DEVICE, seed=22)
    tangent = torch.randn_like(x0)

    def f(a):
        return gemini_fusion(a, x1, params, num_heads=4, backend=backend)[0]

    with pytest.raises(RuntimeError, match=f"backend='{backend}' has no forward-mode derivative"):
        torch.func.jvp(f, (x0,), (tangent,))
    import torch.autograd.forward_ad as forward_ad

    with forward_ad.dual_level(), pytest.raises(RuntimeError, match="no forward-mode derivative.*dual"):
        f(forward_ad.make_dual(x0, tangent))
    # The oracle has one.
    _, t_ref = torch.func.jvp(lambda a: gemini_fusion(a, x1, params, num_heads=4, backend="torch")[0],
                              (x0,), (tangent,))
    assert t_ref.norm() > 0
