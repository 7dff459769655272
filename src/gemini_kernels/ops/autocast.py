"""What every kernel backend does under ``torch.autocast``: what the oracle does.

The oracle's products are ``F.linear`` calls, which autocast runs in its dtype; its softmaxes and
sums come out in float32 or wider because the kernels accumulate in float32. So a kernel backend
casts the inputs and parameters to the autocast dtype, runs with autocast off (its own ops must not
be cast again), and returns outputs in the inputs' dtype. Autocast leaves float64 alone, and so does
this.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def like_the_oracle(run: Callable, x0: Tensor, x1: Tensor, params: Sequence[Tensor], num_heads: int):
    """``run(x0, x1, params, num_heads) -> (y0, y1)``, under autocast as the oracle would be."""
    device_type = x0.device.type
    if x0.dtype == torch.float64 or not torch.is_autocast_enabled(device_type):
        return run(x0, x1, list(params), num_heads)
    dtype = torch.get_autocast_dtype(device_type)
    with torch.autocast(device_type, enabled=False):
        y0, y1 = run(x0.to(dtype), x1.to(dtype), [t.to(dtype) for t in params], num_heads)
    return y0.to(x0.dtype), y1.to(x0.dtype)
