"""Train and evaluate a GeminiFusion segmenter: ``python -m gemini_seg.train --help``.

Single process:  python -m gemini_seg.train        (the defaults: MiT-B0, 2 epochs of the synthetic set)
Multi-GPU / multi-process (DistributedDataParallel; gloo on CPU, NCCL on GPU):
                 torchrun --nproc_per_node 2 -m gemini_seg.train ...

The published recipe (JiaDingCN/GeminiFusion main.py, utils/optimizer.py): AdamW (betas 0.9/0.999,
weight decay 0.01, none on the encoder's norms), learning rate 6e-5 with 10x on the decoder, linear
warm-up from 1e-6 of it over 1500 steps then poly decay (power 1) to step 40000, the loss the sum of the
cross-entropies of ``logits_0``, ``logits_1`` and the ensemble (label 255 ignored), BatchNorm frozen,
the augmentations of :mod:`gemini_seg.transforms`. Checkpoints use the published layout
(``{"segmenter": ...}`` with the published parameter names) plus what resuming needs.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import random
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from gemini_kernels.checkpoint import checkpoint_file_problem, load_checkpoint_file
from gemini_kernels.progress import Progress

from .build import BACKBONES, build_model
from .checkpoint import load_imagenet_mit, load_published_checkpoint, to_published_state_dict
from .data import FolderRGBD, SyntheticRGBD
from .metrics import confusion_matrix, scores
from .mit import MIT_CONFIGS
from .transforms import IGNORE_LABEL

DEFAULT_LISTS = {"nyudv2": ("train.txt", "val.txt"), "sunrgbd": ("train.txt", "test.txt")}


# The defaults are sized for the default dataset (the embedded synthetic set, 512 scenes of 64x64), which
# is what someone trying the CLI on a CPU runs: a small backbone for two epochs (512 steps at batch 2).
# The published recipe (100 epochs of MiT-B3 per stage, 1500 warm-up steps) is sized for NYUDv2 on GPUs;
# its warm-up alone would be three times the default run.
DEFAULTS_NOTE = (
    "The defaults are sized for the default dataset, the embedded synthetic set: MiT-B0 for 2 epochs "
    "(512 steps at batch 2; minutes on a CPU). The published NYUDv2 recipe is --dataset nyudv2 --backbone "
    "mit_b3 --pretrained pretrained/mit_b3.pth --epochs 100 --lr 6e-5 --warmup-iters 1500 --max-iters 40000 "
    "--dpr 0.4 (see models/README.md).")


def build_parser() -> argparse.ArgumentParser:
    """The command line; every option has help text and shows its default (tested)."""
    p = argparse.ArgumentParser(prog="python -m gemini_seg.train", description=__doc__.split("\n\n")[0],
                                epilog=DEFAULTS_NOTE, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="synthetic", choices=["synthetic", "nyudv2", "sunrgbd"],
                   help="synthetic: the embedded procedural RGB-D set (no download)")
    d.add_argument("--data-root", default=None, help="NYUDv2 / SUN RGB-D root the list files are relative to")
    d.add_argument("--train-list", default=None, help="default: <data-root>/train.txt")
    d.add_argument("--val-list", default=None, help="default: <data-root>/val.txt (SUN RGB-D: test.txt)")
    d.add_argument("--crop-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="training crop; default 480 640 (NYUDv2), 480 480 (SUN), the scene size (synthetic)")
    d.add_argument("--synthetic-size", type=int, nargs=2, default=(64, 64), metavar=("H", "W"),
                   help="size of the synthetic scenes")
    d.add_argument("--synthetic-train", type=int, default=512, help="number of synthetic training scenes")
    d.add_argument("--synthetic-val", type=int, default=128, help="number of synthetic validation scenes")
    d.add_argument("--modalities", nargs="+", default=["rgb", "depth"], choices=["rgb", "depth"],
                   help="'rgb depth': the fused dual-stream model; 'rgb': the single-stream RGB-only SegFormer")
    d.add_argument("--batch-size", type=int, default=2, help="per process")
    d.add_argument("--val-batch-size", type=int, default=1, help="evaluation batch, per process")
    d.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (0: load in the main process)")

    m = p.add_argument_group("model")
    m.add_argument("--backbone", default="mit_b0", choices=list(BACKBONES),
                   help="encoder (published NYUDv2 / SUN RGB-D models: mit_b3 to mit_b5 and the swin_* ones)")
    m.add_argument("--fusion-backend", default="auto", help="auto, torch (the oracle), triton, cuda or cpu_cpp")
    m.add_argument("--no-fusion", action="store_true", help="dual-stream model without the fusion layers")
    m.add_argument("--dpr", type=float, default=0.1,
                   help="stochastic depth rate (SegFormer's 0.1; published GeminiFusion: 0.4 for B3)")
    m.add_argument("--drop-rate", type=float, default=0.0, help="dropout rate in the encoder's MLPs and projections")
    m.add_argument("--decoder-dropout", type=float, default=0.1, help="dropout before the decoder's classifier")
    m.add_argument("--pretrained", default=None, help="ImageNet MiT weights (SegFormer mit_b*.pth) for the encoder")
    m.add_argument("--init-checkpoint", default=None, help="a published *.pth.tar to start from / evaluate")
    m.add_argument("--finetune", action="store_true",
                   help="with --init-checkpoint: skip its classifier (published --is_pretrain_finetune)")

    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=2, help="passes over the training set (published: 100 per stage)")
    o.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    o.add_argument("--lr", type=float, default=6e-5, help="peak learning rate of the encoder (the decoder's is 10x)")
    o.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (none on the encoder's norms)")
    o.add_argument("--warmup-iters", type=int, default=20,
                   help="steps of linear warm-up (published: 1500, for a 40000-step run)")
    o.add_argument("--warmup-ratio", type=float, default=1e-6, help="the warm-up starts at this fraction of --lr")
    o.add_argument("--max-iters", type=int, default=None,
                   help="end of the poly decay; default: the run's total steps (published: 40000); on "
                        "--resume: the checkpoint's, so that a larger --max-steps does not make the LR jump")
    o.add_argument("--power", type=float, default=1.0, help="exponent of the poly decay")
    o.add_argument("--train-bn", action="store_true", help="update BatchNorm statistics (published: frozen)")
    o.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"],
                   help="autocast dtype; auto: bf16 on GPU, none on CPU (bf16 works on CPU too)")
    o.add_argument("--seed", type=int, default=42, help="seeds the initialisation, the shuffle and the augmentations")

    r = p.add_argument_group("run")
    r.add_argument("--out-dir", default=None,
                   help="default: a fresh runs/gemini_seg/<timestamp>, with --resume the checkpoint's directory; "
                        "an existing non-empty one is refused unless --resume or --overwrite")
    r.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out-dir")
    r.add_argument("--resume", default=None,
                   help="a checkpoint written by this script (e.g. <out-dir>/last.pth.tar); the model's and the "
                        "schedule's settings are taken from it")
    r.add_argument("--eval-every", type=int, default=5,
                   help="epochs between evaluations (and at the end; 0: at the end only)")
    r.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: at evaluations and the end)")
    r.add_argument("--evaluate", action="store_true", help="evaluate only")
    r.add_argument("--device", default=None, help="default: cuda:<local rank> when CUDA is available, else cpu")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.dataset != "synthetic" and not args.data_root:
        p.error(f"--dataset {args.dataset} needs --data-root")
    if args.modalities[0] != "rgb" or len(set(args.modalities)) != len(args.modalities):
        p.error("--modalities must be 'rgb' or 'rgb depth'")
    check_args(p, args)
    args.explicit = _explicit_dests(p, argv)
    if args.out_dir is None:
        args.out_dir = os.path.dirname(os.path.abspath(args.resume)) if args.resume else _fresh_run_dir()
    elif (not args.resume and not args.overwrite and int(os.environ.get("RANK", "0")) == 0
          and os.path.isdir(args.out_dir) and os.listdir(args.out_dir)):
        p.error(f"--out-dir {args.out_dir} exists and is not empty; pass --overwrite to write into it, "
                f"--resume to continue a run there, or another --out-dir")
    return args


def _explicit_dests(p: argparse.ArgumentParser, argv: Optional[List[str]]) -> set:
    """The flags given on the command line (not left at their defaults): parsed again without defaults."""
    defaults = {a: a.default for a in p._actions}
    try:
        for a in p._actions:
            a.default = argparse.SUPPRESS
        return set(vars(p.parse_args(argv)))
    finally:
        for a, default in defaults.items():
            a.default = default


def _fresh_run_dir(root: str = "runs/gemini_seg") -> str:
    base = os.path.join(root, time.strftime("%Y%m%d-%H%M%S"))
    path, n = base, 1
    while os.path.exists(path):
        path, n = f"{base}-{n}", n + 1
    return path


# Taken from the checkpoint on --resume (they define the model, or the optimizer state and schedule that
# it restores); an explicitly given, different value is an error.
RESUME_KEYS = ("backbone", "modalities", "no_fusion", "dpr", "drop_rate", "decoder_dropout",
               "lr", "weight_decay", "warmup_iters", "warmup_ratio", "power")


def apply_checkpoint_settings(args: argparse.Namespace, state: dict) -> None:
    """On --resume: the settings of RESUME_KEYS stored in the checkpoint replace the defaults; a flag
    given explicitly with another value raises ValueError naming it and both values."""
    stored = state.get("args") or {}
    explicit = getattr(args, "explicit", set())
    for key in RESUME_KEYS:
        if key not in stored:
            continue
        if key in explicit and getattr(args, key) != stored[key]:
            raise ValueError(f"{_flag(key)} {_show(getattr(args, key))} conflicts with the checkpoint "
                             f"{args.resume}, which was trained with {_flag(key)} {_show(stored[key])}; "
                             f"drop the flag to use the checkpoint's value")
        setattr(args, key, stored[key])


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


# flag -> smallest allowed value; None (the default of an optional flag) is not checked
_INT_MINIMA = {
    "batch_size": 1, "val_batch_size": 1, "epochs": 1, "max_steps": 1, "max_iters": 1, "synthetic_train": 1,
    "synthetic_val": 1, "synthetic_size": 1, "crop_size": 1, "workers": 0, "warmup_iters": 0, "eval_every": 0,
    "save_every": 0,
}
# flag -> (test, the allowed range as the message says it): rates and probabilities
_FLOAT_RANGES = {
    "dpr": (lambda v: 0 <= v < 1, "[0, 1)"),
    "drop_rate": (lambda v: 0 <= v < 1, "[0, 1)"),
    "decoder_dropout": (lambda v: 0 <= v < 1, "[0, 1)"),
    "warmup_ratio": (lambda v: 0 <= v <= 1, "[0, 1]"),
    "lr": (lambda v: 0 <= v < math.inf, "[0, inf)"),
    "weight_decay": (lambda v: 0 <= v < math.inf, "[0, inf)"),
    "power": (lambda v: 0 <= v < math.inf, "[0, inf)"),
}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Rejects, before anything is built or trained, values that would crash or silently misbehave
    later (a zero batch, a negative step count, a drop-path rate above 1, a CUDA device on a machine
    without one, a checkpoint path that is not a checkpoint), with an argparse error naming the flag."""
    for dest, low in _INT_MINIMA.items():
        value = getattr(args, dest)
        if value is None:
            continue
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if v < low:
                p.error(f"{_flag(dest)} must be {'positive' if low == 1 else 'non-negative'}; got "
                        f"{' '.join(map(str, value)) if isinstance(value, (list, tuple)) else value}")
    for dest, (allowed, described) in _FLOAT_RANGES.items():
        value = getattr(args, dest)
        if not allowed(value):  # NaN fails every comparison, so it is rejected too
            p.error(f"{_flag(dest)} must be in {described}; got {value}")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError as exc:
            p.error(f"--device {args.device!r} is not a device: {exc}")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                p.error(f"--device {args.device}: no CUDA device is visible (torch.cuda.is_available() is "
                        f"False); use --device cpu")
            if device.index is not None and device.index >= torch.cuda.device_count():
                p.error(f"--device {args.device}: there are {torch.cuda.device_count()} CUDA devices")
    if args.pretrained is not None and args.backbone not in MIT_CONFIGS:
        p.error(f"--pretrained takes SegFormer's ImageNet mit_b*.pth, which has no {args.backbone} weights; "
                f"start a Swin model from a published checkpoint with --init-checkpoint instead")
    for dest in ("resume", "init_checkpoint", "pretrained"):
        path = getattr(args, dest)
        if path is not None:
            problem = checkpoint_file_problem(path)
            if problem is not None:
                p.error(f"{_flag(dest)}: {problem}")


