"""The launch ledger: what one GeminiFusion call does on the GPU, counted on any machine.

For a backend, a stage shape and a pass, it lists every launch the call makes (a Triton kernel or a
device-level aten op), the DRAM bytes each reads and writes (each launch's tensor arguments counted
once at their full size, scratch included), the matrix-product FLOPs, the bytes kept for the
backward, and compares the totals with the minimum of SPEC §4 (``gemini_kernels.cost``).

It counts, it does not time: the call runs on ``meta`` tensors (shapes, no data), Triton launches
are recorded instead of run and aten ops are recorded by a dispatch mode, so the counts are exact,
deterministic and the same on a laptop as in CI. A memory-bound kernel's speed follows its bytes;
what a GPU makes of them is the benchmark's business (``bench/run.py``). The one column that is not a
count, "model ms", is a roofline over the counted launches (``Roofline``: assumed H100 rates, the
SMs a persistent grid occupies): a model to compare designs, never a measurement.

    python -m gemini_kernels.ledger                      # triton and the eager oracle, NYUDv2 stages, bf16, batch 32
    python -m gemini_kernels.ledger --backends triton --passes fwd --detail
    python -m gemini_kernels.ledger --backends cuda,torch       # the CUDA C++ backend's GPU plan

Counted backends: ``triton`` (its launchers, as its custom ops call them; what autograd saves, through
the custom op), ``torch`` (the eager oracle, forward and autograd backward) and ``cuda``
(``count_cuda``: the GPU plan of the compiled extension as its CUDA build runs it: the fused forward
of narrow 16-bit layers (csrc/fused_forward.h) as one launch reading x0, x1 and the parameters and
writing y0, y1 and the gates, and their fused backward (csrc/fused_backward.h) as one launch writing
dx0, dx1 and the partial sums of an H100's programs (csrc/fused_backward.h,
fused_backward_programs_within) and one reducing those into the parameters' gradients; the fused
forward and backward of wide 16-bit layers (csrc/wide_forward.h, csrc/wide_backward.h) as five and
eight launches, each reading and writing what its pass does (a buffer once a launch); or the chain of csrc/fusion_chain.h as one range, its aten ops recorded
as they are called, each row stage as one launch that reads and writes what the stage declares; the
packed weights found in their cache, so a training step's one packing per parameter version is not
counted). Grid-sized buffers
(the tiled kernels' scratch and partials) are counted with the grid of an H100 / H200 (132 SMs),
once per launch while all programs' buffers fit in its 50 MiB of L2, and reread and rewritten for
every tile the grid walks when they do not.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import weakref
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .cost import Work, fusion_floor
from .params import FusionParams, param_shapes
from .shapes import stage_dims

_NO_LAUNCH_PREFIXES = ("empty", "new_empty", "lift_fresh", "detach", "alias")
_FILL_PREFIXES = ("new_zeros", "new_ones", "new_full", "zeros_like", "ones_like", "full_like", "zeros", "ones")
# L2 of an H100 SXM / H200: a persistent kernel's per-program buffers that fit stay there; those that
# do not are DRAM traffic for every tile the grid walks.
L2_BYTES = 50 * 2 ** 20


@dataclass(frozen=True)
class Roofline:
    """A time model of an H100 SXM for counted launches. A launch costs ``launch_s`` plus the longer
    of its bytes at ``dram_bytes_per_s`` and its FLOPs at a compute rate: cuBLAS products (aten
    mm / bmm) at ``gemm_flops``; a Triton kernel's tile products at ``triton_sm_flops`` per SM on the
    SMs its grid occupies (a persistent grid of P programs: min(P, SMs); any other grid: all SMs).
    The rates are assumptions (the tensor cores' dense bf16 peak is ~990 TFLOP/s: 600 for cuBLAS,
    a third of an SM's share for the Triton tiles), not calibrated against this project's kernels."""
    launch_s: float = 4e-6
    dram_bytes_per_s: float = 3.0e12
    gemm_flops: float = 600e12
    triton_sm_flops: float = 2.5e12
    sms: int = 132

    def seconds(self, launch: "Launch") -> float:
        if launch.triton:
            sms = self.sms if launch.programs is None else min(launch.programs, self.sms)
            rate = self.triton_sm_flops * sms
        else:
            rate = self.gemm_flops
        return self.launch_s + max(launch.bytes / self.dram_bytes_per_s, launch.flops / rate)


H100_MODEL = Roofline()


@dataclass
class Launch:
    name: str
    bytes_read: int
    bytes_written: int
    flops: int
    programs: Optional[int] = None  # a persistent Triton kernel's grid (None: not persistent)
    triton: bool = False  # a Triton kernel (else an aten op)

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


@dataclass
class Ledger:
    backend: str
    passes: str
    dim: int
    pixels: int
    dtype: torch.dtype
    launches: List[Launch] = field(default_factory=list)
    saved_bytes: int = 0  # kept by the forward for the backward, beyond x0, x1 and the parameters
    backward_peak_bytes: int = 0  # largest live intermediate bytes during the backward

    @property
    def floor(self) -> Work:
        return fusion_floor(self.dim, self.pixels, self.dtype.itemsize, self.passes)

    @property
    def bytes(self) -> int:
        return sum(launch.bytes for launch in self.launches)

    @property
    def flops(self) -> int:
        return sum(launch.flops for launch in self.launches)

    @property
    def smallest_grid(self) -> Optional[int]:
        """The fewest programs among the call's persistent launches (None: there are none)."""
        grids = [launch.programs for launch in self.launches if launch.programs is not None]
        return min(grids) if grids else None

    def model_seconds(self, model: Roofline = H100_MODEL) -> float:
        """The roofline model's time for the call's launches (not a measurement)."""
        return sum(model.seconds(launch) for launch in self.launches)

    @property
    def bytes_over_floor(self) -> float:
        return self.bytes / self.floor.bytes

    @property
    def flops_over_floor(self) -> float:
        return self.flops / self.floor.flops


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _matmul_flops(name: str, args, out) -> int:
    """2 x multiply-adds of the matrix products among aten ops (the rest count 0 FLOPs)."""
    if name in ("mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_"):
        a = args[1] if name.startswith(("addmm", "baddbmm")) else args[0]
        return 2 * out.numel() * a.shape[-1]
    return 0


class _Recorder(TorchDispatchMode):
    """Records aten ops that launch work (not views, not allocations) and tracks live intermediates."""

    def __init__(self, ledger: Ledger):
        super().__init__()
        self.ledger = ledger
        self.live = 0
        self.peak = 0
        self.tracking = False

    def _allocated(self, t: torch.Tensor):
        if not self.tracking:
            return
        size = _nbytes(t)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._freed, size)

    def _freed(self, size: int):
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name == "chain_stage":  # a row stage of the cuda backend, announced by its counting run
            stage, reads, writes, *flops = args
            self.ledger.launches.append(Launch(stage, sum(map(_nbytes, reads)), sum(map(_nbytes, writes)),
                                               flops[0] if flops else 0))
            return out
        if func.is_view or name.startswith(_NO_LAUNCH_PREFIXES):
            if name.startswith(("empty", "new_empty")):
                self._allocated(out)
            return out
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outs:  # e.g. promote_types: answered on the host
            return out
        inplace = name.endswith("_") or "out" in kwargs
        written = sum(_nbytes(t) for t in outs)
        read = sum(_nbytes(t) for t in ins if not (inplace and any(t is o for o in outs)))
        if name.startswith(_FILL_PREFIXES):  # x.new_zeros(...) takes x's dtype and device, not its data
            read = 0
        first = outs[0] if outs else None
        self.ledger.launches.append(Launch(name, read, written, _matmul_flops(name, args, first)))
        if not inplace:
            for t in outs:
                self._allocated(t)
        return out


