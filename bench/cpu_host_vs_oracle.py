"""The host C++ path (backend="cuda" on CPU tensors) against the oracle in eager mode, on CPU.

float32, batch 2, NYUDv2 stage 1 (N=19200, C=64) and stage 2 (N=4800, C=128), 8 heads, the given
thread count (2 by default); forward (no grad) and forward + backward (all 16 gradients). Prints the
median of --repeats runs after --warmup runs, the variants interleaved so that all see the same
machine load, and the ratio from that one run; the minimum of each is printed too, as the figure
least disturbed by other processes on a shared machine. With --recompute, forward + backward is
also timed with the backward recomputing the forward's GEMM outputs instead of reading the ones the
forward saved, and with it reading them (whichever cuda_fusion.SAVE_ACTIVATIONS_FROM_WIDTH picks by
default). The minor page faults per run of
each variant are printed too: what a variant costs depends on whether the allocator hands it fresh
memory, and interleaved runs reuse each other's. --blocks runs each variant's runs back to back
instead, the way one layer's steps repeat in a training loop.

    python bench/cpu_host_vs_oracle.py [--threads 2] [--repeats 15] [--stages 1 2] [--recompute] [--blocks]
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

import gemini_kernels as gk
from gemini_kernels.ops import cuda_fusion

NYUDV2_STAGES = {1: (19200, 64), 2: (4800, 128), 3: (1200, 320), 4: (300, 512)}


# variant: (backend, the channel count from which a differentiated host forward saves its activations;
# None: the library's default)
VARIANTS = {"oracle": ("torch", None), "host": ("cuda", None), "saved": ("cuda", 0), "recompute": ("cuda", 1 << 30)}


def forward(x0, x1, params, variant):
    with torch.no_grad():
        gk.gemini_fusion(x0, x1, params, 8, backend=VARIANTS[variant][0])


def forward_backward(x0, x1, params, variant):
    backend, save = VARIANTS[variant]
    default = cuda_fusion.SAVE_ACTIVATIONS_FROM_WIDTH
    cuda_fusion.SAVE_ACTIVATIONS_FROM_WIDTH = default if save is None else save
    try:
        inputs = [x0, x1, *params]
        y0, y1 = gk.gemini_fusion(x0, x1, params, 8, backend=backend)
        torch.autograd.grad((y0.sum(), y1.sum()), inputs)
    finally:
        cuda_fusion.SAVE_ACTIVATIONS_FROM_WIDTH = default


def measure(step, variants, args, warmup, repeats, blocks):
    """(median s, min s, minor page faults per run) per variant; runs interleaved across variants, or
    each variant's back to back with blocks."""
    times = {variant: [] for variant in variants}
    faults = dict.fromkeys(variants, 0)

    def timed(variant):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        step(*args, variant)
        times[variant].append(time.perf_counter() - start)
        faults[variant] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    schedule = ([[v] * (warmup + repeats) for v in variants] if blocks
                else [list(variants)] * (warmup + repeats))
    for runs in schedule:
        for variant in runs:
            timed(variant)
    for variant in variants:  # drop the warm-up runs
        del times[variant][:warmup]
    return {v: (statistics.median(t), min(t), faults[v] / (warmup + repeats)) for v, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2], choices=sorted(NYUDV2_STAGES))
    parser.add_argument("--recompute", action="store_true",
                        help="also time forward + backward with the backward reading saved activations and "
                             "with it recomputing them")
    parser.add_argument("--blocks", action="store_true",
                        help="run each variant's runs back to back rather than interleaved")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reason = gk.backends.BACKENDS["cuda"].unavailable_reason(torch.device("cpu"))
    if reason is not None:
        raise SystemExit(f"backend='cuda' is not available on CPU: {reason}")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, batch {args.batch}, 8 heads, "
          f"median of {args.repeats} after {args.warmup} warm-up runs, "
          + ("each variant's runs back to back" if args.blocks else "variants interleaved"))
    print(f"{'stage':>5} {'N':>6} {'C':>4} {'pass':>16} {'oracle ms':>10} {'host ms':>10} {'speed-up':>9}"
          f" {'(min: oracle':>13} {'host':>8} {'speed-up)':>10} {'faults/run: oracle':>19} {'host':>6}"
          + (f" {'saved ms':>9} {'speed-up':>9} {'faults':>7} {'recompute ms':>13} {'speed-up':>9} {'faults':>7}"
             if args.recompute else ""))
    for stage in args.stages:
        n, c = NYUDV2_STAGES[stage]
        g = torch.Generator().manual_seed(stage)
        x0 = torch.randn(args.batch, n, c, generator=g)
        x1 = torch.randn(args.batch, n, c, generator=g)
        params = gk.random_params(c, generator=g)
        grad_x0, grad_x1 = x0.clone().requires_grad_(), x1.clone().requires_grad_()
        grad_params = gk.FusionParams(*(p.clone().requires_grad_() for p in params))
        for name, step, inputs, variants in (
            ("forward", forward, (x0, x1, params), ["oracle", "host"]),
            ("forward+backward", forward_backward, (grad_x0, grad_x1, grad_params),
             ["oracle", "host", "saved", "recompute"] if args.recompute else ["oracle", "host"]),
        ):
            t = measure(step, variants, inputs, args.warmup, args.repeats, args.blocks)
            (oracle, oracle_min, oracle_faults), (host, host_min, host_faults) = t["oracle"], t["host"]
            line = (f"{stage:>5} {n:>6} {c:>4} {name:>16} {oracle * 1e3:>10.1f} {host * 1e3:>10.1f} "
                    f"{oracle / host:>8.2f}x {oracle_min * 1e3:>13.1f} {host_min * 1e3:>8.1f} "
                    f"{oracle_min / host_min:>9.2f}x {oracle_faults:>19.0f} {host_faults:>6.0f}")
            if "recompute" in t:
                for variant, width in (("saved", 9), ("recompute", 13)):
                    median, _, variant_faults = t[variant]
                    line += f" {median * 1e3:>{width}.1f} {oracle / median:>8.2f}x {variant_faults:>7.0f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