# ----------------------------------------------------------------------------------------- distributed
class Dist:
    def __init__(self, args):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if args.device:
            self.device = torch.device(args.device)
        else:
            self.device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            tensor = tensor.to(self.device)
            dist.all_reduce(tensor)
        return tensor.cpu()

    def gather(self, obj):
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- data
def make_datasets(args):
    if args.dataset == "synthetic":
        crop = args.crop_size or args.synthetic_size
        train = SyntheticRGBD(args.synthetic_train, args.synthetic_size, seed=args.seed, train=True, crop_size=crop)
        # Different scenes from training: another seed.
        val = SyntheticRGBD(args.synthetic_val, args.synthetic_size, seed=args.seed + 1_000_003, train=False,
                            crop_size=crop)
        return train, val, SyntheticRGBD.num_classes
    crop = args.crop_size or ((480, 640) if args.dataset == "nyudv2" else (480, 480))
    train_name, val_name = DEFAULT_LISTS[args.dataset]
    train_list = args.train_list or os.path.join(args.data_root, train_name)
    val_list = args.val_list or os.path.join(args.data_root, val_name)
    train = FolderRGBD(args.dataset, args.data_root, train_list, True, crop, seed=args.seed)
    val = FolderRGBD(args.dataset, args.data_root, val_list, False, crop, seed=args.seed)
    return train, val, train.num_classes


