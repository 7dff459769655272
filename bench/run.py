"""The GeminiFusion benchmark: every package backend, torch.compile of the oracle, the published loop,
token exchange and full cross-attention, on the stage shapes of SPEC §4, against the floor.

    python bench/run.py                      # the default for this machine's device (see --help)
    python bench/run.py --datasets nyudv2,deliver --families mit-b0,mit-b1 --batch 8,32 --dtypes bf16,fp16

Outputs (the JSON rows, a PNG plot, the Markdown section) go to --out-dir, bench/out/ by default, which
git ignores; --append-results also appends the section to the tracked bench/RESULTS.md.

Before a variant computing GeminiFusion is timed, its outputs (and, for fwd+bwd, its input gradients)
are compared with the float64 oracle on the same inputs; one that disagrees is reported WRONG and not
timed. Token exchange and cross-attention compute other functions: they are only checked to be finite.
A variant that fails (out of memory, a library limit, a compile error) gets a row that says so.
bench/README.md explains the columns.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

import gemini_kernels as gk
from gemini_kernels.baselines import PublishedFusion, full_cross_attention, random_token_exchange
from gemini_kernels.progress import Progress
from gemini_kernels.reference import gemini_fusion_reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_report  # noqa: E402
from bench_shapes import DATASETS, FAMILIES, PASSES, Shape, stage_shapes, work  # noqa: E402
from bench_timing import copy_bandwidth, matmul_rate, peak_memory_mib, rotation_count, times_ms  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}
# Largest rel_err against the float64 oracle that a correct implementation stays under, per run dtype:
# outputs, and input gradients (one more chain of roundings).
GUARD_BATCH = 2  # batch elements the guard compares (pixels are independent; this bounds float64 memory)
BASELINE_VARIANTS = ("compile", "published", "exchange", "xattn")


@dataclass
class Case:
    """One (shape, batch, dtype): what a variant's ``build`` may use."""

    shape: Shape
    batch: int
    dtype: torch.dtype
    device: torch.device
    num_heads: int
    params: Optional[gk.FusionParams]  # run dtype, requires_grad (used without grad for fwd); set by run_case
    generator: torch.Generator


@dataclass
class Variant:
    """A row of the table. ``build(case)`` returns ``(fn, trainables)``: ``fn(x0, x1) -> (y0, y1)`` and
    the tensors it trains (their gradients are cleared between fwd+bwd runs). ``function`` names what it
    computes: "fusion" (guarded against the oracle), "exchange" or "xattn" (checked finite). A variant
    with ``unavailable`` set is not built; its rows give that reason."""

    name: str
    function: str
    build: Callable[[Case], tuple]
    unavailable: Optional[str] = None


def backend_variant(name: str) -> Variant:
    def build(case):
        return (lambda x0, x1: gk.gemini_fusion(x0, x1, case.params, case.num_heads, backend=name)), list(case.params)
    return Variant(name, "fusion", build)


def compile_variant() -> Variant:
    def build(case):
        # A fresh compile for every case; fullgraph so that a graph break is an error, not a silent
        # fallback to eager, and enough recompiles for the fwd and fwd+bwd graphs of any run.
        torch._dynamo.reset()
        if hasattr(torch._dynamo.config, "recompile_limit"):
            torch._dynamo.config.recompile_limit = 64
        torch._dynamo.config.cache_size_limit = 64
        compiled = torch.compile(gemini_fusion_reference, dynamic=False, fullgraph=True)
        return (lambda x0, x1: compiled(x0, x1, case.params, case.num_heads)), list(case.params)
    return Variant("compile", "fusion", build)


def published_variant() -> Variant:
    def build(case):
        module = PublishedFusion.from_params(case.params, case.num_heads)
        return module, list(module.parameters())
    return Variant("published", "fusion", build)


def exchange_variant() -> Variant:
    def build(case):
        module = random_token_exchange(case.shape.dim, dtype=case.dtype, device=case.device,
                                       generator=case.generator)
        return module, list(module.parameters())
    return Variant("exchange", "exchange", build)


