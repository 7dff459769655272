"""Speed of the whole segmentation model: MiT-B3 GeminiFusion at 480x640 (NYUDv2), batch 8, bfloat16.

Times one training step (forward, the three-output loss, backward, AdamW step) and the inference
latency (forward, no grad) of
  * the fused model, once per fusion backend available on the device;
  * the same model with the fusion layers removed (``build_model(..., fusion=False)``: the streams
    still share their weights), the floor the fusion's overhead is measured against;
  * the published formulation: the same parameters in the published per-batch Python loop around
    two ``nn.MultiheadAttention`` modules (JiaDingCN/GeminiFusion models/mix_transformer.py).
The target of the issue: fused at most 10% slower than no fusion, for training and for inference.

    python bench/model_speed.py                  # on a CUDA GPU; writes a section of bench/RESULTS.md
    python bench/model_speed.py --batch 1 --height 64 --width 64 --backbone mit_b0 --no-write  # smoke test

Timed with the harness's loop (bench_timing.times_ms: CUDA events and a cold L2 on a GPU).

Before timing, the outputs of every fused variant and of the published loop are compared with the oracle
backend's on the same input (relative error printed), so that a fast wrong variant is not reported.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gemini_kernels as gk  # noqa: E402
from bench_timing import median_ms  # noqa: E402
from gemini_kernels import GeminiFusion  # noqa: E402
from gemini_kernels.baselines import PublishedFusion  # noqa: E402
from gemini_seg import build_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- bench/model_speed.py: begin -->", "<!-- bench/model_speed.py: end -->"


# Logits of the whole model against the oracle backend's, under the same autocast: a variant further
# off computes something else and is reported WRONG, not timed.
LOGIT_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def with_published_loop(model):
    for module in model.encoder.modules():
        fusion = getattr(module, "fusion", None)
        if isinstance(fusion, GeminiFusion):
            module.fusion = PublishedFusion.from_params(fusion.fusion_params(), fusion.num_heads)
    return model


def autocast(device, dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def loss_fn(outputs, target):
    return sum(F.cross_entropy(F.interpolate(o.float(), size=target.shape[-2:], mode="bilinear",
                                             align_corners=False), target, ignore_index=255) for o in outputs)


def measure(model, inputs, target, dtype, device, warmup, runs):
    def timer(fn, warmup, runs):
        return median_ms(lambda i: fn(), device, warmup, runs)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def train_step():
        with autocast(device, dtype):
            outputs = model(inputs)
        loss = loss_fn(outputs, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer():
        with torch.no_grad(), autocast(device, dtype):
            model(inputs)

    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train = timer(train_step, warmup, runs)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    model.eval()
    inference = timer(infer, warmup, runs)
    return train, inference, memory


def main(argv=None):
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="mit_b3")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--skip-published", action="store_true", help="do not time the per-batch loop")
    ap.add_argument("--no-write", action="store_true", help="do not write bench/RESULTS.md")
    ap.add_argument("--json", default=os.path.join(ROOT, "bench", "out", "model_speed.json"),
                    help="where to write the raw numbers")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    base = build_model(args.backbone, num_classes=40, fusion_backend="torch", drop_path_rate=0.0).to(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    inputs = [torch.randn(args.batch, 3, args.height, args.width, generator=g).to(device) for _ in range(2)]
    target = torch.randint(0, 40, (args.batch, args.height, args.width), generator=g).to(device)

    base.eval()
    with torch.no_grad(), autocast(device, dtype):
        reference = base(inputs)[0].float()

    def rel(out):
        return ((out.float() - reference).norm() / reference.norm()).item()

    rows = []
    variants = [(f"fused, backend={b}", b) for b in gk.available_backends(device)]
    variants.append(("fusion removed", None))
    if not args.skip_published:
        variants.append(("published per-batch loop", "published"))
    for label, kind in variants:
        if kind is None:
            model = build_model(args.backbone, num_classes=40, fusion=False, drop_path_rate=0.0).to(device)
            state = {k: v for k, v in base.state_dict().items() if ".fusion." not in k}
            model.load_state_dict(state, strict=True)
            error = float("nan")  # a different function: no accuracy to check
        else:
            model = build_model(args.backbone, num_classes=40, fusion_backend="torch", drop_path_rate=0.0).to(device)
            model.load_state_dict(base.state_dict(), strict=True)
            if kind == "published":
                with_published_loop(model)
            else:
                model.set_fusion_backend(kind)
            model.eval()
            with torch.no_grad(), autocast(device, dtype):
                error = rel(model(inputs)[0])
            if not error <= LOGIT_TOLERANCE[dtype]:  # NaN fails too
                rows.append({"variant": label, "wrong": True, "rel_err_vs_oracle": error})
                print(f"{label:34s} WRONG: logits rel.err vs oracle {error:.2e} > {LOGIT_TOLERANCE[dtype]:g}; "
                      f"not timed", flush=True)
                continue
        train, infer, memory = measure(model, inputs, target, dtype, device, args.warmup, args.runs)
        rows.append({"variant": label, "train_ms": train, "infer_ms": infer, "peak_gib": memory, "rel_err_vs_oracle": error})
        print(f"{label:34s} train {train:9.1f} ms  infer {infer:9.1f} ms  peak {memory:6.2f} GiB  "
              f"rel.err vs oracle {error:.2e}", flush=True)
        del model
        if cuda:
            torch.cuda.empty_cache()

    plain = next(r for r in rows if r["variant"] == "fusion removed")
    fused = [r for r in rows if r["variant"].startswith("fused") and not r.get("wrong")]
    if not fused:
        raise SystemExit("no fused backend matched the oracle; nothing to report")
    best = min(fused, key=lambda r: r["train_ms"])
    verdict = {
        "train_overhead": best["train_ms"] / plain["train_ms"] - 1,
        "infer_overhead": min(r["infer_ms"] for r in fused) / plain["infer_ms"] - 1,
    }
    print(f"fusion overhead (best backend): training {100 * verdict['train_overhead']:+.1f}%, "
          f"inference {100 * verdict['infer_overhead']:+.1f}% (target: at most +10%)")

    device_name = torch.cuda.get_device_name() if cuda else "CPU"
    setup = {"backbone": args.backbone, "batch": args.batch, "size": [args.height, args.width],
             "dtype": args.dtype, "device": device_name, "torch": torch.__version__,
             "triton": _version("triton"), "runs": args.runs}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"setup": setup, "rows": rows, "verdict": verdict}, f, indent=2)
    if cuda and not args.no_write:
        write_results(setup, rows, verdict)
    return rows


def _version(module):
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def write_results(setup, rows, verdict):
    lines = [
        BEGIN,
        "## Whole model: MiT-B3 GeminiFusion segmenter (bench/model_speed.py)",
        "",
        f"{setup['backbone']}, batch {setup['batch']}, {setup['size'][0]}x{setup['size'][1]}, {setup['dtype']} autocast, "
        f"{setup['device']}, torch {setup['torch']}, triton {setup['triton']}; median of {setup['runs']} runs "
        f"(CUDA events). Training step = forward + loss of the 3 outputs + backward + AdamW step.",
        "",
        "| variant | train step (ms) | inference (ms) | peak memory (GiB) | rel. error vs oracle |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        err = "-" if r["rel_err_vs_oracle"] != r["rel_err_vs_oracle"] else f"{r['rel_err_vs_oracle']:.1e}"
        if r.get("wrong"):
            lines.append(f"| {r['variant']} | WRONG: not timed | | | {err} |")
        else:
            lines.append(f"| {r['variant']} | {r['train_ms']:.1f} | {r['infer_ms']:.1f} | {r['peak_gib']:.2f} | {err} |")
    lines += [
        "",
        f"Fusion overhead of the fastest backend over the model with the fusion removed: training "
        f"{100 * verdict['train_overhead']:+.1f}%, inference {100 * verdict['infer_overhead']:+.1f}% (target: at most +10%).",
        END,
    ]
    section = "\n".join(lines) + "\n"
    path = os.path.join(ROOT, "bench", "RESULTS.md")
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n\n"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END) + "\n?", re.S)
    text = pattern.sub(section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
