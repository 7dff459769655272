"""Times the available backends of GeminiFusion on one shape and prints a table.

(A short demo; the full harness of the benchmark issue replaces it.)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import gemini_kernels as gk
from gemini_kernels.reference import gemini_fusion_reference


def median_ms(fn, warmup: int, runs: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv=None):
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=32 if cuda else 2)
    ap.add_argument("--pixels", type=int, default=19200 if cuda else 4800)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    ap.add_argument("--runs", type=int, default=20 if cuda else 5)
    args = ap.parse_args(argv)

    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    params = gk.random_params(args.dim, dtype=dtype, device=device)
    x0 = torch.randn(args.batch, args.pixels, args.dim, device=device, dtype=dtype)
    x1 = torch.randn_like(x0)
    compiled = torch.compile(gemini_fusion_reference, dynamic=False)

    variants = {f"gemini_kernels[{name}]": (lambda name=name: gk.gemini_fusion(x0, x1, params, backend=name))
                for name in gk.available_backends(device)}
    variants["torch.compile(oracle)"] = lambda: compiled(x0, x1, params)

    flops = 36 * args.dim ** 2 * args.batch * args.pixels
    print(f"GeminiFusion forward, B={args.batch} N={args.pixels} C={args.dim} {args.dtype} on {device}; "
          f"torch {torch.__version__}; median of {args.runs} runs")
    print(f"{'variant':28s} {'ms':>10s} {'GFLOP/s':>10s}")
    with torch.no_grad():
        for name, fn in variants.items():
            ms = median_ms(fn, warmup=2, runs=args.runs, device=device)
            print(f"{name:28s} {ms:10.3f} {flops / ms / 1e6:10.1f}", flush=True)


if __name__ == "__main__":
    main()
