"""python -m gemini_kernels: the environment report (gemini_kernels/info.py)."""
import json
import subprocess
import sys

import torch

import gemini_kernels as gk
from gemini_kernels import info


def run(*args):
    done = subprocess.run([sys.executable, "-m", "gemini_kernels", *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_python_m_gemini_kernels_prints_versions_and_every_backend_with_its_reason():
    out = run()
    lines = out.splitlines()
    assert lines[0].startswith(f"gemini_kernels {gk.__version__}: ")
    assert f"torch {torch.__version__}" in out and "\ntriton " in out and "\nnumpy " in out
    assert f"CUDA available: {torch.cuda.is_available()}" in out
    assert "extension gemini_kernels._C: " in out
    import gemini_kernels._C  # noqa: F401  (the ops; scripts/setup_env.sh builds it)
    isas = list(torch.ops.gemini_kernels.simd_isas())  # the same CPU and capability as the child
    simd = next(l for l in lines if l.startswith("  host SIMD kernels (float32 / float64, C <= 128): "))
    assert simd.endswith(f"{isas[0]} (this CPU runs {', '.join(isas)})" if isas else "(the chain runs every call)")
    for device in ("cpu", "cuda"):
        for name, backend in gk.backends.BACKENDS.items():
            reason = backend.unavailable_reason(torch.device(device))  # the same environment as the child
            line = next(l for l in lines if l.startswith(f"backend {name} ") and f" on {device}" in l)
            assert line.endswith("available" if reason is None else f"unavailable: {reason}"), line
            if device in backend.runs_elsewhere:
                assert f": runs {backend.runs_elsewhere[device]}: " in line, line
        assert any(l.startswith(f"backend='auto' on {device}: ") for l in lines)
    width = max(len(n) for n in gk.backends.BACKENDS)
    assert f"backend {'torch':<{width}} on cpu : available" in out
    for name, backend in gk.backends.BACKENDS.items():  # what runs where, once per backend
        at = lines.index(f"backend {name:<{width}}: {backend.summary}")
        for declared in (backend.widths, *(str(d).replace("torch.", "") for d in backend.dtypes)):
            assert declared in lines[at + 1], (name, declared)  # and what it supports, on the next line


def test_json_report_and_an_absent_extension_says_how_to_build_it(monkeypatch):
    report = json.loads(run("--json"))
    assert report["backends"]["cpu"]["torch"] is None and set(report["backends"]) == {"cpu", "cuda"}
    assert report["auto"]["cpu"] in gk.available_backends("cpu")

    def no_extension(name, *a, **k):
        if name == "gemini_kernels._C":
            raise ImportError("No module named 'gemini_kernels._C'")
        return importlib_import(name, *a, **k)

    importlib_import = info.importlib.import_module
    monkeypatch.setattr(info.importlib, "import_module", no_extension)
    text = info.format_report(info.collect())
    assert "extension gemini_kernels._C: absent (No module named 'gemini_kernels._C')" in text
    assert "--no-build-isolation" in text
