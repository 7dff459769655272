"""pytest-benchmark suite for the CPU paths (on demand, not part of CI):

    python -m pytest bench --benchmark-only                 # add --benchmark-json=out.json to keep them
    OMP_NUM_THREADS=1 python -m pytest bench --benchmark-only   # on a shared machine: one thread per run

One NYUDv2 MiT-B1 stage-3 shape (N=1200, C=320) at batch 2 in float32, forward and forward + backward,
for every backend available on the CPU and the published loop, token exchange and cross-attention.
The forward benchmarks first check the GeminiFusion variants' outputs against the float64 oracle (the
test suite checks every gradient); the forward + backward ones check that the gradients are finite.
"""
import pytest
import torch

import gemini_kernels as gk
from bench_shapes import stage_dims  # pytest puts bench/ on sys.path for this file
from gemini_kernels.baselines import PublishedFusion, full_cross_attention, random_token_exchange

BATCH, HEADS = 2, 8
TOKENS, DIM = stage_dims("nyudv2", "mit-b1")[3]


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture(scope="module")
def case():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(BATCH, TOKENS, DIM, generator=g)
    x1 = torch.randn(BATCH, TOKENS, DIM, generator=g)
    params = gk.random_params(DIM, generator=g)
    ref = gk.gemini_fusion_reference(x0.double(), x1.double(), gk.FusionParams(*(p.double() for p in params)), HEADS)
    return x0, x1, params, ref


def variants(params):
    found = {f"backend-{name}": (lambda x0, x1, name=name: gk.gemini_fusion(x0, x1, params, HEADS, backend=name))
             for name in gk.available_backends("cpu")}
    found["published"] = PublishedFusion.from_params(params, HEADS)
    found["exchange"] = random_token_exchange(DIM, generator=torch.Generator().manual_seed(1))
    found["xattn"] = lambda x0, x1: full_cross_attention(x0, x1, params, HEADS)
    return found


VARIANT_NAMES = [f"backend-{n}" for n in gk.available_backends("cpu")] + ["published", "exchange", "xattn"]


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_forward(benchmark, case, name):
    x0, x1, params, ref = case
    fn = variants(params)[name]
    with torch.no_grad():
        y0, y1 = fn(x0, x1)
        if not name.startswith(("exchange", "xattn")):
            assert max(rel_err(y0, ref[0]), rel_err(y1, ref[1])) < 1e-4
        assert torch.isfinite(y0).all() and torch.isfinite(y1).all()
        benchmark(fn, x0, x1)


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_forward_backward(benchmark, case, name):
    x0, x1, params, _ = case
    params = gk.FusionParams(*(p.clone().requires_grad_() for p in params))
    fn = variants(params)[name]
    x0, x1 = x0.clone().requires_grad_(), x1.clone().requires_grad_()
    grads = (torch.randn_like(x0), torch.randn_like(x1))
    trained = [x0, x1, *(fn.parameters() if isinstance(fn, torch.nn.Module) else params)]

    def step():
        for t in trained:
            t.grad = None
        torch.autograd.backward(fn(x0, x1), grads)

    benchmark(step)
    assert torch.isfinite(x0.grad).all()
