"""What every fused backend promises, one suite over the backends available on this machine's device
(on CPU: the Triton kernels under the interpreter and the extension's host path, cpu_cpp; on a GPU the
Triton and CUDA kernels), each held to the bounds it declares (``Backend.bounds``). A backend's own files test its
own paths, shapes and entry points (tests/test_triton.py, tests/test_cuda_host.py).

A backend with more than one way to run its backward is tested in each: the compiled extension either
recomputes the forward's GEMM outputs or saves them (``cuda_fusion.SAVE_ACTIVATIONS_FROM_WIDTH``).
"""
import pytest
import torch

import gemini_kernels as gk
from gemini_kernels import FusionParams, gemini_fusion, gemini_fusion_reference
from gemini_kernels.params import PARAM_NAMES
from helpers import make_case, rel_err

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


def _outputs_and_grads(backend, x0, x1, params, num_heads, seed=3, dtype=None):
    """(y0, y1) and the gradients of <y0, g0> + <y1, g1> for fixed random g0, g1 (drawn in ``dtype``,
    default the outputs'); ``backend`` a name or a function (x0, x1, params, num_heads) -> (y0, y1)."""
    leaves = [x0, x1, *params]
    if callable(backend):
        y0, y1 = backend(x0, x1, params, num_heads)
    else:
        y0, y1 = gemini_fusion(x0, x1, params, num_heads, backend=backend)
    g = torch.Generator().manual_seed(seed)
    gy0, gy1 = (torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype or y.dtype).to(y)
                for y in (y0, y1))
    return (y0, y1), torch.autograd.grad((y0 * gy0).sum() + (y1 * gy1).sum(), leaves)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_outputs_and_every_gradient_within_the_declared_bounds(backend, dtype):
    """Outputs and all 16 gradients against the float64 oracle's, within the bounds the backend
    declares (``Backend.bounds``: what the benchmark's guard applies too), on odd pixel counts
    and a leading dimension."""
    x0, x1, params = make_case((2, 5), 40, dtype=dtype, device=DEVICE, requires_grad=True, seed=40)
    (y0, y1), grads = _outputs_and_grads(backend, x0, x1, params, 8)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x0, x1, *params)]
    (r0, r1), ref = _outputs_and_grads(lambda a, b, p, h: gemini_fusion_reference(a, b, FusionParams(*p), h),
                                       ref_leaves[0], ref_leaves[1], ref_leaves[2:], 8, dtype=dtype)
    bound = gk.backends.BACKENDS[backend].bounds[dtype]
    errors = {"y0": rel_err(y0, r0), "y1": rel_err(y1, r1)}
    errors.update({name: rel_err(g, r) for name, g, r in zip(("x0", "x1", *PARAM_NAMES), grads, ref)})
    worst = max(errors, key=errors.get)
    assert errors[worst] < bound, f"{worst}: rel_err {errors[worst]:.1e} >= {bound:.0e}"


def test_reruns_give_bitwise_equal_outputs_and_gradients(backend):
    """Weight gradients summed in a fixed order (no float atomics): a rerun is bitwise the same."""
    x0, x1, params = make_case((3, 17), 64, dtype=torch.float32, device=DEVICE, requires_grad=True, seed=6)
    first_y, first_g = _outputs_and_grads(backend, x0, x1, params, 8)
    second_y, second_g = _outputs_and_grads(backend, x0, x1, params, 8)
    for a, b in zip([*first_y, *first_g], [*second_y, *second_g]):
        assert torch.equal(a, b)


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
