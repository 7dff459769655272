"""When the host backward should read the forward's saved activations: one layer at a time, on CPU.

Forward + backward of the host C++ path (backend="cpu_cpp") with the backward reading the
GEMM outputs the forward saved ("saved") and with it recomputing them ("recompute"), beside the
library's default choice ("host") and the eager oracle; float32, batch 2, NYUDv2 stages with MiT-B1
widths, 8 heads, variants interleaved run by run (or back to back with --blocks), median of --repeats
runs after --warmup, minor page faults per run. It sets
``gemini_kernels.ops.cuda_fusion.SAVE_ACTIVATIONS_FROM_WIDTH`` around each call: 0 saves at every
width, a huge value never. A single-layer loop reuses the memory the previous run freed, which favours
saving; bench/experiments/cpu_layer_stack.py measures the allocator state of a training step.

    python bench/experiments/save_activations.py [--threads 2] [--repeats 15] [--stages 1 2 3 4] [--blocks]
"""
from __future__ import annotations

import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gemini_kernels as gk  # noqa: E402
from bench_shapes import stage_dims  # noqa: E402
from bench_timing import interleaved_times_ms  # noqa: E402
from cpu_host_vs_oracle import parse_cpu_args  # noqa: E402
from gemini_kernels.ops import cuda_fusion  # noqa: E402

# variant: (backend, the channel count from which a differentiated host forward saves its activations;
# None: the library's default)
VARIANTS = {"oracle": ("torch", None), "host": ("cpu_cpp", None), "saved": ("cpu_cpp", 0), "recompute": ("cpu_cpp", 1 << 30)}


def forward_backward(x0, x1, params, variant):
    backend, save = VARIANTS[variant]
    default = cuda_fusion.SAVE_ACTIVATIONS_FROM_WIDTH
    cuda_fusion.SAVE_ACTIVATIONS_FROM_WIDTH = default if save is None else save
    try:
        y0, y1 = gk.gemini_fusion(x0, x1, params, 8, backend=backend)
        torch.autograd.grad((y0.sum(), y1.sum()), [x0, x1, *params])
    finally:
        cuda_fusion.SAVE_ACTIVATIONS_FROM_WIDTH = default


def main():
    stages = stage_dims()
    args = parse_cpu_args(__doc__, sorted(stages))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, batch {args.batch}, 8 heads, "
          f"forward + backward, median of {args.repeats} after {args.warmup} warm-up runs, "
          + ("each variant's runs back to back" if args.blocks else "variants interleaved")
          + f"; the default saves from C={cuda_fusion.SAVE_ACTIVATIONS_FROM_WIDTH} on")
    print(f"{'stage':>5} {'N':>6} {'C':>4} " + " ".join(f"{v + ' ms':>12} {'x oracle':>8} {'faults':>7}"
                                                      for v in VARIANTS))
    for stage in args.stages:
        n, c = stages[stage]
        g = torch.Generator().manual_seed(stage)
        x0 = torch.randn(args.batch, n, c, generator=g).requires_grad_()
        x1 = torch.randn(args.batch, n, c, generator=g).requires_grad_()
        params = gk.FusionParams(*(p.requires_grad_() for p in gk.random_params(c, generator=g)))
        calls = {v: (lambda v=v: forward_backward(x0, x1, params, v)) for v in VARIANTS}
        results = interleaved_times_ms(calls, torch.device("cpu"), args.warmup, args.repeats, args.blocks)
        medians = {v: statistics.median(t) for v, (t, _) in results.items()}
        line = f"{stage:>5} {n:>6} {c:>4} "
        line += " ".join(f"{medians[v]:>12.1f} {medians['oracle'] / medians[v]:>7.2f}x "
                         f"{statistics.mean(f) if f else 0:>7.0f}" for v, (_, f) in results.items())
        print(line, flush=True)


if __name__ == "__main__":
    main()
