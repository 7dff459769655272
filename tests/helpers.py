import pytest
import torch

from gemini_kernels import random_params


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
