"""The benchmark harness (bench/run.py) end to end on tiny CPU shapes."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gemini_kernels as gk


BENCH = Path(__file__).resolve().parents[1] / "bench"
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def bench_run():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_run", BENCH / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench_run"]
    sys.path.remove(str(BENCH))


def tiny(tmp_path, *extra):
    return ["--device", "cpu", "--shapes", "24:16", "--batch", "2", "--dtypes", "float32", "--runs", "2",
            "--warmup", "1", "--out-dir", str(tmp_path / "out"), "--results-md", str(tmp_path / "RESULTS.md"),
            *extra]


def test_tiny_run_writes_table_json_markdown_and_plot(bench_run, tmp_path, capsys):
    result = bench_run.main(tiny(tmp_path, "--variants", "torch,published,exchange,xattn", "--append-results"))
    rows = result["rows"]
    assert {(r["variant"], r["pass"]) for r in rows} == {
        (v, p) for v in ("torch", "published", "exchange", "xattn") for p in ("fwd", "fwd+bwd")}
    for row in rows:
        assert row["status"] == "ok", row
        assert row["ms"] > 0 and row["tflops"] > 0 and row["gbs"] > 0 and row["floor_ms"] > 0
        assert row["peak_mib"] is None  # no allocator statistics on a CPU: reported n/a, not guessed
        assert isinstance(row["faults"], (int, float)) and row["faults"] >= 0  # counted on a CPU
    guarded = {r["variant"]: r["check"] for r in rows if r["pass"] == "fwd+bwd"}
    assert guarded["torch"].startswith("ok") and guarded["exchange"] == "finite"

    out = capsys.readouterr().out
    assert "custom  N=24 C=16  B=2  float32  fwd+bwd" in out and "% floor" in out
    saved = json.loads(result["outputs"]["json"].read_text())
    assert len(saved["rows"]) == len(rows) and saved["meta"]["rates"]["copy_gbs"] > 0
    assert "torch" in saved["meta"]["backends"]
    markdown = (tmp_path / "RESULTS.md").read_text()
    assert "| custom | 24 | 16 | 2 | float32 | fwd+bwd | xattn |" in markdown and "torch 2." in markdown
    if HAVE_MATPLOTLIB:  # optional: an offline GPU image may lack it, and the run then says so
        assert result["outputs"]["png"].read_bytes()[:4] == b"\x89PNG"


def test_cuda_device_without_a_gpu_exits_with_a_clear_message(bench_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_run.torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    argv = tiny(tmp_path)
    argv[argv.index("--device") + 1] = "cuda"
    with pytest.raises(SystemExit) as exc:
        bench_run.main(argv)
    assert exc.value.code == 2
    assert "--device cuda: no CUDA device is visible" in capsys.readouterr().err


def test_guard_reports_a_wrong_variant_and_does_not_time_it(bench_run, tmp_path):
    calls = []

    def build(case):
        def forgets_the_attention(x0, x1):  # the residual alone: close to the oracle, but wrong
            calls.append(1)
            return x0 * 1.0, x1 * 1.0
        return forgets_the_attention, []

    wrong = bench_run.Variant("residual-only", "fusion", build)
    result = bench_run.main(tiny(tmp_path, "--variants", "torch", "--no-results-md", "--no-plot"),
                            extra_variants=[wrong])
    rows = {(r["variant"], r["pass"]): r for r in result["rows"]}
    for pass_name in ("fwd", "fwd+bwd"):
        row = rows["residual-only", pass_name]
        assert row["status"] == "wrong" and row["check"].startswith("WRONG: rel_err")
        assert "ms" not in row and "speedup" not in row
        assert rows["torch", pass_name]["status"] == "ok"
    assert len(calls) == 4  # per pass: the first call and the checked call, no timed runs


def test_the_guard_holds_each_variant_to_the_bounds_its_tests_assert(bench_run):
    """Issue 14: one statement of the tolerances. A backend variant gets its backend's declared bounds
    (what tests/test_triton.py and tests/test_cuda_host.py assert), the compiled and published
    variants the oracle's."""
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        for name in gk.backends.BACKENDS:
            assert bench_run.guard_bound(bench_run.backend_variant(name), dtype) == gk.backends.BACKENDS[name].bounds[dtype]
        for name in ("compile", "published"):
            variant = bench_run.Variant(name, "fusion", lambda case: None)
            assert bench_run.guard_bound(variant, dtype) == gk.backends.ORACLE_BOUNDS[dtype]