def epoch_batches(length: int, batch: int, epoch: int, seed: int, rank: int, world: int) -> List[List[int]]:
    """This rank's batches of an epoch: a seeded shuffle (the same on every rank), dealt round-robin to
    the ranks, incomplete batches dropped (as DistributedSampler + drop_last do)."""
    order = torch.randperm(length, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    mine = order[rank::world][: length // world]
    return [mine[i: i + batch] for i in range(0, len(mine) - batch + 1, batch)]


def collate(samples):
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


# ------------------------------------------------------------------------------------------ schedule
def lr_factor(step: int, warmup_iters: int, max_iters: int, warmup_ratio: float, power: float) -> float:
    """The published PolyWarmupAdamW multiplier for the step about to be taken (0-based): linear from
    ``warmup_ratio`` to 1 over the warm-up, then ``(1 - step / max_iters) ** power``; from ``max_iters``
    on it stays at its last value."""
    step = min(step, max_iters - 1)
    if step < warmup_iters:
        return 1 - (1 - step / warmup_iters) * (1 - warmup_ratio)
    return (1 - step / max_iters) ** power


def make_optimizer(model, args):
    encoder, norms, decoder = model.param_groups()
    groups = [
        {"params": encoder, "lr": args.lr, "weight_decay": args.weight_decay},
        {"params": norms, "lr": args.lr, "weight_decay": 0.0},
        {"params": decoder, "lr": args.lr * 10, "weight_decay": args.weight_decay},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer


# -------------------------------------------------------------------------------------------- helpers
def progress_bar(total: int, enabled: bool, label: str) -> Progress:
    """The progress bar of training and evaluation, on stdout with the run's other lines: tqdm when it
    is installed, else a bar on a terminal and a line every 10% otherwise (logs, CI); both with an ETA."""
    return Progress(total, label=label, file=sys.stdout, enabled=enabled)


def autocast_dtype(args, device: torch.device) -> Optional[torch.dtype]:
    choice = args.amp
    if choice == "auto":
        choice = "bf16" if device.type == "cuda" else "none"
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def output_names(model) -> List[str]:
    return ["rgb", "depth", "ensemble"] if model.num_modalities == 2 else ["rgb"]


def model_inputs(batch, model, device) -> List[torch.Tensor]:
    keys = ["rgb", "depth"][: model.num_modalities]
    return [batch[k].to(device, non_blocking=True) for k in keys]


def segmentation_loss(outputs: List[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Sum over the outputs of the cross-entropy of the logits upsampled to the label size."""
    loss = 0.0
    for logits in outputs:
        logits = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
        loss = loss + F.cross_entropy(logits, target, ignore_index=IGNORE_LABEL)
    return loss


@torch.no_grad()
def evaluate(model, val_set, args, env: Dist, amp_dtype) -> Dict[str, Dict[str, float]]:
    model.eval()
    shard = Subset(val_set, range(env.rank, len(val_set), env.world))
    loader = DataLoader(shard, batch_size=args.val_batch_size, shuffle=False, num_workers=args.workers,
                        collate_fn=collate, generator=_private_generator())
    names = output_names(model)
    num_classes = model.num_classes
    matrices = [torch.zeros(num_classes, num_classes, dtype=torch.int64) for _ in names]
    progress = progress_bar(len(loader), env.main and not args.quiet, "eval ")
    for batch in loader:
        target = batch["mask"].to(env.device)
        with _autocast(env.device, amp_dtype):
            outputs = model(model_inputs(batch, model, env.device))
        for i, logits in enumerate(outputs):
            logits = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
            matrices[i] += confusion_matrix(target, logits.argmax(1), num_classes)
        progress.update()
    progress.close()
    return {name: scores(env.all_sum(m)) for name, m in zip(names, matrices)}


def _private_generator() -> torch.Generator:
    # A DataLoader draws its workers' base seed from its generator, by default the global one; a private
    # one keeps the global RNG (dropout, stochastic depth) a function of the training steps alone, so
    # that a resumed run continues exactly. Augmentations are seeded per sample (see data.py).
    return torch.Generator().manual_seed(0)


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_train_mode(model: nn.Module, train_bn: bool) -> None:
    model.train()
    if not train_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def save_checkpoint(path, model, optimizer, scaler, step, epoch, best, args, env: Dist, max_iters: int,
                    collective: bool = True) -> None:
    """Writes ``path`` atomically (a temp file, removed if the save is interrupted, then renamed).
    ``collective=False`` (on an interrupt, when the other ranks may not be at the same point): no
    gather, the other ranks' RNG states are not stored."""
    own = {"torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if env.device.type == "cuda" else None}
    rng = env.gather(own) if collective else [own]
    if not env.main:
        return
    state = {
        "segmenter": to_published_state_dict(model),
        "epoch_start": epoch,
        "best_val": best,
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng,
        "max_iters": max_iters,  # the poly schedule's end, kept on resume
        "num_classes": model.num_classes,
        "args": {k: v for k, v in vars(args).items() if k != "explicit"},
    }
    tmp = f"{path}.tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)  # never leave a half-written checkpoint behind
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _log(path: Optional[str], record: dict) -> None:
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def format_scores(results: Dict[str, Dict[str, float]]) -> str:
    return "  ".join(f"({name}) pixel_acc={s['pixel_acc']:.2f} mean_acc={s['mean_acc']:.2f} mIoU={s['miou']:.2f}"
                     for name, s in results.items())


# ------------------------------------------------------------------------------------------------ run
def run(args: argparse.Namespace) -> dict:
    """Train (or, with ``--evaluate``, evaluate); returns ``{"losses": [...], "eval": {...}, "step": n}``."""
    env = Dist(args)
    try:
        return _run(args, env)
    finally:
        env.close()


def _run(args, env: Dist) -> dict:
    state = None
    if args.resume:
        state = load_checkpoint_file(args.resume)
        needed = ("segmenter", "optimizer", "step", "best_val", "rng")
        lacking = [k for k in needed if k not in state] if isinstance(state, dict) else list(needed)
        if lacking:
            raise ValueError(
                f"--resume {args.resume}: not a checkpoint written by this script (it lacks {lacking}, which "
                f"resuming needs; it has {sorted(state) if isinstance(state, dict) else type(state).__name__}); "
                f"to start from a published or segmenter-only file use --init-checkpoint")
        apply_checkpoint_settings(args, state)
    random.seed(args.seed + env.rank)
    torch.manual_seed(args.seed + env.rank)
    train_set, val_set, num_classes = make_datasets(args)
    if state is not None and state.get("num_classes", num_classes) != num_classes:
        raise ValueError(f"--dataset {args.dataset} has {num_classes} classes but the checkpoint {args.resume} "
                         f"was trained with {state['num_classes']}")
    # Parameters are initialised identically on every rank (DDP also broadcasts them from rank 0).
    torch.manual_seed(args.seed)
    model = build_model(args.backbone, num_classes, args.fusion_backend, num_modalities=len(args.modalities),
                        fusion=not args.no_fusion, drop_path_rate=args.dpr, drop_rate=args.drop_rate,
                        decoder_dropout=args.decoder_dropout)
    torch.manual_seed(args.seed + env.rank)
    if args.pretrained:
        load_imagenet_mit(model, args.pretrained)
    if args.init_checkpoint:
        load_published_checkpoint(model, args.init_checkpoint,
                                  exclude=("decoder.linear_pred.",) if args.finetune else ())
    model.to(env.device)
    amp_dtype = autocast_dtype(args, env.device)
    log_path = None
    if env.main:
        os.makedirs(args.out_dir, exist_ok=True)
        for stale in glob.glob(os.path.join(glob.escape(args.out_dir), "*.pth.tar.tmp")):
            os.remove(stale)  # left by a save that was killed
        log_path = os.path.join(args.out_dir, "metrics.jsonl")
        n_params = sum(p.numel() for p in model.parameters())
        print(f"[gemini_seg] {args.backbone} {'+'.join(args.modalities)} fusion="
              f"{'none' if args.no_fusion or len(args.modalities) == 1 else args.fusion_backend} "
              f"params={n_params / 1e6:.2f}M classes={num_classes} device={env.device} world={env.world} "
              f"amp={amp_dtype}", flush=True)

    if args.evaluate:
        results = evaluate(model, val_set, args, env, amp_dtype)
        if env.main:
            print("[eval] " + format_scores(results), flush=True)
            _log(log_path, {"eval": results})
        return {"losses": [], "eval": results, "step": 0}

    optimizer = make_optimizer(model, args)
    scaler = torch.amp.GradScaler(env.device.type) if amp_dtype == torch.float16 else None
    steps_per_epoch = len(epoch_batches(len(train_set), args.batch_size, 0, args.seed, env.rank, env.world))
    if steps_per_epoch == 0:
        raise ValueError(f"the training set ({len(train_set)} samples over {env.world} processes) is smaller "
                         f"than one batch ({args.batch_size})")
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    max_iters = args.max_iters or total_steps
    if state is not None and "max_iters" not in getattr(args, "explicit", ()):
        # Keep the original run's schedule (a larger --max-steps would otherwise make the LR jump). Older
        # checkpoints lack "max_iters": the end their run computed from its own flags.
        old = state.get("args") or {}
        max_iters = state.get("max_iters") or old.get("max_iters") or min(
            old.get("epochs", args.epochs) * steps_per_epoch, old.get("max_steps") or math.inf)

    step, best = 0, 0.0
    if state is not None:
        load_published_checkpoint(model, state)
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, best = state["step"], state["best_val"]
        rng = state["rng"][env.rank] if env.rank < len(state["rng"]) else None
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and env.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"])
        if env.main:
            print(f"[gemini_seg] resumed from {args.resume} at step {step}", flush=True)
    last_path = os.path.join(args.out_dir, "last.pth.tar")

    train_model = model
    if env.world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)

    losses, results = [], {}
    progress = progress_bar(total_steps - step, env.main and not args.quiet, "train")
    epoch = step // steps_per_epoch
    try:
        while step < total_steps:
            train_set.set_epoch(epoch)
            batches = epoch_batches(len(train_set), args.batch_size, epoch, args.seed, env.rank, env.world)
            batches = batches[step - epoch * steps_per_epoch:]  # resuming mid-epoch: skip what was done
            loader = DataLoader(train_set, batch_sampler=batches, num_workers=args.workers, collate_fn=collate,
                                pin_memory=env.device.type == "cuda", generator=_private_generator())
            set_train_mode(model, args.train_bn)
            for batch in loader:
                factor = lr_factor(step, args.warmup_iters, max_iters, args.warmup_ratio, args.power)
                for group in optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * factor
                target = batch["mask"].to(env.device, non_blocking=True)
                with _autocast(env.device, amp_dtype):
                    outputs = train_model(model_inputs(batch, model, env.device))
                loss = segmentation_loss(outputs, target)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                step += 1
                value = loss.item()
                if not math.isfinite(value):
                    raise FloatingPointError(f"loss is {value} at step {step}; lower --lr or use --amp bf16/none")
                losses.append(value)
                if env.main:
                    _log(log_path, {"step": step, "epoch": epoch, "loss": value, "lr": optimizer.param_groups[0]["lr"]})
                progress.update(f"loss {value:.4f}")
                if args.save_every and step % args.save_every == 0:
                    save_checkpoint(last_path, model, optimizer, scaler, step, epoch, best, args, env, max_iters)
                if step >= total_steps:
                    break
            epoch_done = step % steps_per_epoch == 0
            every = epoch_done and args.eval_every > 0 and (epoch + 1) % args.eval_every == 0
            if every or step >= total_steps:
                results = evaluate(model, val_set, args, env, amp_dtype)
                score = results[output_names(model)[-1]]["miou"]
                if env.main:
                    print(f"[eval] epoch {epoch} step {step}  " + format_scores(results), flush=True)
                    _log(log_path, {"epoch": epoch, "step": step, "eval": results})
                if score > best:
                    best = score
                    save_checkpoint(os.path.join(args.out_dir, "best.pth.tar"), model, optimizer, scaler, step,
                                    epoch, best, args, env, max_iters)
                set_train_mode(model, args.train_bn)
            if epoch_done:
                epoch += 1
    except KeyboardInterrupt:
        progress.close()
        # Not collective: the other ranks may be anywhere. A step interrupted before its end is not counted.
        save_checkpoint(last_path, model, optimizer, scaler, step, epoch, best, args, env, max_iters,
                        collective=False)
        if env.main:
            print(f"\n[gemini_seg] interrupted at step {step}; checkpoint saved to {last_path} "
                  f"(continue with --resume {last_path})", flush=True)
        raise
    progress.close()
    save_checkpoint(last_path, model, optimizer, scaler, step, epoch, best, args, env, max_iters)
    env.barrier()
    if env.main:
        print(f"[gemini_seg] checkpoint saved to {last_path}", flush=True)
    return {"losses": losses, "eval": results, "step": step, "checkpoint": last_path}


def main(argv: Optional[List[str]] = None) -> None:
    try:
        run(parse_args(argv))
    except KeyboardInterrupt:
        sys.exit(130)  # the shell's code for SIGINT; the checkpoint was saved (see the message)


if __name__ == "__main__":
    main()
