"""How the benchmarks measure: timed runs, the device's matmul rate and bandwidth, peak memory.

The one timing loop (:func:`times_ms`) of bench/run.py, bench/model_speed.py, the CPU scripts and the
experiments: on a GPU every timed run starts with a cold L2 (a 256 MiB buffer is zeroed before it,
outside the timing) and is timed with CUDA events, as ``triton.testing.do_bench`` does; on a CPU, runs
are timed with ``time.perf_counter`` (bench/run.py also cycles through several input sets whose total
exceeds the last-level cache) and can count the minor page faults of each run.
"""
from __future__ import annotations

import glob
import resource
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

_L2_FLUSH_BYTES = 256 << 20


def last_level_cache_bytes() -> int:
    """The largest CPU cache, from sysfs; 32 MiB where it cannot be read."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        text = open(path).read().strip()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KM")) * scale)
    return max(sizes, default=32 << 20)


def rotation_count(device: torch.device, bytes_per_set: int) -> int:
    """Input sets to cycle through on a CPU so that no timed run finds its inputs in cache."""
    if device.type == "cuda":
        return 1  # the L2 is flushed before each run instead
    sets = -(-2 * last_level_cache_bytes() // max(bytes_per_set, 1))
    return max(2, min(16, sets))


def median_ms(run: Callable[[int], None], device: torch.device, warmup: int, runs: int,
              before_each: Optional[Callable[[int], None]] = None) -> float:
    """Median wall time of ``run(i)`` over ``runs`` timed calls after ``warmup`` untimed ones."""
    return statistics.median(times_ms(run, device, warmup, runs, before_each))


def times_ms(run: Callable[[int], None], device: torch.device, warmup: int, runs: int,
             before_each: Optional[Callable[[int], None]] = None, faults: Optional[list] = None) -> list:
    """Wall times of ``runs`` timed calls of ``run(i)`` after ``warmup`` untimed ones.

    ``before_each(i)`` runs outside the timing (e.g. to clear gradients); ``i`` counts the calls so that
    ``run`` can rotate inputs. On a CPU, ``faults`` (a list) receives the minor page faults of each timed
    call: what a call costs depends on whether the allocator hands it fresh pages.
    """
    for i in range(warmup):
        if before_each:
            before_each(i)
        run(i)
    times = []
    if device.type == "cuda":
        flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device)
        start = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
        end = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
        for i in range(runs):
            if before_each:
                before_each(warmup + i)
            flush.zero_()
            start[i].record()
            run(warmup + i)
            end[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(start, end)]
    else:
        for i in range(runs):
            if before_each:
                before_each(warmup + i)
            paged = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = time.perf_counter()
            run(warmup + i)
            times.append((time.perf_counter() - t) * 1e3)
            if faults is not None:
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - paged)
    return times


def interleaved_times_ms(calls: Dict[str, Callable[[], None]], device: torch.device, warmup: int, runs: int,
                         blocks: bool = False) -> Dict[str, tuple]:
    """``{name: (times in ms, minor page faults per timed run)}`` for several variants of one step.

    Interleaved (the default): the variants take turns run by run, so that all see the same machine
    load; ``blocks``: each variant's runs back to back, the way one layer's steps repeat in training.
    Both through :func:`times_ms`."""
    names = list(calls)
    out = {}
    if blocks:
        for name in names:
            faults: List[int] = []
            out[name] = (times_ms(lambda i: calls[name](), device, warmup, runs, faults=faults), faults)
        return out
    k = len(names)
    faults = []
    times = times_ms(lambda i: calls[names[i % k]](), device, warmup * k, runs * k, faults=faults)
    # The timed calls start at index warmup * k, a multiple of k: timed call j ran names[j % k].
    return {name: (times[j::k], faults[j::k]) for j, name in enumerate(names)}


def host_us_per_call(call: Callable[[], None], device: torch.device, calls: int, repeats: int,
                     before_each: Optional[Callable[[], None]] = None) -> float:
    """Median over ``repeats`` of the wall time per call, in us, of ``calls`` calls back to back with one
    synchronize at the end (``before_each`` runs inside the timing): what the host spends on a call
    where the device keeps up, i.e. the Python and dispatch around small kernels, which
    :func:`times_ms`'s device-side timing leaves out."""
    def block(n):
        for _ in range(n):
            if before_each:
                before_each()
            call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    block(max(1, calls // 10))
    per_call = []
    for _ in range(repeats):
        t = time.perf_counter()
        block(calls)
        per_call.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(per_call)


# The rates are the best of their runs, not the median: the floor is what the device can do at its best.

def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square GEMM in ``dtype`` (8192 on a GPU, 1024 on a CPU), as ``F.linear``: the
    ``x @ W^T`` layout of every product of the fusion (on a CPU, ``torch.mm`` of the other layout runs
    bfloat16 and float16 ten times slower, which would understate the floor's rate). On a CPU also
    oneDNN's GEMM where it takes ``dtype``, and the faster of the two: torch's CPU ``F.linear`` of
    float32 calls MKL, which on AMD CPUs runs at about half the rate oneDNN reaches there, and the
    floor is what the machine can do, not what one library does."""
    n = 8192 if device.type == "cuda" else 1024
    x = torch.randn(n, n, device=device).to(dtype)
    weight = torch.randn(n, n, device=device).to(dtype)
    runs = 20 if device.type == "cuda" else 10
    ms = min(times_ms(lambda i: F.linear(x, weight), device, warmup=3, runs=runs))
    onednn = _onednn_linear(x, weight) if device.type == "cpu" else None
    if onednn is not None:
        ms = min(ms, min(times_ms(lambda i: onednn(), device, warmup=3, runs=runs)))
    return 2.0 * n ** 3 / (ms * 1e-3)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> Optional[Callable[[], torch.Tensor]]:
    """``x @ weight^T`` through oneDNN's GEMM (torch's mkldnn linear), or None where this build or CPU
    has no oneDNN GEMM of x's dtype (float64 never; float16 only with AVX512-FP16 or AVX-NE-CONVERT)."""
    linear = getattr(torch._C._nn, "mkldnn_linear", None)
    if linear is None or not torch.backends.mkldnn.is_available():
        return None
    try:
        xm, wm = x.to_mkldnn(), weight.to_mkldnn()
        linear(xm, wm, None)
    except RuntimeError:
        return None
    return lambda: linear(xm, wm, None)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device copy (1 GiB on a GPU, 256 MiB on a CPU), counting read and write."""
    size = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.ones(size, dtype=torch.int8, device=device)
    dst = torch.empty_like(src)
    ms = min(times_ms(lambda i: dst.copy_(src), device, warmup=2, runs=20 if device.type == "cuda" else 10))
    return 2.0 * size / (ms * 1e-3)


def peak_memory_mib(call: Callable[[], None], device: torch.device) -> Optional[float]:
    """Memory one call allocates above what was allocated before it (its outputs, saved activations,
    workspaces, gradients), in MiB; None on a CPU, where torch keeps no allocator statistics."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    call()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / (1 << 20)