def test_a_backend_name_that_runs_another_backend_times_that_one(bench_run, tmp_path, capsys):
    """On CPU, backend="cuda" runs cpu_cpp: --variants cuda times it once, under its own name, and the
    default list has no second row of the same code."""
    cpu = torch.device("cpu")
    if gk.backends.BACKENDS["cpu_cpp"].unavailable_reason(cpu) is not None:
        pytest.fail("the compiled extension is part of the build (scripts/setup_env.sh)")
    assert [v.name for v in bench_run.all_variants(cpu)].count("cpu_cpp") == 1
    assert "cuda" not in [v.name for v in bench_run.all_variants(cpu)]
    result = bench_run.main(tiny(tmp_path, "--variants", "cuda", "--passes", "fwd", "--no-results-md", "--no-plot"))
    assert [(r["variant"], r["status"]) for r in result["rows"]] == [("cpu_cpp", "ok")]
    assert "--variants cuda: on cpu that is cpu_cpp" in capsys.readouterr().out


def test_a_failing_variant_gets_a_row_and_the_run_goes_on(bench_run, tmp_path):
    def build(case):
        raise RuntimeError("CUDA out of memory. Tried to allocate 80.00 GiB")

    result = bench_run.main(tiny(tmp_path, "--variants", "torch", "--passes", "fwd", "--no-results-md",
                                 "--no-plot"), extra_variants=[bench_run.Variant("huge", "xattn", build)])
    statuses = {r["variant"]: r["status"] for r in result["rows"]}
    assert statuses == {"torch": "ok", "huge": "oom"}


def test_compile_variant_is_guarded_and_sets_the_speedup_column(bench_run, tmp_path):
    result = bench_run.main(tiny(tmp_path, "--variants", "torch,compile", "--passes", "fwd", "--no-results-md",
                                 "--no-plot"))
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["compile"]["status"] == "ok" and rows["compile"]["check"].startswith("ok")
    assert rows["compile"]["speedup"] == pytest.approx(1.0)
    assert rows["torch"]["speedup"] == pytest.approx(rows["compile"]["ms"] / rows["torch"]["ms"])


def test_stage_shapes_follow_the_spec(bench_run):
    from bench_shapes import stage_shapes, work
    shapes = stage_shapes(["nyudv2", "deliver"], ["mit-b1"], [1, 2, 3, 4])
    assert [(s.tokens, s.dim) for s in shapes[:4]] == [(19200, 64), (4800, 128), (1200, 320), (300, 512)]
    assert [s.tokens for s in shapes[4:]] == [65536, 16384, 4096, 1024]
    forward = work("fusion", shapes[0], 2, 2, "fwd")
    assert forward.flops == 28 * 64 ** 2 * 2 * 19200  # SPEC §4: 28 C^2 per pixel, the fewest known
    assert forward.bytes == (4 * 64 * 2 * 19200 + 11 * 64 ** 2 + 14 * 64) * 2  # x0, x1, y0, y1 and the weights
    assert work("fusion", shapes[0], 2, 2, "fwd+bwd").flops == 3 * forward.flops


def test_the_scripts_read_the_harness_stage_list_and_timing_loop(bench_run):
    """Issue 14: the CPU scripts typed NYUDV2_STAGES / STAGES by hand and model_speed.py had its own
    timing loops; they read bench_shapes and time with bench_timing."""
    from bench_shapes import stage_dims
    assert stage_dims() == {1: (19200, 64), 2: (4800, 128), 3: (1200, 320), 4: (300, 512)}
    for script in ("cpu_host_vs_oracle.py", "experiments/save_activations.py", "experiments/cpu_layer_stack.py",
                   "model_speed.py", "model_cpu_step.py"):
        code = (BENCH / script).read_text().split('"""', 2)[-1]  # after the docstring
        assert "19200" not in code and "perf_counter" not in code and "cuda.Event" not in code, script
        assert "from bench_timing import" in code, script


