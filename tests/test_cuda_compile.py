"""The CUDA sources compile, without a GPU: every csrc/*.cu with nvcc for sm_90 and sm_80, and the
torch-facing csrc/fusion_cuda.cpp (only built in CUDA builds of the extension) checked against torch's
headers.

A kernel that spills registers or uses a stack frame fails: none of the row stages or the fused
forward needs either. The packed row-stage kernels' channel loads and stores are 16-byte accesses in
the PTX.
"""
import functools
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))


def _nvcc():
    for candidate in (shutil.which("nvcc"), "/usr/local/bin/nvcc", "/usr/local/cuda/bin/nvcc",
                      os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin", "nvcc")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (looked on PATH, /usr/local, CUDA_HOME)")

# The flags torch's CUDAExtension passes to nvcc that change what the kernels see.
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]


def parse_ptxas(log: str) -> dict:
    """{kernel: {"registers", "stack", "spill_stores", "spill_loads"}} from `ptxas -v` output."""
    kernels, current = {}, None
    for line in log.splitlines():
        match = re.search(r"Compiling entry function '(\w+)'", line)
        if match:
            current = match.group(1)
            kernels[current] = {}
            continue
        if current is None:
            continue
        match = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if match:
            kernels[current].update(stack=int(match[1]), spill_stores=int(match[2]), spill_loads=int(match[3]))
        match = re.search(r"Used (\d+) registers", line)
        if match:
            kernels[current]["registers"] = int(match[1])
    return kernels