@contextlib.contextmanager
def _recording_triton(ledger: Ledger):
    """Triton kernels of the backend record their launch instead of running."""
    from .ops.triton_kernels import configs

    def recorder(name, kernel, spec):
        def run(*args, grid=None, warmup=False, **kwargs):
            bound = dict(zip(kernel.arg_names, args), **kwargs)
            tensors = {k: v for k, v in bound.items() if isinstance(v, torch.Tensor)}
            written = sum(_nbytes(t) for k, t in tensors.items() if k in spec.writes)
            read = sum(_nbytes(t) for k, t in tensors.items() if k not in spec.writes)
            programs = None
            if spec.grid_buffers is not None:
                buffers, tiles, programs = spec.grid_buffers(bound)
                if buffers > L2_BYTES:  # reread and rewritten per tile beyond each program's first
                    per_program = buffers // programs
                    read += (tiles - programs) * per_program
                    written += (tiles - programs) * per_program
            ledger.launches.append(Launch(name, read, written, spec.flops(bound) if spec.flops else 0, programs,
                                          triton=True))
        return run

    patched = []
    for name, kernel in configs.KERNELS.items():
        patched.append((kernel, kernel.__dict__.get("run")))
        kernel.run = recorder(name, kernel, configs.LAUNCH_SPECS[name])
    try:
        yield
    finally:
        for kernel, previous in patched:
            if previous is None:
                del kernel.run
            else:
                kernel.run = previous


