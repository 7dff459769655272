"""The host C++ path (backend="cpu_cpp") against the oracle in eager mode, on CPU: the
measurement behind the CPU order of ``"auto"`` (gemini_kernels/backends.py).

float32, batch 2, NYUDv2 stages with MiT-B1 widths (bench_shapes.stage_dims; stages 1 and 2 by
default: N=19200, C=64 and N=4800, C=128), 8 heads, the given thread count (2 by default); forward
(no grad) and forward + backward (all 16 gradients). Prints the median of --repeats runs after
--warmup runs, the variants interleaved so that all see the same machine load, and the ratio from
that one run; the minimum of each is printed too, as the figure least disturbed by other processes
on a shared machine, and the minor page faults per run: what a variant costs depends on whether the
allocator hands it fresh memory, and interleaved runs reuse each other's. --blocks runs each
variant's runs back to back instead, the way one layer's steps repeat in a training loop.

    python bench/cpu_host_vs_oracle.py [--threads 2] [--repeats 15] [--stages 1 2] [--blocks]

Whether the backward reads the forward's saved activations or recomputes them is an experiment of its
own: bench/experiments/save_activations.py.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gemini_kernels as gk  # noqa: E402
from bench_shapes import stage_dims  # noqa: E402
from bench_timing import interleaved_times_ms  # noqa: E402

VARIANTS = {"oracle": "torch", "host": "cpu_cpp"}


def forward(x0, x1, params, backend):
    with torch.no_grad():
        gk.gemini_fusion(x0, x1, params, 8, backend=backend)


def forward_backward(x0, x1, params, backend):
    y0, y1 = gk.gemini_fusion(x0, x1, params, 8, backend=backend)
    torch.autograd.grad((y0.sum(), y1.sum()), [x0, x1, *params])


def summary(times_and_faults):
    """(median ms, min ms, minor page faults per run)."""
    times, faults = times_and_faults
    return statistics.median(times), min(times), statistics.mean(faults) if faults else 0.0


def parse_cpu_args(doc: str, default_stages) -> argparse.Namespace:
    """The flags of the CPU scripts (this one and bench/experiments/save_activations.py); sets the
    thread count and stops, saying why, where the host path is unavailable."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--stages", type=int, nargs="+", default=list(default_stages), choices=sorted(stage_dims()))
    parser.add_argument("--blocks", action="store_true",
                        help="run each variant's runs back to back rather than interleaved")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reason = gk.backends.BACKENDS["cpu_cpp"].unavailable_reason(torch.device("cpu"))
    if reason is not None:
        raise SystemExit(f"backend='cpu_cpp' is not available: {reason}")
    return args


def main():
    stages = stage_dims()
    args = parse_cpu_args(__doc__, [1, 2])

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, batch {args.batch}, 8 heads, "
          f"median of {args.repeats} after {args.warmup} warm-up runs, "
          + ("each variant's runs back to back" if args.blocks else "variants interleaved"))
    print(f"{'stage':>5} {'N':>6} {'C':>4} {'pass':>16} {'oracle ms':>10} {'host ms':>10} {'speed-up':>9}"
          f" {'(min: oracle':>13} {'host':>8} {'speed-up)':>10} {'faults/run: oracle':>19} {'host':>6}")
    cpu = torch.device("cpu")
    for stage in args.stages:
        n, c = stages[stage]
        g = torch.Generator().manual_seed(stage)
        x0 = torch.randn(args.batch, n, c, generator=g)
        x1 = torch.randn(args.batch, n, c, generator=g)
        params = gk.random_params(c, generator=g)
        grad_x0, grad_x1 = x0.clone().requires_grad_(), x1.clone().requires_grad_()
        grad_params = gk.FusionParams(*(p.clone().requires_grad_() for p in params))
        for name, step, inputs in (("forward", forward, (x0, x1, params)),
                                   ("forward+backward", forward_backward, (grad_x0, grad_x1, grad_params))):
            calls = {v: (lambda b=backend: step(*inputs, b)) for v, backend in VARIANTS.items()}
            t = {v: summary(r) for v, r in interleaved_times_ms(calls, cpu, args.warmup, args.repeats,
                                                                args.blocks).items()}
            (oracle, oracle_min, oracle_faults), (host, host_min, host_faults) = t["oracle"], t["host"]
            print(f"{stage:>5} {n:>6} {c:>4} {name:>16} {oracle:>10.1f} {host:>10.1f} "
                  f"{oracle / host:>8.2f}x {oracle_min:>13.1f} {host_min:>8.1f} "
                  f"{oracle_min / host_min:>9.2f}x {oracle_faults:>19.0f} {host_faults:>6.0f}", flush=True)


if __name__ == "__main__":
    main()
