"""The host C++ path (backend="cuda" on CPU tensors) against the oracle in eager mode, on CPU.

float32, batch 2, NYUDv2 stage 1 (N=19200, C=64) and stage 2 (N=4800, C=128), 8 heads, the given
thread count (2 by default); forward (no grad) and forward + backward (all 16 gradients). Prints the
median of --repeats runs after --warmup runs, the two backends interleaved so that both see the
same machine load, and the ratio from that one run; the minimum of each is printed too, as the
figure least disturbed by other processes on a shared machine.

    python bench/cpu_host_vs_oracle.py [--threads 2] [--repeats 7] [--stages 1 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import gemini_kernels as gk

NYUDV2_STAGES = {1: (19200, 64), 2: (4800, 128), 3: (1200, 320), 4: (300, 512)}


def forward(x0, x1, params, backend):
    with torch.no_grad():
        gk.gemini_fusion(x0, x1, params, 8, backend=backend)


def forward_backward(x0, x1, params, backend):
    inputs = [x0, x1, *params]
    y0, y1 = gk.gemini_fusion(x0, x1, params, 8, backend=backend)
    torch.autograd.grad((y0.sum(), y1.sum()), inputs)


def measure(step, cases, warmup, repeats):
    """(median, min) seconds per backend, runs interleaved across backends."""
    for _ in range(warmup):
        for backend, args in cases.items():
            step(*args, backend)
    times = {backend: [] for backend in cases}
    for _ in range(repeats):
        for backend, args in cases.items():
            start = time.perf_counter()
            step(*args, backend)
            times[backend].append(time.perf_counter() - start)
    return {backend: (statistics.median(t), min(t)) for backend, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2], choices=sorted(NYUDV2_STAGES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reason = gk.backends.BACKENDS["cuda"].unavailable_reason(torch.device("cpu"))
    if reason is not None:
        raise SystemExit(f"backend='cuda' is not available on CPU: {reason}")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, batch {args.batch}, 8 heads, "
          f"median of {args.repeats} after {args.warmup} warm-up runs")
    print(f"{'stage':>5} {'N':>6} {'C':>4} {'pass':>16} {'oracle ms':>10} {'host ms':>10} {'speed-up':>9}"
          f" {'(min: oracle':>13} {'host':>8} {'speed-up)':>10}")
    for stage in args.stages:
        n, c = NYUDV2_STAGES[stage]
        g = torch.Generator().manual_seed(stage)
        x0 = torch.randn(args.batch, n, c, generator=g)
        x1 = torch.randn(args.batch, n, c, generator=g)
        params = gk.random_params(c, generator=g)
        grad_x0, grad_x1 = x0.clone().requires_grad_(), x1.clone().requires_grad_()
        grad_params = gk.FusionParams(*(p.clone().requires_grad_() for p in params))
        for name, step, inputs in (
            ("forward", forward, (x0, x1, params)),
            ("forward+backward", forward_backward, (grad_x0, grad_x1, grad_params)),
        ):
            t = measure(step, {"torch": inputs, "cuda": inputs}, args.warmup, args.repeats)
            (oracle, oracle_min), (host, host_min) = t["torch"], t["cuda"]
            print(f"{stage:>5} {n:>6} {c:>4} {name:>16} {oracle * 1e3:>10.1f} {host * 1e3:>10.1f} "
                  f"{oracle / host:>8.2f}x {oracle_min * 1e3:>13.1f} {host_min * 1e3:>8.1f} "
                  f"{oracle_min / host_min:>9.2f}x", flush=True)


if __name__ == "__main__":
    main()