def _meta_case(dim: int, pixels: int, dtype: torch.dtype):
    x0, x1 = (torch.empty(pixels, dim, dtype=dtype, device="meta") for _ in range(2))
    params = FusionParams(*(torch.empty(*s, dtype=dtype, device="meta") for s in param_shapes(dim).values()))
    return x0, x1, params


def _saved_bytes(forward, *inputs) -> int:
    """Bytes autograd keeps for the backward of ``forward(*inputs)``, beyond the inputs themselves."""
    leaves = [t if t.requires_grad else t.detach().requires_grad_() for t in inputs]
    leaf_ids = {id(t) for t in leaves}
    saved = {}

    def pack(t):
        if id(t) not in leaf_ids:
            saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(*leaves)
    return sum(saved.values())


def count(backend: str, dim: int, pixels: int, dtype: torch.dtype = torch.bfloat16, passes: str = "fwd",
          num_heads: int = 8) -> Ledger:
    """The ledger of one call of ``backend`` on ``pixels`` pixels (batch x tokens) of width ``dim``."""
    if passes not in ("fwd", "fwd+bwd"):
        raise ValueError(f"passes must be 'fwd' or 'fwd+bwd'; got {passes!r}")
    ledger = Ledger(backend, passes, dim, pixels, dtype)
    x0, x1, params = _meta_case(dim, pixels, dtype)
    recorder = _Recorder(ledger)
    if backend == "triton":
        from .ops import triton_fusion
        from .ops.triton_kernels.launch import backward_rows, forward_rows

        # What autograd keeps: the custom op's forward on meta tensors runs its fake implementation,
        # and its setup_context saves what the backward will get.
        ledger.saved_bytes = _saved_bytes(lambda *t: triton_fusion.fusion_fwd_op(t[0], t[1], list(t[2:]), num_heads),
                                          x0, x1, *params)
        with _recording_triton(ledger), recorder:
            y0, y1 = forward_rows(x0, x1, params, num_heads)
            if passes == "fwd+bwd":
                # The custom op's autograd saves x0, x1 and the parameters only (triton_fusion.py).
                gy0, gy1 = torch.empty_like(y0), torch.empty_like(y1)
                recorder.tracking = True
                grads = backward_rows(gy0, gy1, x0, x1, params, num_heads)
                del grads
        ledger.backward_peak_bytes = recorder.peak
        return ledger
    if backend == "torch":
        from .reference import gemini_fusion_reference

        leaves = [t.requires_grad_() for t in (x0, x1, *params)]
        ledger.saved_bytes = _saved_bytes(
            lambda *t: gemini_fusion_reference(t[0], t[1], FusionParams(*t[2:]), num_heads), *leaves)
        with recorder:
            y0, y1 = gemini_fusion_reference(leaves[0], leaves[1], FusionParams(*leaves[2:]), num_heads)
        if passes == "fwd+bwd":
            gy0, gy1 = torch.empty_like(y0), torch.empty_like(y1)
            with recorder:
                recorder.tracking = True
                torch.autograd.grad((y0, y1), leaves, (gy0, gy1))
            ledger.backward_peak_bytes = recorder.peak
        return ledger
    hint = " (the compiled cuda backend: count_cuda)" if backend == "cuda" else ""
    raise ValueError(f"the ledger counts backend 'triton' or 'torch'; got {backend!r}{hint}")


