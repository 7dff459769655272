"""What the benchmark writes: the stdout table, the JSON file, the RESULTS.md section and the plot."""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

COLUMNS = (  # (key, header, width, format)
    ("variant", "variant", 22, "{}"),
    ("ms", "ms", 10, "{:.4g}"),
    ("speedup", "x compile", 9, "{:.3g}"),
    ("tflops", "TFLOP/s", 8, "{:.3g}"),
    ("gbs", "GB/s", 8, "{:.4g}"),
    ("floor_ms", "floor ms", 9, "{:.3g}"),
    ("pct_floor", "% floor", 7, "{:.3g}"),
    ("peak_mib", "peak MiB", 9, "{:.4g}"),
    ("faults", "faults", 7, "{:.0f}"),
    ("check", "check", 0, "{}"),
)


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        # peak MiB on a CPU, faults on a GPU: not measured there
        return "n/a" if key in ("peak_mib", "faults") and row.get("status") == "ok" else "-"
    return fmt.format(value)


def group_key(row: dict) -> tuple:
    return row["shape"], row["tokens"], row["dim"], row["batch"], row["dtype"], row["pass"]


def group_title(row: dict) -> str:
    return (f"{row['shape']}  N={row['tokens']} C={row['dim']}  B={row['batch']}  {row['dtype']}  "
            f"{row['pass']}")


def text_table(rows: list) -> str:
    lines, previous = [], None
    header = " ".join(f"{h:>{w}}" if w else h for _, h, w, _ in COLUMNS)
    for row in rows:
        if group_key(row) != previous:
            previous = group_key(row)
            lines += ["", group_title(row), header]
        lines.append(" ".join(f"{_cell(row, k, f):>{w}}" if w else _cell(row, k, f) for k, _, w, f in COLUMNS))
    return "\n".join(lines[1:])


def markdown_table(rows: list) -> str:
    head = ["shape", "N", "C", "B", "dtype", "pass"] + [h for _, h, _, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["shape"], str(row["tokens"]), str(row["dim"]), str(row["batch"]), row["dtype"], row["pass"]]
        cells += [_cell(row, k, f) for k, _, _, f in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _run(cmd: list) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none (CPU build)",
        "git_commit": _run(["git", "rev-parse", "--short", "HEAD"]) or "unknown",
        # RESULTS.md is what this run appends to: its own changes do not make the code uncommitted.
        "git_dirty": bool(_run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!bench/RESULTS.md"])),
        "command": shlex.join(["python"] + sys.argv) if sys.argv and sys.argv[0].endswith("run.py") else "",
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).split("\n")[0]
    else:
        model = [l.split(":", 1)[1].strip() for l in _read("/proc/cpuinfo").splitlines() if l.startswith("model name")]
        env["device_name"] = f"{model[0] if model else platform.processor()} ({os.cpu_count()} cores)"
        env["driver"] = "n/a"
        env["torch_threads"] = torch.get_num_threads()
        env["load_average_at_start"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return env


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def write_json(path: Path, meta: dict, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))


def markdown_section(meta: dict, rows: list, plot_name: str = "") -> str:
    env = meta["env"]
    rates = ", ".join(f"{d}: {r['tflops']:.3g} TFLOP/s" for d, r in meta["rates"]["matmul"].items())
    lines = [
        f"## {env['date_utc']}: {env['device_name']}",
        "",
        f"- command: `{env['command'] or '(called from Python)'}` (git {env['git_commit']}"
        f"{', with uncommitted changes' if env['git_dirty'] else ''})",
        f"- torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, driver {env['driver']}, "
        f"python {env['python']}",
        f"- measured rates: matmul {rates}; copy {meta['rates']['copy_gbs']:.4g} GB/s",
        f"- timing: median of {meta['config']['runs']} runs after {meta['config']['warmup']} warm-up runs; "
        + ("L2 flushed before each run (CUDA events)" if env["device"].startswith("cuda")
           else f"time.perf_counter, inputs rotated; torch threads: {env['torch_threads']}; "
                f"load average {env['load_average_at_start']:.2f} at start"),
        f"- backends reported by available_backends: {', '.join(meta['backends'])}",
    ]
    if meta.get("note"):
        lines.append(f"- note: {meta['note']}")
    lines += ["", markdown_table(rows), ""]
    if plot_name:
        lines += [f"Plot: `{plot_name}` (in bench/out, not committed).", ""]
    return "\n".join(lines) + "\n"


def append_markdown(path: Path, section: str) -> None:
    if not path.exists():
        path.write_text("# Benchmark results\n\nAppended by `bench/run.py` (see bench/README.md for how to read "
                        "the tables); newest last.\n\n")
    with path.open("a") as f:
        f.write(section)


def plot(path: Path, rows: list, title: str) -> None:
    """Speed-up over torch.compile and % of the floor per stage, one column per pass."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passes = [p for p in ("fwd", "fwd+bwd") if any(r["pass"] == p for r in rows)]
    variants = list(dict.fromkeys(r["variant"] for r in rows if r.get("ms")))  # timed at least once
    fig, axes = plt.subplots(2, len(passes), figsize=(7 * len(passes), 8), squeeze=False)
    for col, pass_name in enumerate(passes):
        chosen = [r for r in rows if r["pass"] == pass_name]
        groups = list(dict.fromkeys(f"{r['shape']}\nC={r['dim']} B={r['batch']} {r['dtype']}" for r in chosen))
        width = 0.8 / max(len(variants), 1)
        for metric, ax, label in ((("speedup", axes[0][col], "speed-up over torch.compile")),
                                  (("pct_floor", axes[1][col], "% of floor reached"))):
            for v_index, variant in enumerate(variants):
                values = {f"{r['shape']}\nC={r['dim']} B={r['batch']} {r['dtype']}": r.get(metric)
                          for r in chosen if r["variant"] == variant}
                xs = [g + v_index * width for g in range(len(groups))]
                ax.bar(xs, [values.get(g) or 0.0 for g in groups], width, label=variant)
            ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
            ax.set_xticklabels(groups, fontsize=7)
            ax.set_ylabel(label)
            ax.set_title(f"{pass_name}: {label}")
            ax.axhline(1.0 if metric == "speedup" else 100.0, color="black", linewidth=0.8)
            if metric == "speedup" and any(r.get("speedup") for r in chosen):
                ax.set_yscale("log")
        axes[0][col].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
