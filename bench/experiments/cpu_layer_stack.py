"""A training step's worth of fusion layers on CPU: the oracle against the host C++ path, with the
host forward saving its activations for the backward (the default) and with it recomputing them.

Eight layers of MiT-B1's widths at NYUDv2 shapes, two per stage (N, C = 19200, 64; 4800, 128;
1200, 320; 300, 512), batch 2, float32, 8 heads: forward through all of them, then one backward, as
in training, where every layer's activations are alive at once. Single-layer timings
(save_activations.py) see an allocator that keeps handing back the same few buffers; here the
allocator's state is that of a training step. Each variant runs in a process of its own, so that no
other variant shapes its heap; the variants take turns, --rounds times. Prints, per variant and
round, the median step time of --repeats steps after 2 warm-up steps and the minor page faults per
step.

--stages keeps the layers of the given stages only (--stages 1: two C=64 layers, whose activations
are the largest).

    python bench/experiments/cpu_layer_stack.py [--threads 2] [--rounds 2] [--repeats 10] [--stages 1 2 3 4]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_shapes import stage_dims  # noqa: E402
from bench_timing import times_ms  # noqa: E402

STAGES = stage_dims()  # (N, C) of NYUDv2 with MiT-B1's widths; two layers each
# variant: (backend, the channel count from which a differentiated host forward saves its activations)
VARIANTS = {"oracle": ("torch", 0), "host, saving all": ("cpu_cpp", 0), "host, saving C>=96": ("cpu_cpp", 96),
            "host, saving C>=129": ("cpu_cpp", 129), "host, recomputing": ("cpu_cpp", 1 << 30)}


def run_variant(variant: str, threads: int, batch: int, repeats: int, stages) -> str:
    import gemini_kernels as gk
    from gemini_kernels.ops import cuda_fusion

    torch.set_num_threads(threads)
    backend, cuda_fusion.SAVE_ACTIVATIONS_FROM_WIDTH = VARIANTS[variant]
    g = torch.Generator().manual_seed(0)
    layers = []
    for n, c in [STAGES[s] for s in stages for _ in range(2)]:
        params = gk.FusionParams(*(p.requires_grad_() for p in gk.random_params(c, generator=g)))
        layers.append((params, torch.randn(batch, n, c, generator=g), torch.randn(batch, n, c, generator=g)))

    def step():
        loss = 0
        for params, x0, x1 in layers:
            y0, y1 = gk.gemini_fusion(x0.requires_grad_(), x1.requires_grad_(), params, 8, backend=backend)
            loss = loss + (y0 * y1).mean()
        loss.backward()

    faults = []
    times = times_ms(lambda i: step(), torch.device("cpu"), warmup=2, runs=repeats, faults=faults)
    return f"{statistics.median(times):.1f} {min(times):.1f} {statistics.median(faults):.0f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--stages", type=int, nargs="+", default=sorted(STAGES), choices=sorted(STAGES))
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # one child process
    args = parser.parse_args()
    if args.variant is not None:
        print(run_variant(args.variant, args.threads, args.batch, args.repeats, args.stages))
        return

    print(f"torch {torch.__version__}, {args.threads} threads, float32, batch {args.batch}, 8 heads, "
          f"two layers each of (N, C) = {[STAGES[s] for s in args.stages]}; "
          f"median of {args.repeats} steps after 2 warm-up steps")
    print(f"{'round':>5} {'variant':>20} {'step ms':>8} {'(min)':>8} {'faults/step':>12} {'speed-up':>9}")
    for round_ in range(1, args.rounds + 1):
        oracle = None
        for variant in VARIANTS:
            command = [sys.executable, __file__, "--variant", variant, "--threads", str(args.threads),
                       "--batch", str(args.batch), "--repeats", str(args.repeats),
                       "--stages", *map(str, args.stages)]
            median, minimum, faults = subprocess.run(command, check=True, capture_output=True,
                                                     text=True).stdout.split()
            oracle = oracle or float(median)
            print(f"{round_:>5} {variant:>20} {float(median):>8.1f} {float(minimum):>8.1f} {float(faults):>12.0f} "
                  f"{oracle / float(median):>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