def test_interleaved_timing_gives_each_variant_its_own_runs(bench_run):
    import time

    import torch
    from bench_timing import interleaved_times_ms

    for blocks in (False, True):
        order = []
        calls = {"slow": lambda: (order.append("slow"), time.sleep(0.02)), "fast": lambda: order.append("fast")}
        out = interleaved_times_ms(calls, torch.device("cpu"), warmup=1, runs=3, blocks=blocks)
        assert order.count("slow") == order.count("fast") == 4
        assert order[:2] == (["slow", "slow"] if blocks else ["slow", "fast"])
        (slow, slow_faults), (fast, _) = out["slow"], out["fast"]
        assert len(slow) == len(fast) == len(slow_faults) == 3
        assert min(slow) >= 20 > max(fast), (slow, fast)


def test_the_cpu_matmul_rate_is_the_faster_of_mkl_and_onednn(bench_run, monkeypatch):
    """torch's CPU F.linear of float32 is MKL's, at half oneDNN's rate on AMD CPUs, which halved the
    floor there: the rate takes oneDNN's GEMM too, where it computes the same product."""
    import bench_timing

    x, weight = torch.randn(64, 48, dtype=torch.float64), torch.randn(32, 48, dtype=torch.float64)
    assert bench_timing._onednn_linear(x, weight) is None  # no float64 GEMM in oneDNN
    onednn = bench_timing._onednn_linear(x.float(), weight.float())
    if torch.backends.mkldnn.is_available():
        out = onednn().to_dense()
        assert ((out.double() - x @ weight.T).norm() / (x @ weight.T).norm()).item() < 1e-5
    # The rate is the faster library's: oneDNN timed ten times slower than F.linear leaves F.linear's.
    calls = []
    monkeypatch.setattr(bench_timing, "_onednn_linear", lambda x, w: lambda: calls.append(1))
    monkeypatch.setattr(bench_timing, "times_ms", lambda call, device, warmup, runs: (
        call(0), [10.0 if calls else 1.0] * runs)[1])
    assert bench_timing.matmul_rate(torch.device("cpu"), torch.float32) == 2.0 * 1024 ** 3 / 1e-3
    monkeypatch.setattr(bench_timing, "times_ms", lambda call, device, warmup, runs: (
        call(0), [0.5 if calls else 1.0] * runs)[1])
    calls.clear()
    assert bench_timing.matmul_rate(torch.device("cpu"), torch.float32) == 2.0 * 1024 ** 3 / 0.5e-3


def test_a_case_whose_inputs_do_not_fit_gets_oom_rows(bench_run, tmp_path, monkeypatch):
    def no_room(case, passes):
        raise RuntimeError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(bench_run, "Inputs", no_room)
    result = bench_run.main(tiny(tmp_path, "--variants", "torch,published", "--no-results-md", "--no-plot"))
    assert len(result["rows"]) == 4 and all(r["status"] == "oom" for r in result["rows"])


@pytest.mark.parametrize("flag, value", [
    ("--shapes", "0:16"), ("--shapes", "64:0"), ("--shapes", "64:-16"), ("--batch", "0"), ("--batch", "2,-1"),
    ("--heads", "0"), ("--threads", "-1"), ("--runs", "0"), ("--warmup", "-1"), ("--max-call-s", "0"),
])
def test_sizes_that_run_nothing_are_argparse_errors_naming_the_flag(bench_run, tmp_path, capsys, flag, value):
    argv = tiny(tmp_path)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    with pytest.raises(SystemExit) as exc:
        bench_run.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag}: got {value.split(',')[-1]}" in err and "expected" in err, err


def test_a_case_the_cpu_allocator_refuses_gets_oom_rows_and_the_run_goes_on(bench_run, tmp_path):
    # C = 8e6: each C x C weight is 256 TB, past any machine's address space, so the allocation fails
    # ("DefaultCPUAllocator: can't allocate memory") whatever the overcommit policy.
    result = bench_run.main(tiny(tmp_path, "--shapes", "4:8000000,24:16", "--variants", "torch", "--passes", "fwd",
                                 "--no-plot"))
    rows = {r["dim"]: r for r in result["rows"]}
    assert rows[8000000]["status"] == "oom" and rows[8000000]["check"].startswith("out of memory")
    assert rows[16]["status"] == "ok"