def xattn_variant() -> Variant:
    def build(case):
        return (lambda x0, x1: full_cross_attention(x0, x1, case.params, case.num_heads)), list(case.params)
    return Variant("xattn", "xattn", build)


def all_variants(device: torch.device) -> list:
    """Every backend of the package's registry, then the baselines. A backend that does not report itself
    available on ``device`` at run time keeps its row, which gives the reason; a name that runs another
    backend on ``device`` ("cuda" on CPU runs "cpu_cpp") gets none of its own (see ``variant_aliases``)."""
    variants = []
    for name, backend in gk.backends.BACKENDS.items():
        if device.type in backend.runs_elsewhere:
            continue
        reason = backend.unavailable_reason(device)
        variants.append(backend_variant(name) if reason is None
                        else Variant(name, "fusion", build=None, unavailable=reason))
    return variants + [compile_variant(), published_variant(), exchange_variant(), xattn_variant()]


def variant_aliases(device: torch.device) -> dict:
    """{name: the variant it runs on ``device``}: ``--variants cuda`` on CPU times cpu_cpp, as
    ``backend="cuda"`` runs it there."""
    return {name: backend.runs_elsewhere[device.type] for name, backend in gk.backends.BACKENDS.items()
            if device.type in backend.runs_elsewhere}


def progress_bar(total: int) -> Progress:
    """One step per cell, on stderr (the table goes to stdout): tqdm when installed, else plain lines."""
    return Progress(total, file=sys.stderr, unit="cell")


