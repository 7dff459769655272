"""Compile every Triton configuration the launcher can pick for an H100 (sm_90a), without a GPU.

Triton's compiler and the ptxas it ships run anywhere; only launching needs a device. With a stand-in
driver that reports compute capability 9.0, ``kernel.warmup(...)`` compiles a kernel for sm_90a on
this machine, so a CPU-only CI can check what the interpreter cannot: that each configuration
compiles at all, spills no registers, fits in shared memory, and multiplies on the tensor cores.

Run in a process where TRITON_INTERPRET is unset (the interpreter replaces compilation):

    python -m gemini_kernels.ops.sm90_check            # table of every configuration; exit 1 on a failure
    python -m gemini_kernels.ops.sm90_check --json     # the same, as JSON (used by the tests)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.driver import CudaDriver
from triton.runtime import driver

# The H100's opt-in shared memory per block.
SM90_MAX_SHARED_BYTES = 227 * 1024


class _Sm90Driver(CudaDriver):
    """Reports an sm_90 device to the compiler and never touches hardware."""

    def __init__(self):
        self.backend = "cuda"
        self._target = GPUTarget("cuda", 90, 32)

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
def sm90_target():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: the interpreter does not compile; unset it to check sm_90a")
    previous = driver._active  # None on a machine without a GPU
    driver.set_active(_Sm90Driver())
    try:
        yield
    finally:
        driver._active = previous


def resource_usage(compiled) -> dict:
    """Registers, spill (local) bytes, shared bytes and tensor-core instruction family of a compiled kernel."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(\w+):(\d+)", out.split("Function", 1)[-1]))
    ptx = compiled.asm["ptx"]
    tensor_core = "wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else None
    return {
        "regs": int(fields.get("REG", -1)),
        "local_bytes": int(fields.get("LOCAL", 0)) + int(fields.get("STACK", 0)),
        "shared_bytes": int(compiled.metadata.shared),
        "tensor_core": tensor_core,
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
        return (*rows * 5, 2 * n, dim), acc
    if name == "gate_fwd":
        return (*rows * 5, 2 * n, dim, head_dim, num_heads, scale), acc
    if name == "gate_bwd":
        return (*rows * 7, 2 * n, dim, head_dim, num_heads, scale), acc
    params = [t(*shape) for shape in param_shapes(dim).values()]
    if name == "narrow_fwd":
        return (t(n, dim), t(n, dim), t(n, dim), t(n, dim), *params, n, scale), {}
    if name == "tiled_fwd":
        programs, bm = 264, 64
        scratch = (t(programs, 2, bm, dim), t(programs, bm, dim))
        return (t(n, dim), t(n, dim), t(n, dim), t(n, dim), *params, *scratch, n, programs, scale), {}
    raise KeyError(name)


def check_all(configs=None) -> list:
    """Compile each configuration (default: the launcher's whole table) for sm_90a and report it."""
    from .triton_kernels import configs as tf

    configs = tf.config_table() if configs is None else configs
    report = []
    with sm90_target():
        for cfg in configs:
            args, extra = _kernel_args(cfg["kernel"], cfg["dtype"], cfg["dim"], cfg["num_heads"])
            compiled = tf.KERNELS[cfg["kernel"]].warmup(
                *args, **extra, **cfg["constexprs"], grid=(1,),
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            usage = resource_usage(compiled)
            report.append({
                "kernel": cfg["kernel"], "dtype": str(cfg["dtype"]).replace("torch.", ""), "dim": cfg["dim"],
                "constexprs": {k: v for k, v in cfg["constexprs"].items()},
                "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
                "multiplies_matrices": cfg["kernel"] in ("narrow_fwd", "tiled_fwd"), **usage,
            })
    return report


def problems(row: dict) -> list:
    found = []
    if row["local_bytes"] != 0:
        found.append(f"spills {row['local_bytes']} bytes to local memory")
    if row["shared_bytes"] > SM90_MAX_SHARED_BYTES:
        found.append(f"needs {row['shared_bytes']} bytes of shared memory (max {SM90_MAX_SHARED_BYTES})")
    if row["multiplies_matrices"] and row["tensor_core"] != "wgmma":
        found.append(f"multiplies without wgmma (got {row['tensor_core']})")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = check_all()
    failed = [(row, problems(row)) for row in report if problems(row)]
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{'kernel':13} {'dtype':9} {'dim':>5} {'constexprs':40} {'warps':>5} {'regs':>5} "
              f"{'spill':>5} {'smem':>7} tensor_core")
        for row in report:
            ce = ",".join(f"{k}={v}" for k, v in row["constexprs"].items())
            print(f"{row['kernel']:13} {row['dtype']:9} {row['dim']:>5} {ce:40} {row['num_warps']:>5} "
                  f"{row['regs']:>5} {row['local_bytes']:>5} {row['shared_bytes']:>7} {row['tensor_core']}")
        for row, found in failed:
            print(f"FAIL {row['kernel']} {row['dtype']} dim={row['dim']}: {'; '.join(found)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
