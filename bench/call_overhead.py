"""The host time of one fusion call where the kernels are negligible: the Python and dispatch around
each backend's kernels, which bench/run.py's timings (CUDA events on a GPU) leave out. A layer whose
host time exceeds its kernels' time is bound by the host in training, whatever the kernels do. (On a
CPU the kernels run on the host too: there it is the whole call, at a size where it is mostly the rest.)

For each backend available on the device (float32 on a CPU, bfloat16 on a GPU), GeminiFusion(64, 8
heads) on 2 pixels: the host time per call of --calls calls back to back (bench_timing.host_us_per_call,
median of --repeats): a forward under no_grad, a forward with grad, and a forward + backward (every
gradient set to None before each call, as ``optimizer.zero_grad()`` does; inside the timing).

    python bench/call_overhead.py [--device cuda] [--calls 500] [--repeats 7] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gemini_kernels as gk  # noqa: E402
from bench_timing import host_us_per_call  # noqa: E402

DIM, PIXELS = 64, 2


def measure(backend: str, device: torch.device, dtype: torch.dtype, calls: int, repeats: int) -> dict:
    torch.manual_seed(0)
    module = gk.GeminiFusion(DIM, num_heads=8, backend=backend).to(device=device, dtype=dtype)
    x0, x1 = (torch.randn(1, PIXELS, DIM, device=device, dtype=dtype) for _ in range(2))
    a0, a1 = x0.clone().requires_grad_(), x1.clone().requires_grad_()
    leaves = [a0, a1, *module.parameters()]
    grads = (torch.randn_like(x0), torch.randn_like(x1))

    def forward_no_grad():
        with torch.no_grad():
            module(x0, x1)

    def clear():
        for t in leaves:
            t.grad = None

    def forward_backward():
        torch.autograd.backward(module(a0, a1), grads)

    return {"no_grad forward": host_us_per_call(forward_no_grad, device, calls, repeats),
            "forward with grad": host_us_per_call(lambda: module(a0, a1), device, calls, repeats),
            "forward + backward": host_us_per_call(forward_backward, device, calls, repeats, before_each=clear)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=500, help="calls per timed block (default 500)")
    parser.add_argument("--repeats", type=int, default=7, help="timed blocks; the median is printed (default 7)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (default 1)")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.repeats < 1:
        parser.error(f"--calls and --repeats must be at least 1; got {args.calls} and {args.repeats}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # Triton on a CPU runs interpreted: its time there is the interpreter's, not the host's around kernels.
    backends = [b for b in gk.available_backends(device.type) if not (b == "triton" and device.type == "cpu")]
    print(f"host time per call, us: GeminiFusion({DIM}) on {PIXELS} pixels, {dtype}, {device}"
          f"{'' if device.type == 'cuda' else f', {args.threads} thread(s)'}; median of {args.repeats} x "
          f"{args.calls} calls")
    results = {}
    for backend in backends:
        results[backend] = measure(backend, device, dtype, args.calls, args.repeats)
    columns = list(next(iter(results.values())))
    print(f"{'backend':>10} " + " ".join(f"{c:>20}" for c in columns))
    for backend, row in results.items():
        print(f"{backend:>10} " + " ".join(f"{row[c]:>20.1f}" for c in columns))
    return results


if __name__ == "__main__":
    main()
