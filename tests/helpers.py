import pytest
import torch

from conftest import NO_CUDA_REASON
from gemini_kernels import random_params

# Older spelling of the skip that tests/conftest.py now applies to every test marked `gpu`; kept for the
# files that still combine it with the mark (a test marked `gpu` needs neither).
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA_REASON)


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
