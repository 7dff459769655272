"""Every configuration the Triton launchers can pick compiles for an H100 (sm_90a), spills nothing, fits in shared memory, multiplies on the tensor cores, puts no two warps on
the same rows and has no float atomics: checked on CPU by compiling with Triton's bundled ptxas
(gemini_kernels.ops.sm90_check), in a subprocess without TRITON_INTERPRET, because the interpreter
accepts kernels the compiler rejects and says nothing about registers."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.driver", reason="this triton build has no NVIDIA backend (ptxas)")


def _without_interpreter():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def report():
    # sm_80 (`--arch 80`) is not asserted: the configurations are tuned for sm_90a and spill 32-200
    # bytes on the A100's mma.sync (docs/triton.md, bench/RESULTS.md).
    run = subprocess.run([sys.executable, "-m", "gemini_kernels.ops.sm90_check", "--json"],
                         env=_without_interpreter(), capture_output=True, text=True, timeout=1200)
    assert run.stdout.strip(), f"sm90_check printed no report (exit {run.returncode}):\n{run.stderr[-4000:]}"
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_every_launcher_configuration_compiles(report):
    # Imported here, not at module level: this process may run the interpreter, which is fine for
    # reading the table but would not compile.
    import torch
    from gemini_kernels.ops.triton_kernels import configs as tf
    from gemini_kernels.ops.sm90_check import problems

    table = tf.config_table()
    assert len(report) == len(table)
    assert {row["kernel"] for row in report} == set(tf.KERNELS)
    assert {row["dtype"] for row in report} == {str(d).replace("torch.", "") for d in
                                                (torch.float32, torch.bfloat16, torch.float16, torch.float64)}
    assert max(row["dim"] for row in report) == 1536
    bad = [f"{row['kernel']} {row['dtype']} dim={row['dim']} {row['constexprs']} warps={row['num_warps']}: "
           + "; ".join(problems(row)) for row in report if problems(row)]
    assert not bad, "\n".join(bad)


def test_every_configuration_fits_the_smallest_shared_memory(report):
    """The launcher picks one configuration for every GPU it runs on (compute capability 8.0 and up),
    so each must fit the smallest shared memory per block among them: sm_86 / sm_89's 99 KB."""
    from gemini_kernels.ops.sm90_check import SMALLEST_SHARED_BYTES

    too_big = [(row["kernel"], row["dtype"], row["dim"], row["shared_bytes"]) for row in report
               if row["shared_bytes"] > SMALLEST_SHARED_BYTES]
    assert not too_big, too_big


def test_cpu_without_interpreter_is_unavailable_with_a_reason():
    code = ("import gemini_kernels as gk; from gemini_kernels.ops import triton_fusion as t; "
            "print('triton' in gk.available_backends('cpu')); print(t.unavailable_reason('cpu'))")
    run = subprocess.run([sys.executable, "-c", code], env=_without_interpreter(), capture_output=True,
                         text=True, timeout=300, check=True)
    available, reason = run.stdout.strip().splitlines()
    assert available == "False" and "TRITON_INTERPRET=1" in reason


def test_persistent_grid_fits_the_compiled_occupancy(report):
    """The tiled kernels' grids (SMs x ctas_per_sm programs) assume that many CTAs fit on an SM."""
    from gemini_kernels.ops.triton_kernels import configs

    for row in report:
        if row["kernel"] == "tiled_fwd":
            c = row["constexprs"]
            dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[row["dtype"]]
            cfg = configs.tiled_config(c["C"], c["NUM_HEADS"], dtype, allow_tf32=c["PRECISION"] == "tf32")
            assert cfg.ctas_per_sm <= row["ctas_per_sm"], row
        if row["kernel"] == "tiled_bwd":
            c = row["constexprs"]
            dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[row["dtype"]]
            assert configs.tiled_bwd_config(c["C"], c["NUM_HEADS"], dtype).ctas_per_sm <= row["ctas_per_sm"], row
        if row["multiplies_matrices"]:
            assert row["mma_layouts"], row  # it multiplies on the tensor cores, in some MMA layout
