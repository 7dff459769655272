import pytest
import torch

from gemini_kernels import FusionParams, gemini_fusion, gemini_fusion_reference, random_params
from gemini_kernels.params import PARAM_NAMES

# The 16 gradients of a fusion, in the order of its inputs (x0, x1, *params).
GRAD_NAMES = ("x0", "x1", *PARAM_NAMES)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, computed in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def make_case(shape, dim, *, dtype=torch.float64, device="cpu", seed=0, requires_grad=False):
    """Fresh random inputs (never zeros) and parameters with non-zero biases and noises."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(*shape, dim, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    x1 = torch.randn(*shape, dim, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    params = random_params(dim, dtype=dtype, device=device, generator=g)
    if requires_grad:
        x0.requires_grad_()
        x1.requires_grad_()
        for p in params:
            p.requires_grad_()
    return x0, x1, params


def upstream_grads(y0, y1, seed, dtype=None):
    """Fixed random output gradients (g0, g1) for outputs y0, y1: drawn in float64 from one generator
    seeded ``seed``, rounded to ``dtype`` (default each output's own), in the outputs' dtype and device."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype or y.dtype).to(y) for y in (y0, y1))


def run_fusion(fn, x0, x1, params, heads):
    """(y0, y1) of ``fn``: a backend name (through gemini_fusion) or a function (x0, x1, params, heads)."""
    if isinstance(fn, str):
        return gemini_fusion(x0, x1, params, heads, backend=fn)
    return fn(x0, x1, params, heads)


def outputs_and_grads(fn, x0, x1, params, heads, seed=1, dtype=None):
    """(y0, y1) of ``fn`` (a backend name or a function, as run_fusion) and its 16 gradients of
    <y0, g0> + <y1, g1>, (g0, g1) = upstream_grads(y0, y1, seed, dtype): with respect to the tensors
    given, or to detached copies of those that do not require grad."""
    leaves = [t if t.requires_grad else t.detach().requires_grad_() for t in (x0, x1, *params)]
    y0, y1 = run_fusion(fn, leaves[0], leaves[1], FusionParams(*leaves[2:]), heads)
    g0, g1 = upstream_grads(y0, y1, seed, dtype)
    return (y0, y1), torch.autograd.grad((y0 * g0).sum() + (y1 * g1).sum(), leaves)


def oracle_float64(x0, x1, params, heads, seed=None, dtype=None):
    """The oracle (reference.py) in float64, on float64 copies of the inputs: ((r0, r1), None); with a
    ``seed``, ((r0, r1), its 16 gradients) for the upstream gradients that outputs_and_grads(..., seed)
    draws for outputs in ``dtype`` (default x0's): the same rounded values, in float64."""
    leaves = [t.detach().double() for t in (x0, x1, *params)]
    if seed is None:
        with torch.no_grad():
            return gemini_fusion_reference(leaves[0], leaves[1], FusionParams(*leaves[2:]), heads), None
    return outputs_and_grads(gemini_fusion_reference, *leaves[:2], leaves[2:], heads, seed=seed,
                             dtype=dtype or x0.dtype)


def assert_matches_oracle(fn, x0, x1, params, heads, out_bound, grad_bound=None, *, seed=1, grads=True,
                          key_bias_grad_zero=True, note=""):
    """Outputs and all 16 gradients (outputs_and_grads(fn, ..., seed)) against the float64 oracle's
    (oracle_float64, the same upstream gradients): every shape and dtype that of its input, and
    ||out - ref|| / ||ref|| under ``out_bound`` for y0, y1 and ``grad_bound`` (default ``out_bound``)
    for each gradient. ``grads=False``: the outputs only (no autograd: the tensors go to ``fn`` as
    given). ``key_bias_grad_zero``: the key-bias third of each in_proj_bias gradient is exactly zero
    (the key bias cancels out of the two-key softmax; the oracle's autograd leaves rounding there).
    Returns (name, relative error) of the worst against its bound."""
    grad_bound = out_bound if grad_bound is None else grad_bound
    if grads:
        (y0, y1), got = outputs_and_grads(fn, x0, x1, params, heads, seed=seed)
        (r0, r1), ref = oracle_float64(x0, x1, params, heads, seed=seed)
    else:
        (y0, y1), got = run_fusion(fn, x0, x1, params, heads), ()
        (r0, r1), ref = oracle_float64(x0, x1, params, heads)
    for name, y, x in (("y0", y0, x0), ("y1", y1, x1)):
        assert y.shape == x.shape and y.dtype == x.dtype, \
            f"{note}{name}: {y.dtype}{list(y.shape)}, input {x.dtype}{list(x.shape)}"
    errors = {"y0": rel_err(y0, r0), "y1": rel_err(y1, r1)}
    dim = x0.shape[-1]
    for name, leaf, g, r in zip(GRAD_NAMES, (x0, x1, *params), got, ref or ()):
        assert g.shape == leaf.shape == r.shape and g.dtype == leaf.dtype, \
            f"{note}grad {name}: {g.dtype}{list(g.shape)}, input {leaf.dtype}{list(leaf.shape)}"
        if key_bias_grad_zero and name.endswith("in_proj_bias"):
            assert torch.count_nonzero(g[dim:2 * dim]) == 0, f"{note}grad {name}: the key-bias third is not zero"
        errors[name] = rel_err(g, r)
    bounds = {name: out_bound if name in ("y0", "y1") else grad_bound for name in errors}
    bad = {name: f"{e:.2e}" for name, e in errors.items() if not e < bounds[name]}
    assert not bad, (f"{note}rel_err over the bound ({out_bound:.0e} outputs, {grad_bound:.0e} gradients): {bad}; "
                     f"all: { {name: f'{e:.1e}' for name, e in errors.items()} }")
    worst = max(errors, key=lambda name: errors[name] / bounds[name])
    return worst, errors[worst]


def gated_call(forward, backward):
    """A differentiable fusion call ``fn(x0, x1, params, heads) -> (y0, y1)`` from a pair of ops: the
    extension's fused, wide or chain kernels, whose backward reads the gates the forward kept.
    ``forward(x0, x1, params, heads) -> (y0, y1, gate)``; ``backward(g0, g1, x0, x1, params, gate, heads)
    -> [dx0, dx1, *parameter gradients]``."""

    class Call(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x0, x1, heads, *params):
            y0, y1, gate = forward(x0, x1, list(params), heads)[:3]
            ctx.save_for_backward(x0, x1, gate, *params)
            ctx.heads = heads
            return y0, y1

        @staticmethod
        def backward(ctx, g0, g1):
            x0, x1, gate, *params = ctx.saved_tensors
            grads = backward(g0, g1, x0, x1, params, gate, ctx.heads)
            return grads[0], grads[1], None, *grads[2:]

    return lambda x0, x1, params, heads: Call.apply(x0, x1, heads, *params)


def chain_backward(g0, g1, x0, x1, params, gate, heads):
    """The extension's backward op from the gates, recomputing the rest (what follows a fused or wide
    forward on CUDA for training); it takes contiguous upstream gradients."""
    return torch.ops.gemini_kernels.fusion_backward(g0.contiguous(), g1.contiguous(), x0, x1, params, gate, [], heads)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Many small ops on a shared 2-core machine: one intra-op thread is several times faster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomise_(module, seed):
    """Every float tensor of the state random and non-zero: norms near 1, BN variances positive, weights
    fan-in scaled, the rest small, so that a mis-mapped or mis-used tensor changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            r = torch.randn(t.shape, generator=g, dtype=torch.float64)
            if "running_var" in name:
                t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64) + 0.5)
            elif any(n in name for n in ("norm", "ln_", ".bn.")) and name.endswith("weight"):
                t.copy_(1.0 + 0.1 * r)
            elif "noise" in name:
                t.copy_(0.5 * r)
            elif t.dim() >= 2 and "bias_table" not in name:  # fan-in scaled: activations stay O(1)
                t.copy_(r / t[0].numel() ** 0.5)
            else:
                t.copy_(0.1 * r)