# Messages of allocation failures that torch raises as a plain RuntimeError: the CPU allocator
# ("DefaultCPUAllocator: can't allocate memory: you tried to allocate ... bytes"), the CUDA caching
# allocator and the MPS / XPU ones ("out of memory"), and errno ENOMEM ("Cannot allocate memory").
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` says an allocation failed (any device), as opposed to a bug of the variant."""
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), torch.cuda.OutOfMemoryError,
                                  MemoryError) if t is not None)
    if isinstance(exc, oom_types):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


class Inputs:
    """The rotated input sets of one case, the output gradients, and the float64 oracle's answers on
    the first GUARD_BATCH batch elements of set 0."""

    def __init__(self, case: Case, passes: list):
        shape, g = case.shape, case.generator
        elem = torch.finfo(case.dtype).bits // 8
        count = rotation_count(case.device, 2 * case.batch * shape.tokens * shape.dim * elem)

        def randn():
            return torch.randn(case.batch, shape.tokens, shape.dim, generator=g).to(case.device, case.dtype)

        self.sets = [(randn(), randn()) for _ in range(count)]
        self.grads = (randn(), randn())
        self.grad_sets = [(a.clone().requires_grad_(), b.clone().requires_grad_()) for a, b in self.sets] \
            if "fwd+bwd" in passes else []
        k = min(GUARD_BATCH, case.batch)
        x0, x1 = (t[:k].double().requires_grad_() for t in self.sets[0])
        params64 = gk.FusionParams(*(p.detach().double() for p in case.params))
        self.ref = gemini_fusion_reference(x0, x1, params64, case.num_heads)
        self.ref_grads = None
        if "fwd+bwd" in passes:
            self.ref_grads = torch.autograd.grad(self.ref, (x0, x1), tuple(t[:k].double() for t in self.grads))
        self.ref = tuple(t.detach() for t in self.ref)
        self.guard_batch = k


def check(variant: Variant, outputs, grads, inputs: Inputs, dtype: torch.dtype) -> tuple:
    """(ok, detail): the guard against the oracle for "fusion", finiteness for the other functions."""
    tensors = list(outputs) + list(grads or [])
    if not all(torch.isfinite(t).all() for t in tensors):
        return False, "WRONG: non-finite output"
    if variant.function != "fusion":
        return True, "finite"
    k = inputs.guard_batch
    bound = guard_bound(variant, dtype)
    worst = max(rel_err(y[:k], r) for y, r in zip(outputs, inputs.ref))
    if worst > bound:
        return False, f"WRONG: rel_err {worst:.1e} > {bound:.0e}"
    if grads is not None:
        grad_worst = max(rel_err(g[:k], r) for g, r in zip(grads, inputs.ref_grads))
        if grad_worst > bound:
            return False, f"WRONG: grad rel_err {grad_worst:.1e} > {bound:.0e}"
        worst = max(worst, grad_worst)
    return True, f"ok {worst:.0e}"


def guard_bound(variant: Variant, dtype: torch.dtype) -> float:
    """The bound the tests hold a variant to: a backend's declared one (``Backend.bounds``); the
    oracle's for the other fusion variants (compiled, published), which compute its math in ``dtype``."""
    backend = gk.backends.BACKENDS.get(variant.name, gk.backends.BACKENDS["torch"])
    return backend.bounds[dtype]


def measure(variant: Variant, fn, trainables, case: Case, inputs: Inputs, pass_name: str, args) -> dict:
    """Guard, then time one variant on one case and pass; returns the row's measured fields."""
    device = case.device
    row = {}
    if pass_name == "fwd":
        def call(i=0):
            with torch.no_grad():
                return fn(*inputs.sets[i % len(inputs.sets)])

        def before(i):
            pass
    else:
        def call(i=0):
            x0, x1 = inputs.grad_sets[i % len(inputs.grad_sets)]
            outputs = fn(x0, x1)
            torch.autograd.backward(outputs, inputs.grads)
            return outputs

        def before(i):
            for t in list(inputs.grad_sets[i % len(inputs.grad_sets)]) + trainables:
                t.grad = None

    # First call: compiles, autotunes, warms caches; its time is kept apart as a compile/first-call time.
    before(0)
    t = time.perf_counter()
    call(0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    row["first_call_s"] = time.perf_counter() - t

    before(0)
    t = time.perf_counter()
    outputs = call(0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    call_s = time.perf_counter() - t
    grads = [x.grad for x in inputs.grad_sets[0]] if pass_name == "fwd+bwd" else None
    ok, row["check"] = check(variant, [o.detach() for o in outputs], grads, inputs, case.dtype)
    if not ok:
        row["status"] = "wrong"
        return row
    if call_s > args.max_call_s:
        row["status"] = "skipped"
        row["check"] += f"; not timed: one call took {call_s:.1f} s > --max-call-s {args.max_call_s:g}"
        return row
    del outputs, grads
    faults = [] if device.type == "cpu" else None
    row["ms"] = statistics.median(times_ms(lambda i: call(i), device, args.warmup, args.runs, before, faults=faults))
    row["faults"] = statistics.median(faults) if faults is not None else None
    before(0)
    row["peak_mib"] = peak_memory_mib(lambda: call(0), device)
    row["status"] = "ok"
    return row


def run_benchmark(args, variants: list) -> tuple:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    dtypes = [DTYPES[d] for d in args.dtypes]
    rates = {"matmul": {}, "copy_gbs": copy_bandwidth(device) / 1e9}
    for dtype in dtypes:
        rates["matmul"][dtype_name(dtype)] = {"tflops": matmul_rate(device, dtype) / 1e12}

    progress = progress_bar(len(args.shape_list) * len(args.batch) * len(dtypes) * len(args.passes) * len(variants))
    rows = []
    for shape in args.shape_list:
        for batch in args.batch:
            for dtype in dtypes:
                case = Case(shape, batch, dtype, device, args.heads, None, torch.Generator().manual_seed(args.seed))
                rows += run_case(case, variants, rates, args, progress)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    progress.close()
    return rows, rates


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def run_case(case: Case, variants: list, rates: dict, args, progress: Progress) -> list:
    """The rows of every pass and variant of one (shape, batch, dtype)."""
    dname = dtype_name(case.dtype)
    try:
        params = gk.random_params(case.shape.dim, dtype=case.dtype, device=case.device,
                                  generator=torch.Generator().manual_seed(args.seed))
        case.params = gk.FusionParams(*(p.requires_grad_() for p in params))
        inputs = Inputs(case, args.passes)
    except Exception as exc:  # noqa: BLE001  (no room for this case's parameters or inputs: say so, go on)
        if not is_oom(exc):
            raise
        inputs = None
        if case.device.type == "cuda":
            torch.cuda.empty_cache()
    built = {}  # each variant is built once per case, for both passes
    rows = []
    for pass_name in args.passes:
        group = []
        for variant in variants:
            progress.update(f"{case.shape} B={case.batch} {dname} {pass_name} {variant.name}")
            work_done = work(variant.function, case.shape, case.batch, torch.finfo(case.dtype).bits // 8, pass_name)
            floor_s = max(work_done.flops / (rates["matmul"][dname]["tflops"] * 1e12),
                          work_done.bytes / (rates["copy_gbs"] * 1e9))
            row = {"shape": case.shape.label, "tokens": case.shape.tokens, "dim": case.shape.dim,
                   "batch": case.batch, "dtype": dname, "pass": pass_name, "variant": variant.name,
                   "function": variant.function, "flops": work_done.flops, "bytes": work_done.bytes,
                   "floor_ms": floor_s * 1e3}
            if inputs is None:
                row.update(status="oom", check="out of memory for the parameters, inputs and the oracle's answers")
            else:
                row.update(run_cell(variant, built, case, inputs, pass_name, floor_s, args))
            if row.get("ms"):
                row["tflops"] = work_done.flops / (row["ms"] * 1e-3) / 1e12
                row["gbs"] = work_done.bytes / (row["ms"] * 1e-3) / 1e9
                row["pct_floor"] = 100.0 * row["floor_ms"] / row["ms"]
            group.append(row)
        compiled = next((r for r in group if r["variant"] == "compile" and r.get("ms")), None)
        for row in group:
            if compiled and row.get("ms"):
                row["speedup"] = compiled["ms"] / row["ms"]
        rows += group
    return rows


def run_cell(variant: Variant, built: dict, case: Case, inputs: Inputs, pass_name: str, floor_s: float,
             args) -> dict:
    """One variant on one case and pass; never raises for a failure of the variant itself."""
    if variant.unavailable:
        return {"status": "unavailable", "check": f"unavailable: {variant.unavailable}"}
    if variant.function == "xattn" and floor_s > args.max_call_s:
        return {"status": "skipped", "check": f"not run: its floor alone is {floor_s:.1f} s > --max-call-s"}
    try:
        if variant.name not in built:
            built[variant.name] = variant.build(case)
        fn, trainables = built[variant.name]
        return measure(variant, fn, trainables, case, inputs, pass_name, args)
    except Exception as exc:  # noqa: BLE001  (a failing variant is a result, not the end of the run)
        message = " ".join(str(exc).split())[:160]
        if is_oom(exc):
            if case.device.type == "cuda":
                torch.cuda.empty_cache()
            return {"status": "oom", "check": f"out of memory ({message[:100]})"}
        return {"status": "error", "check": f"failed: {type(exc).__name__}: {message}"}


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def csv(kind=str):
        return lambda text: [kind(x) for x in text.split(",") if x]

    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--datasets", type=csv(), default=["nyudv2"], help=f"of {list(DATASETS)} (default nyudv2)")
    ap.add_argument("--families", type=csv(), default=None,
                    help=f"backbone widths, of {list(FAMILIES)} (default: mit-b0,mit-b1 on GPU, mit-b1 on CPU)")
    ap.add_argument("--stages", type=csv(int), default=None, help="of 1,2,3,4 (default: all on GPU, 3,4 on CPU)")
    ap.add_argument("--shapes", type=csv(), default=None,
                    help="explicit N:C pairs, e.g. 300:512,64:16 (replaces --datasets/--families/--stages)")
    ap.add_argument("--batch", type=csv(int), default=None, help="batch sizes (default: 8,32 on GPU, 2 on CPU)")
    ap.add_argument("--dtypes", type=csv(), default=None, help=f"of {list(DTYPES)} (default: bf16 GPU, fp32 CPU)")
    ap.add_argument("--passes", type=csv(), default=list(PASSES), help="fwd, fwd+bwd (default both)")
    ap.add_argument("--variants", type=csv(), default=None,
                    help="package backends (torch, triton, cuda, cpu_cpp; on CPU, cuda times cpu_cpp) and compile, "
                         "published, exchange, xattn (default: all)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--runs", type=int, default=None, help="timed runs per cell (default: 100 GPU, 10 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 10 GPU, 2 CPU)")
    ap.add_argument("--max-call-s", type=float, default=None,
                    help="do not time a variant whose checked call took longer (default: 5 GPU, 3 CPU)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default 1 on CPU: stable per-core timings on a shared machine, "
                         "where more threads than free cores stall at every barrier; 0 = torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=BENCH_DIR / "out",
                    help="where the run's JSON, PNG and Markdown section go (default bench/out, git-ignored)")
    ap.add_argument("--append-results", action="store_true",
                    help="also append the Markdown section to --results-md (the tracked bench/RESULTS.md by "
                         "default); without it the clone is left unchanged")
    ap.add_argument("--results-md", type=Path, default=BENCH_DIR / "RESULTS.md",
                    help="the file --append-results appends to (default bench/RESULTS.md)")
    ap.add_argument("--no-results-md", action="store_true",
                    help="do not append to --results-md (the default; kept for older command lines)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--note", default="", help="a line for the RESULTS.md section (e.g. the machine's load)")
    args = ap.parse_args(argv)

    on_gpu = args.device.startswith("cuda")
    if on_gpu and not cuda:
        ap.error(f"--device {args.device}: no CUDA device is visible (torch.cuda.is_available() is False); "
                 f"run with --device cpu, or on a machine with a GPU and a CUDA build of torch")
    args.families = args.families or (["mit-b0", "mit-b1"] if on_gpu else ["mit-b1"])
    args.stages = args.stages or ([1, 2, 3, 4] if on_gpu else [3, 4])
    args.batch = args.batch or ([8, 32] if on_gpu else [2])
    args.dtypes = args.dtypes or (["bfloat16"] if on_gpu else ["float32"])
    args.runs = args.runs if args.runs is not None else (100 if on_gpu else 10)
    args.warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 2)
    args.max_call_s = args.max_call_s if args.max_call_s is not None else (5.0 if on_gpu else 3.0)
    if args.threads is None:
        args.threads = 0 if on_gpu else 1
    for name, values, allowed in (("--datasets", args.datasets, DATASETS), ("--families", args.families, FAMILIES),
                                  ("--dtypes", args.dtypes, DTYPES), ("--passes", args.passes, PASSES),
                                  ("--stages", args.stages, (1, 2, 3, 4))):
        bad = [v for v in values if v not in allowed]
        if bad:
            ap.error(f"{name}: {bad} not among {list(allowed)}")
    # Sizes that would run nothing ("ok nan" rows) or crash inside a case: refused here, naming the flag.
    for name, values, least in (("--batch", args.batch, 1), ("--heads", [args.heads], 1),
                                ("--runs", [args.runs], 1), ("--warmup", [args.warmup], 0),
                                ("--threads", [args.threads], 0)):
        bad = [v for v in values if v < least]
        if bad:
            ap.error(f"{name}: got {','.join(map(str, bad))}; expected integers >= {least}"
                     + (" (0 = torch's choice)" if name == "--threads" else ""))
    if args.max_call_s <= 0:
        ap.error(f"--max-call-s: got {args.max_call_s:g}; expected a number of seconds > 0")
    if args.shapes:
        try:
            args.shape_list = [Shape("custom", int(n), int(c)) for n, c in (s.split(":") for s in args.shapes)]
        except ValueError:
            ap.error(f"--shapes must be N:C pairs such as 300:512; got {','.join(args.shapes)}")
        bad = [f"{s.tokens}:{s.dim}" for s in args.shape_list if s.tokens < 1 or s.dim < 1]
        if bad:
            ap.error(f"--shapes: got {','.join(bad)}; expected N:C pairs of integers >= 1 (tokens N, width C)")
    else:
        args.shape_list = stage_shapes(args.datasets, args.families, args.stages)
    bad = [s for s in args.shape_list if s.dim % args.heads]
    if bad:
        ap.error(f"every width must be divisible by --heads {args.heads}; got {bad}")
    # The outputs are written after the run: a directory that cannot be written fails now, not then.
    check_writable(ap, "--out-dir", args.out_dir)
    if args.append_results:
        check_writable(ap, "--results-md", args.results_md.parent, file=args.results_md)
    return args


def check_writable(ap, flag: str, directory: Path, file: Optional[Path] = None) -> None:
    """Creates ``directory`` if needed and writes a scratch file in it (and opens ``file`` for
    appending, without changing it); an argparse error naming ``flag`` when that fails."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
        if file is not None and file.exists():
            with open(file, "a"):  # appends nothing: a file that exists keeps its contents and time
                pass
    except OSError as exc:
        ap.error(f"{flag} {file or directory}: cannot be written ({exc.strerror or exc}); expected a "
                 f"directory this user can create and write")


def main(argv=None, extra_variants=()) -> dict:
    """Runs the benchmark; ``extra_variants`` (for tests) are appended to the selected ones."""
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _main(args, extra_variants)
    finally:
        torch.set_num_threads(threads_before)


def _main(args, extra_variants) -> dict:
    device = torch.device(args.device)
    variants = all_variants(device)
    known = [v.name for v in variants]
    if args.variants:
        aliases = variant_aliases(device)
        wanted = [aliases.get(v, v) for v in args.variants]
        unknown = [v for v in wanted if v not in known]
        if unknown:
            raise SystemExit(f"--variants: {unknown} not among {known + list(aliases)}")
        for name in args.variants:
            if name in aliases:
                print(f"--variants {name}: on {device.type} that is {aliases[name]}", flush=True)
        variants = [v for v in variants if v.name in wanted]
    variants += list(extra_variants)

    env = bench_report.environment(device)
    print(f"GeminiFusion benchmark on {env['device_name']}; torch {env['torch']}, triton {env['triton']}, "
          f"CUDA {env['cuda']}; variants: {', '.join(v.name for v in variants)}", flush=True)
    rows, rates = run_benchmark(args, variants)
    meta = {"env": env, "rates": rates, "note": args.note,
            "backends": gk.available_backends(device),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                       if k != "shape_list"},
            "shapes": [str(s) for s in args.shape_list]}
    print("matmul rate: " + ", ".join(f"{d} {r['tflops']:.3g} TFLOP/s" for d, r in rates["matmul"].items())
          + f"; copy bandwidth {rates['copy_gbs']:.4g} GB/s")
    print(bench_report.text_table(rows), flush=True)

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    json_path = args.out_dir / f"{stamp}.json"
    bench_report.write_json(json_path, meta, rows)
    outputs = {"json": json_path}
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401  (optional: an offline GPU image may lack it)
        except ImportError:
            print("no plot: matplotlib is not installed", file=sys.stderr)
        else:
            outputs["png"] = args.out_dir / f"{stamp}.png"
            bench_report.plot(outputs["png"], rows, f"GeminiFusion on {env['device_name']}, torch {env['torch']}")
    section = bench_report.markdown_section(meta, rows, outputs["png"].name if "png" in outputs else "")
    outputs["section"] = args.out_dir / f"{stamp}.md"
    outputs["section"].write_text(section)
    if args.append_results and not args.no_results_md:
        bench_report.append_markdown(args.results_md, section)
        outputs["markdown"] = args.results_md
    print("wrote " + ", ".join(str(p) for p in outputs.values()))
    return {"rows": rows, "meta": meta, "outputs": outputs}


if __name__ == "__main__":
    main()
