"""One CPU training step of the Swin and DeLiVER GeminiFusion models: fused vs oracle vs published loop.

For ``swin_tiny`` (RGB + depth) and the 4-modality DeLiVER B0, times one training step (forward, the
sum of the cross-entropies of the three outputs, backward, AdamW) with

* ``fused (cpu_cpp)``: ``fusion_backend="cpu_cpp"``, the compiled host C++ path;
* ``oracle (torch)``: ``fusion_backend="torch"``, the pure-PyTorch reference;
* ``published per-batch loop``: the fusion layers replaced by the published code's loop over the batch
  around ``nn.MultiheadAttention`` (:class:`gemini_kernels.baselines.PublishedFusion`), same weights.

Each variant's logits are first checked against the oracle's (relative error below 1e-4, fp32); the
median of ``--runs`` steps after ``--warmup`` is reported. ``--write`` appends a dated section to
``bench/RESULTS.md``.

    python bench/model_cpu_step.py --threads 2 --write
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_timing import median_ms  # noqa: E402
from model_speed import with_published_loop  # noqa: E402
from gemini_seg import build_deliver_model, build_model  # noqa: E402

ROOT = os.path.dirname(HERE)
VARIANTS = (("fused (cpu_cpp)", "cpu_cpp"), ("oracle (torch)", "torch"), ("published per-batch loop", None))


def build(name, backend):
    torch.manual_seed(0)
    if name == "swin_tiny":
        return build_model("swin_tiny", num_classes=40, fusion_backend=backend or "torch", drop_path_rate=0.0)
    return build_deliver_model("mit_b0", num_classes=25, fusion_backend=backend or "torch")


def inputs_for(name, batch, size):
    g = torch.Generator().manual_seed(1)
    count = 2 if name == "swin_tiny" else 4
    classes = 40 if name == "swin_tiny" else 25
    images = [torch.randn(batch, 3, size, size, generator=g) for _ in range(count)]
    return images, torch.randint(0, classes, (batch, size, size), generator=g)


def step_ms(model, images, target, warmup, runs):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model.train()

    def step():
        outputs = model(images)
        loss = sum(F.cross_entropy(F.interpolate(o, size=target.shape[-2:], mode="bilinear", align_corners=False),
                                   target) for o in outputs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return median_ms(lambda i: step(), torch.device("cpu"), warmup, runs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=128, help="square input side (a multiple of 32)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--write", action="store_true", help="append a dated section to bench/RESULTS.md")
    args = ap.parse_args(argv)
    for flag in ("batch", "size", "runs", "threads"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} must be positive; got {getattr(args, flag)}")
    if args.warmup < 0:
        ap.error(f"--warmup must be non-negative; got {args.warmup}")
    torch.set_num_threads(args.threads)
    rows = []
    for name in ("swin_tiny", "deliver_b0_4mod"):
        images, target = inputs_for(name, args.batch, args.size)
        with torch.no_grad():
            reference = build(name, "torch").eval()(images)[0]
        for label, backend in VARIANTS:
            model = build(name, backend)
            if backend is None:
                with_published_loop(model)
            with torch.no_grad():
                logits = model.eval()(images)[0]
            err = ((logits - reference).norm() / reference.norm()).item()
            if err > 1e-4:
                raise SystemExit(f"{name}, {label}: logits differ from the oracle's by {err:.2e}; "
                                 f"not a timing of the same function")
            ms = step_ms(model, images, target, args.warmup, args.runs)
            rows.append({"model": name, "variant": label, "ms": ms, "rel_err_vs_oracle": err})
            print(f"{name:16s} {label:26s} {ms:9.1f} ms  (logits vs oracle {err:.1e})", flush=True)
    table = ["| model | variant | one training step (ms) | speed vs oracle | logits vs oracle |",
             "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        oracle_ms = next(o["ms"] for o in rows if o["model"] == r["model"] and o["variant"].startswith("oracle"))
        table.append(f"| {r['model']} | {r['variant']} | {r['ms']:.0f} | {oracle_ms / r['ms']:.2f}x "
                     f"| {r['rel_err_vs_oracle']:.1e} |")
    print("\n".join(table))
    if args.write:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip()
        except OSError:
            commit = "?"
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        section = [
            "", f"## {when}: one CPU training step, swin_tiny and DeLiVER B0 (4 modalities) (git {commit})", "",
            f"`python bench/model_cpu_step.py --batch {args.batch} --size {args.size} --runs {args.runs} "
            f"--threads {args.threads} --write` on {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores (shared with other jobs: indicative), torch {torch.__version__}, fp32. "
            f"Input {args.batch} x 3 x {args.size} x {args.size} per modality; a step is forward, the three "
            f"cross-entropies, backward and AdamW; median of {args.runs} after {args.warmup} warm-up. The "
            f"published loop is the fusion of the published code (a Python loop over the batch around "
            f"nn.MultiheadAttention) with the same weights.", "",
            *table, "",
        ]
        with open(os.path.join(ROOT, "bench", "RESULTS.md"), "a", encoding="utf-8") as f:
            f.write("\n".join(section))
    return rows


if __name__ == "__main__":
    main()