def test_a_variant_the_cpu_allocator_refuses_gets_an_oom_row(bench_run, tmp_path):
    def build(case):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 824633720832 bytes. Error code 12 (Cannot allocate memory)")

    result = bench_run.main(tiny(tmp_path, "--variants", "torch", "--passes", "fwd", "--no-plot"),
                            extra_variants=[bench_run.Variant("huge", "xattn", build)])
    statuses = {r["variant"]: r["status"] for r in result["rows"]}
    assert statuses == {"torch": "ok", "huge": "oom"}
    assert bench_run.is_oom(bench_run.torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert not bench_run.is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_an_unwritable_out_dir_is_refused_before_the_run(bench_run, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = tiny(tmp_path)
    argv[argv.index("--out-dir") + 1] = str(blocker / "out")  # a directory under a file: cannot be made
    monkeypatch.setattr(bench_run, "run_benchmark", lambda *a: pytest.fail("ran before checking --out-dir"))
    with pytest.raises(SystemExit) as exc:
        bench_run.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--out-dir {blocker / 'out'}: cannot be written" in err and "expected" in err


def test_results_go_to_the_out_dir_and_results_md_only_when_asked(bench_run, tmp_path):
    argv = tiny(tmp_path, "--variants", "torch", "--passes", "fwd", "--no-plot")
    result = bench_run.main(argv)
    assert not (tmp_path / "RESULTS.md").exists() and "markdown" not in result["outputs"]
    section = result["outputs"]["section"]
    assert section.parent == tmp_path / "out" and section.suffix == ".md"
    assert "| custom | 24 | 16 | 2 | float32 | fwd | torch |" in section.read_text()

    result = bench_run.main(argv + ["--append-results"])
    assert result["outputs"]["markdown"] == tmp_path / "RESULTS.md"
    assert "| custom | 24 | 16 | 2 | float32 | fwd | torch |" in (tmp_path / "RESULTS.md").read_text()


def test_the_default_outputs_leave_the_clone_clean(bench_run):
    args = bench_run.parse_args(["--device", "cpu"])
    assert not args.append_results and args.out_dir == BENCH / "out"
    git = shutil.which("git")
    if git is None or not (BENCH.parent / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run([git, "check-ignore", "-q", str(BENCH / "out" / "x.json")], cwd=BENCH.parent)
    assert ignored.returncode == 0, "bench/out/ must be git-ignored"


@pytest.mark.gpu
def test_gpu_run_times_every_available_backend_with_events_and_peak_memory(bench_run, tmp_path):
    argv = tiny(tmp_path, "--no-results-md")
    argv[argv.index("--device") + 1] = "cuda"
    argv[argv.index("--dtypes") + 1] = "bfloat16,float32"
    argv[argv.index("--shapes") + 1] = "300:64,1200:320"
    result = bench_run.main(argv)
    for row in result["rows"]:
        if row["variant"] in gk.available_backends("cuda") + ["compile", "published", "exchange", "xattn"]:
            assert row["status"] == "ok", row
            assert row["peak_mib"] > 0 and row["ms"] > 0
    assert result["meta"]["env"]["driver"]
    assert not HAVE_MATPLOTLIB or result["outputs"]["png"].exists()


def test_call_overhead_times_each_cpu_backend(bench_run, capsys):
    """bench/call_overhead.py: the host time per call of every backend available on the CPU (Triton,
    interpreted there, left out), three passes each."""
    spec = importlib.util.spec_from_file_location("call_overhead", BENCH / "call_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        results = module.main(["--device", "cpu", "--calls", "3", "--repeats", "2"])
    finally:
        torch.set_num_threads(threads)
    expected = [b for b in gk.available_backends("cpu") if b != "triton"]
    assert list(results) == expected and "torch" in expected
    for backend, row in results.items():
        assert list(row) == ["no_grad forward", "forward with grad", "forward + backward"], backend
        assert all(0 < t < 1e6 for t in row.values()), (backend, row)
    out = capsys.readouterr().out
    assert "host time per call" in out and all(b in out for b in expected)
