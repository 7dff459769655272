"""Compile every Triton configuration the launcher can pick for an H100 (sm_90a), without a GPU.

Triton's compiler and the ptxas it ships run anywhere; only launching needs a device. With a stand-in
driver that reports compute capability 9.0 (or 8.0: ``--arch 80``, the A100), ``kernel.warmup(...)``
compiles a kernel for that target on this machine, so a CPU-only CI can check what the interpreter
cannot, for each configuration:

* it compiles at all, spills no registers, fits in the target's shared memory per block;
* its products run on the tensor cores (wgmma on sm_90a, mma.sync on sm_80);
* no MMA layout puts more warps along M, times its instruction's rows, than the tile has rows
  (``warpsPerCTA=[8, 1]`` with 16-row instructions on a 64-row tile: two warpgroups compute the
  same rows);
* it has no float atomics (the weight gradients must be deterministic);

and reports registers, shared memory, CTAs per SM and, for the kernels that multiply matrices, static
SASS instructions per tile row.

Run in a process where TRITON_INTERPRET is unset (the interpreter replaces compilation):

    python -m gemini_kernels.ops.sm90_check            # table of every configuration; exit 1 on a failure
    python -m gemini_kernels.ops.sm90_check --json     # the same, as JSON (used by the tests)
    python -m gemini_kernels.ops.sm90_check --arch 80  # for the A100
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import multiprocessing
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.driver import CudaDriver
from triton.runtime import driver

# Opt-in shared memory per block, shared memory per SM, by compute capability (H100, A100).
MAX_SHARED_BYTES = {90: 227 * 1024, 80: 163 * 1024}
SHARED_BYTES_PER_SM = {90: 228 * 1024, 80: 164 * 1024}
SM90_MAX_SHARED_BYTES = MAX_SHARED_BYTES[90]
# The least opt-in shared memory per block of the GPUs the backend runs on (sm_86 / sm_89, 99 KB):
# one configuration serves them all.
SMALLEST_SHARED_BYTES = 99 * 1024
_REGISTERS_PER_SM, _MAX_WARPS_PER_SM = 65536, 64


class _Sm90Driver(CudaDriver):
    """Reports an sm_90 (or another capability's) device to the compiler and never touches hardware."""

    def __init__(self, capability: int = 90):
        self.backend = "cuda"
        self._target = GPUTarget("cuda", capability, 32)

    def get_current_target(self):
        return self._target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    @staticmethod
    def is_active():
        return True


@contextlib.contextmanager
def sm90_target(capability: int = 90):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: the interpreter does not compile; unset it to check sm_90a")
    previous = driver._active  # None on a machine without a GPU
    driver.set_active(_Sm90Driver(capability))
    try:
        yield
    finally:
        driver._active = previous


_MMA_LAYOUT = re.compile(r"#ttg\.nvidia_mma<\{[^}]*warpsPerCTA = \[(\d+), \d+\][^}]*instrShape = \[(\d+)")
_FLOAT_ATOMIC = re.compile(r"\b(?:atom|red)\.[\w.]*\.(?:f16|bf16|f32|f64|f16x2|bf16x2)\b")
_SASS_LINE = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/", re.MULTILINE)


def _cuobjdump(compiled, *flags) -> str:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([cuobjdump, *flags, f.name], capture_output=True, text=True, check=True).stdout


def resource_usage(compiled, capability: int = 90, with_sass: bool = True) -> dict:
    """Registers, spill (local) bytes, shared bytes, tensor-core instruction family, MMA layouts
    (warps along M, instruction rows), float atomics, static SASS instructions and CTAs per SM."""
    out = _cuobjdump(compiled, "--dump-resource-usage")
    fields = dict(re.findall(r"(\w+):(\d+)", out.split("Function", 1)[-1]))
    ptx = compiled.asm["ptx"]
    tensor_core = "wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else None
    regs = int(fields.get("REG", -1))
    shared = int(compiled.metadata.shared)
    warps = int(compiled.metadata.num_warps)
    regs_per_cta = -(-max(regs, 1) // 8) * 8 * 32 * warps  # allocated per warp in units of 8 per thread
    ctas = min(_REGISTERS_PER_SM // regs_per_cta, _MAX_WARPS_PER_SM // warps,
               SHARED_BYTES_PER_SM[capability] // shared if shared else 32)
    return {
        "regs": regs,
        "local_bytes": int(fields.get("LOCAL", 0)) + int(fields.get("STACK", 0)),
        "shared_bytes": shared,
        "tensor_core": tensor_core,
        "mma_layouts": sorted({(int(w), int(m)) for w, m in _MMA_LAYOUT.findall(compiled.asm["ttgir"])}),
        "float_atomics": len(_FLOAT_ATOMIC.findall(ptx)),
        "sass_instructions": len(_SASS_LINE.findall(_cuobjdump(compiled, "-sass"))) if with_sass else None,
        "ctas_per_sm": ctas,
    }


def _kernel_args(name: str, dtype: torch.dtype, dim: int, num_heads: int):
    """Arguments of the right dtypes for ``name`` (placeholders: compiling reads only dtypes and the
    integer specialisations, so the sizes are those of a real NYUDv2-like launch)."""
    from ..params import param_shapes

    def t(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt)

    n = 1200 * 2 + 1  # odd: not a multiple of any block, as in real use
    head_dim = dim // num_heads
    scale = 1.0 / head_dim ** 0.5
    rows = (t(2 * n, dim),)
    acc = {"ACC": tl.float64 if dtype == torch.float64 else tl.float32}
    if name in ("gelu_fwd", "gelu_bwd"):
        extra = (t(2 * n, dim),) if name == "gelu_bwd" else ()
        return (t(2 * n, 2 * dim), t(dim), *extra, *rows, n, dim), acc
    if name == "relation_fwd":
        return (*rows, *rows, t(2, dim), t(2, dim), *rows, *rows, n, dim), acc
    if name == "relation_bwd":
        return (*rows * 5, n, dim), acc
    if name == "gate_fwd":
        return (*rows * 5, n, dim, head_dim, num_heads, scale), acc
    if name == "gate_bwd":
        return (*rows * 7, n, dim, head_dim, num_heads, scale), acc
    params = [t(*shape) for shape in param_shapes(dim).values()]
    if name == "narrow_fwd":
        return (t(n, dim), t(n, dim), t(n, dim), t(n, dim), *params, n, scale), {}
    if name == "tiled_fwd":
        scratch = (t(1, 2, 64, dim), t(1, 64, dim))
        return (t(n, dim), t(n, dim), t(n, dim), t(n, dim), *params, *scratch, n, 264, scale), {}
    # Grid-sized buffers: one program's worth (compiling reads dtypes and alignment, not sizes).
    acc_dt = torch.promote_types(dtype, torch.float32)
    total = 11 * dim * dim + 14 * dim
    if name == "tiled_bwd":
        from .triton_kernels.tiled_bwd import NUM_SLOTS
        scratch = (t(1, NUM_SLOTS, 64, dim, dt=acc_dt), t(1, total, dt=acc_dt))
        return (*(t(n, dim),) * 6, *params, *scratch, n, 264, scale), {}
    if name == "reduce_partials":
        return (t(1, total, dt=acc_dt), t(total), 264, total), {}
    from .triton_kernels.wide_bwd import BIAS_WIDTH
    n_rows = (n + 63) // 64 * 64
    per_pixel = t(2, n_rows, dim)
    partials = t(1, BIAS_WIDTH * dim, dt=acc_dt)
    if name == "wide_bwd_heads":
        buffers = (*(per_pixel,) * 5, t(2, n_rows, num_heads, dt=acc_dt), t(1, 2, 64, dim), partials)
        return (*(t(n, dim),) * 6, *params, *buffers, n, n_rows, 132, scale), {}
    if name == "wide_bwd_relation":
        buffers = (*(per_pixel,) * 4, t(1, 3, 64, dim), partials)
        return (*(t(n, dim),) * 4, *params, *buffers, n, n_rows, 132), {}
    if name == "weight_grad":
        operands = (*(per_pixel,) * 5, t(2, n_rows, num_heads, dt=acc_dt), *(per_pixel,) * 3)
        return (*(t(n, dim),) * 4, t(2, dim), *operands, t(total), n, n_rows), {}
    if name == "reduce_bias":
        return (partials, t(total), 132), {}
    raise KeyError(name)


MATRIX_KERNELS = ("narrow_fwd", "tiled_fwd", "tiled_bwd", "wide_bwd_heads", "wide_bwd_relation", "weight_grad")


def _tile_rows(constexprs: dict) -> int:
    # weight_grad's products are (BO x BP) x (BP x BO): its tiles have BO rows.
    return constexprs.get("BM", constexprs.get("BLOCK_M", constexprs.get("BO", 1)))


def _check_one(cfg: dict, capability: int) -> dict:
    from .triton_kernels import configs as tf

    with sm90_target(capability):
        args, extra = _kernel_args(cfg["kernel"], cfg["dtype"], cfg["dim"], cfg["num_heads"])
        compiled = tf.KERNELS[cfg["kernel"]].warmup(
            *args, **extra, **cfg["constexprs"], grid=(1,),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        # Static SASS counts for the kernels that multiply matrices (the row kernels' tell nothing, and
        # disassembling ~300 of them costs the CPU suite a minute).
        usage = resource_usage(compiled, capability, with_sass=cfg["kernel"] in MATRIX_KERNELS)
    rows = _tile_rows(cfg["constexprs"])
    return {
        "arch": capability, "tile_rows": rows,
        "sass_per_row": None if usage["sass_instructions"] is None else round(usage["sass_instructions"] / rows, 1),
        "kernel": cfg["kernel"], "dtype": str(cfg["dtype"]).replace("torch.", ""), "dim": cfg["dim"],
        "constexprs": {k: v for k, v in cfg["constexprs"].items()},
        "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
        "multiplies_matrices": cfg["kernel"] in MATRIX_KERNELS, **usage,
    }


def check_all(configs=None, capability: int = 90, jobs: int = 1) -> list:
    """Compile each configuration (default: the launcher's whole table) for sm_90a (or ``capability``)
    and report it, in ``jobs`` spawned processes (compiling is CPU-bound; more than one needs the
    caller's script to be import-safe, as spawned workers import it)."""
    from .triton_kernels import configs as tf

    configs = tf.config_table() if configs is None else configs
    if jobs == 1 or len(configs) == 1:
        return [_check_one(cfg, capability) for cfg in configs]
    # Spawned workers: they import the kernels afresh, without the parent's driver state.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        return list(pool.map(_check_one, configs, [capability] * len(configs)))


def problems(row: dict) -> list:
    found = []
    arch = row.get("arch", 90)
    if row["local_bytes"] != 0:
        found.append(f"spills {row['local_bytes']} bytes to local memory")
    if row["shared_bytes"] > MAX_SHARED_BYTES[arch]:
        found.append(f"needs {row['shared_bytes']} bytes of shared memory (max {MAX_SHARED_BYTES[arch]})")
    expected = "wgmma" if arch >= 90 else "mma"
    if row["multiplies_matrices"] and row["tensor_core"] != expected:
        found.append(f"multiplies without {expected} (got {row['tensor_core']})")
    for warps_m, instr_m in row["mma_layouts"]:
        if warps_m * instr_m > row["tile_rows"]:
            found.append(f"an MMA layout puts {warps_m} warps of {instr_m}-row instructions on a "
                         f"{row['tile_rows']}-row tile: warps compute the same rows")
    if row["float_atomics"]:
        found.append(f"{row['float_atomics']} float atomics (weight gradients must be deterministic)")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--arch", type=int, choices=sorted(MAX_SHARED_BYTES), default=90,
                        help="compute capability to compile for: 90 (H100, sm_90a; default) or 80 (A100)")
    args = parser.parse_args(argv)
    report = check_all(capability=args.arch, jobs=os.cpu_count() or 1)
    failed = [(row, problems(row)) for row in report if problems(row)]
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{'kernel':13} {'dtype':9} {'dim':>5} {'constexprs':40} {'warps':>5} {'regs':>5} "
              f"{'spill':>5} {'smem':>7} {'CTA/SM':>6} {'SASS/row':>8} tensor_core")
        for row in report:
            ce = ",".join(f"{k}={v}" for k, v in row["constexprs"].items())
            print(f"{row['kernel']:13} {row['dtype']:9} {row['dim']:>5} {ce:40} {row['num_warps']:>5} "
                  f"{row['regs']:>5} {row['local_bytes']:>5} {row['shared_bytes']:>7} {row['ctas_per_sm']:>6} "
                  f"{'-' if row['sass_per_row'] is None else row['sass_per_row']:>8} {row['tensor_core']}")
        for row, found in failed:
            print(f"FAIL {row['kernel']} {row['dtype']} dim={row['dim']}: {'; '.join(found)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