def _toolkit_include_dir():
    """The toolkit's include directory, as nvcc itself reports it (nvcc may be a wrapper script)."""
    if NVCC is None:
        return None
    proc = subprocess.run([NVCC, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True)
    for path in re.findall(r'-I"?([^"\s]+)', proc.stdout + proc.stderr):
        if (Path(path) / "cuda_runtime_api.h").exists():
            return Path(path)
    return None


def _demangle(names):
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return list(names)
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else list(names)


def test_there_are_cuda_sources():
    assert CU_FILES, f"no .cu files under {CSRC}"


# The architectures setup.py builds for by default (TORCH_CUDA_ARCH_LIST 8.0;9.0), each with its own
# instantiations (bfloat16 MMAs exist from sm_80 on) and launch bounds (GK_BLOCK_BOUNDS in
# fusion_kernels.cu): both must compile without spills or stack frames.
ARCHS = ["sm_90", "sm_80"]


@functools.lru_cache(maxsize=None)
def _compiled(source: Path, arch: str):
    """(return code, nvcc's output with ptxas -v, the PTX) of one compile, shared by the tests."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [NVCC, f"-arch={arch}", "-O3", "-std=c++17", "-Xptxas", "-v", *TORCH_NVCC_DEFINES,
               "-keep", "-keep-dir", tmp, "-c", str(source), "-o", str(Path(tmp) / "out.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        ptx = Path(tmp) / f"{source.stem}.ptx"
        return proc.returncode, proc.stdout + proc.stderr, ptx.read_text() if ptx.exists() else ""


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles_without_spills(source, arch):
    returncode, log, _ = _compiled(source, arch)
    assert returncode == 0, f"nvcc failed on {source.name} for {arch}:\n{log}"
    kernels = parse_ptxas(log)
    assert kernels, f"ptxas reported no kernels for {source.name}:\n{log}"
    for name, usage in kernels.items():
        assert {"stack", "spill_stores", "spill_loads", "registers"} <= usage.keys(), f"unparsed ptxas output for {name}"
        assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, f"{name} spills registers on {arch}: {usage}"
        assert usage["stack"] == 0, f"{name} uses a stack frame on {arch}: {usage}"
    names = sorted(kernels)
    report = "\n".join(f"  {pretty}: {kernels[name]['registers']} registers, stack {kernels[name]['stack']} B, "
                       f"spills {kernels[name]['spill_stores']}/{kernels[name]['spill_loads']} B"
                       for name, pretty in zip(names, _demangle(names)))
    print(f"{source.name}, {arch}:\n{report}")


def _global_accesses(body: str):
    """The global loads and stores of a PTX function body: [(vector width or "", type)]."""
    return re.findall(r"\b(?:ld|st)\.global(?:\.nc)?(?:\.v(\d))?\.(\w+)", body)


def _stage_kernels(ptx: str):
    """{(stage, dtype, lanes, pack): PTX body} of the row-stage kernels."""
    bodies = {}
    for chunk in re.split(r"(?=^\.(?:visible )?\.?entry )", ptx, flags=re.M):
        match = re.match(r"\.(?:visible )?\.?entry (\w+)", chunk)
        if match and "stage_kernel" in match.group(1):
            bodies[match.group(1)] = chunk
    kernels = {}
    for name, pretty in zip(bodies, _demangle(list(bodies))):
        match = re.search(r"stage_kernel<gk::(\w+), (\w+), (\d+), (\d+)>", pretty)
        assert match, f"unparsed stage kernel name {pretty}"
        kernels[match[1], match[2], int(match[3]), int(match[4])] = bodies[name]
    return kernels


STAGES = ["HiddenForward", "RelationForward", "MixForward", "MixBackward", "RelationBackward", "HiddenBackward"]
PACKS = {"float": 4, "__half": 8, "__nv_bfloat16": 8}  # 16 bytes; float64 stays a value a lane


@needs_nvcc
def test_packed_stage_kernels_move_channels_16_bytes_at_a_time():
    """Where stage_pack allows (csrc/fusion_math.h), a lane of a row-stage kernel loads and stores its
    channels as 16-byte packs: in the PTX every channel access of a packed kernel is a 4-word vector
    access. What stays scalar are the float accumulators (gates, log-sum-exps), the same accesses in
    a float kernel as in the bfloat16 one of that stage and lane count, whose channels are not float."""
    if shutil.which("c++filt") is None:
        pytest.skip("no c++filt on PATH (binutils): the kernels' template arguments are read from their names")
    source = CSRC / "fusion_kernels.cu"
    returncode, log, ptx = _compiled(source, "sm_90")
    assert returncode == 0 and ptx, f"nvcc failed on {source.name}:\n{log}"
    kernels = _stage_kernels(ptx)
    packed = {key: body for key, body in kernels.items() if key[3] > 1}
    assert {(k[0], k[1]) for k in packed} == {(s, t) for s in STAGES for t in PACKS}, sorted(packed)
    for (stage, dtype, lanes, pack), body in packed.items():
        where = f"stage_kernel<{stage}, {dtype}, {lanes}, {pack}>"
        assert pack == PACKS[dtype], where
        accesses = _global_accesses(body)
        vectors = [a for a in accesses if a[0]]
        scalars = [a for a in accesses if not a[0]]
        assert vectors and all(width == "4" for width, _ in vectors), f"{where}: {accesses}"
        assert all(kind == "f32" for _, kind in scalars), f"{where}: scalar channel accesses {scalars}"
        accumulators = [a for a in _global_accesses(packed[stage, "__nv_bfloat16", lanes, 8]) if not a[0]]
        assert len(scalars) == len(accumulators), f"{where}: {len(scalars)} scalar accesses, {len(accumulators)} " \
                                                   "of them the accumulators'"
    unpacked = _global_accesses(kernels["MixForward", "float", 8, 1])
    assert unpacked and not any(width for width, _ in unpacked), "the unpacked fallback is one element a lane"


@needs_nvcc
def test_every_launcher_fusion_kernels_h_declares_is_defined_for_the_linker(tmp_path):
    """fusion_cuda.cpp calls the launchers fusion_kernels.h declares; one defined inside the .cu's
    anonymous namespace instead compiles, and fails only when a CUDA build links."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm on PATH (binutils)")
    declared = re.findall(r"^cudaError_t (\w+)\(", (CSRC / "fusion_kernels.h").read_text(), flags=re.M)
    assert len(declared) >= 5, declared
    obj = tmp_path / "fusion_kernels.o"
    proc = subprocess.run([NVCC, "-arch=sm_90", "-std=c++17", *TORCH_NVCC_DEFINES, "-c",
                           str(CSRC / "fusion_kernels.cu"), "-o", str(obj)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    symbols = subprocess.run([nm, "-C", "--defined-only", str(obj)], capture_output=True, text=True).stdout
    exported = {m for m in re.findall(r" T gk::(\w+)\(", symbols)}
    assert set(declared) <= exported, f"declared in fusion_kernels.h but not defined in gk:: {set(declared) - exported}"


def test_cuda_registration_compiles_against_torch_headers(tmp_path):
    """fusion_cuda.cpp is compiled only in CUDA builds; check it here against torch's headers.

    A CPU build of torch lacks one generated header, c10/cuda/impl/cuda_cmake_macros.h (the build
    options of libc10_cuda); a stub stands in for it. Needs the CUDA toolkit's runtime headers.
    """
    torch_ext = pytest.importorskip("torch.utils.cpp_extension")
    cuda_include = _toolkit_include_dir()
    if cuda_include is None:
        pytest.skip("the CUDA toolkit's headers were not found (no nvcc, or `nvcc --dryrun` names no include dir "
                    "with cuda_runtime_api.h)")
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n")
    includes = [f"-I{p}" for p in torch_ext.include_paths()]
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Werror", *includes, f"-I{tmp_path}",
           f"-I{cuda_include}", f"-I{sysconfig.get_paths()['include']}", str(CSRC / "fusion_cuda.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"fusion_cuda.cpp does not compile:\n{proc.stderr[-6000:]}"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-s", "-q"]))