def count_cuda(dim: int, pixels: int, dtype: torch.dtype = torch.bfloat16, passes: str = "fwd",
               num_heads: int = 8) -> Ledger:
    """The ledger of one call of the ``cuda`` backend's GPU plan, as ``count`` is of the Python
    backends: counted by the compiled extension's counting run (its ops count_forward and
    count_backward), so it needs the extension, not a GPU."""
    from .ops import cuda_fusion

    if passes not in ("fwd", "fwd+bwd"):
        raise ValueError(f"passes must be 'fwd' or 'fwd+bwd'; got {passes!r}")
    if not cuda_fusion._load():
        raise RuntimeError(f"the ledger counts backend 'cuda' through its extension: {cuda_fusion._load_error}")
    ledger = Ledger("cuda", passes, dim, pixels, dtype)
    x0, x1, params = _meta_case(dim, pixels, dtype)
    params = list(params)
    recorder = _Recorder(ledger)
    ops = torch.ops.gemini_kernels
    # An earlier call packs the weights into the cache (the chain's forward, or the backward where the
    # forward is fused and reads the parameters as they are): one packing per parameter version.
    y0, y1, gate = ops.count_forward(x0, x1, params, num_heads)
    if passes == "fwd+bwd":
        ops.count_backward(torch.empty_like(y0), torch.empty_like(y1), x0, x1, params, gate, num_heads)
    with recorder:
        y0, y1, gate = ops.count_forward(x0, x1, params, num_heads)
    # On CUDA the backward recomputes the activations (cuda_fusion.saves_activations): autograd keeps
    # the gates beyond the inputs and the parameters.
    ledger.saved_bytes = _nbytes(gate)
    if ledger.passes == "fwd+bwd":
        gy0, gy1 = torch.empty_like(y0), torch.empty_like(y1)
        with recorder:
            recorder.tracking = True
            grads = ops.count_backward(gy0, gy1, x0, x1, params, gate, num_heads)
            del grads
        ledger.backward_peak_bytes = recorder.peak
    return ledger


def table(ledgers: Sequence[Ledger]) -> str:
    lines = [f"{'backend':8} {'pass':8} {'C':>5} {'pixels':>7} {'launches':>8} {'MB':>9} {'x floor':>7} "
             f"{'GFLOP':>7} {'x floor':>7} {'saved MB':>8} {'bwd peak MB':>11} {'grid':>5} {'model ms':>8}"]
    for lg in ledgers:
        lines.append(f"{lg.backend:8} {lg.passes:8} {lg.dim:>5} {lg.pixels:>7} {len(lg.launches):>8} "
                     f"{lg.bytes / 1e6:>9.1f} {lg.bytes_over_floor:>7.2f} {lg.flops / 1e9:>7.1f} "
                     f"{lg.flops_over_floor:>7.2f} {lg.saved_bytes / 1e6:>8.1f} {lg.backward_peak_bytes / 1e6:>11.1f} "
                     f"{lg.smallest_grid if lg.smallest_grid is not None else '-':>5} "
                     f"{lg.model_seconds() * 1e3:>8.2f}")
    return "\n".join(lines)


def detail(lg: Ledger) -> str:
    rows = [f"{lg.backend} {lg.passes} C={lg.dim} pixels={lg.pixels} {str(lg.dtype).replace('torch.', '')}:"]
    for i, launch in enumerate(lg.launches):
        grid = f"  grid {launch.programs}" if launch.programs is not None else ""
        rows.append(f"  {i:3} {launch.name:24} read {launch.bytes_read / 1e6:9.2f} MB  write "
                    f"{launch.bytes_written / 1e6:9.2f} MB  {launch.flops / 1e9:8.2f} GFLOP  "
                    f"model {H100_MODEL.seconds(launch) * 1e3:7.3f} ms{grid}")
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    parser = argparse.ArgumentParser(description="Count the launches, DRAM bytes and FLOPs of one GeminiFusion "
                                                 "call (on meta tensors: counts, not timings).")
    parser.add_argument("--backends", default="triton,torch", help="comma-separated: triton, torch, cuda")
    parser.add_argument("--passes", default="fwd,fwd+bwd", help="comma-separated: fwd, fwd+bwd")
    parser.add_argument("--batch", type=int, default=32, help="images per call (default 32)")
    parser.add_argument("--dtype", choices=sorted(dtypes), default="bf16")
    parser.add_argument("--detail", action="store_true", help="also list every launch")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be at least 1; got {args.batch}")
    ledgers = []
    for backend in args.backends.split(","):
        for passes in args.passes.split(","):
            for tokens, dim in stage_dims("nyudv2", "mit-b1").values():
                counter = count_cuda if backend == "cuda" else functools.partial(count, backend)
                ledgers.append(counter(dim, args.batch * tokens, dtypes[args.dtype], passes))
    print(f"NYUDv2 stages, batch {args.batch}, {args.dtype}; floor: SPEC §4 (gemini_kernels.cost); "
          f"model ms: a roofline with assumed H100 rates (ledger.Roofline), not a measurement")
    print(table(ledgers))
    if args.detail:
        for lg in ledgers:
            print(detail(lg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
