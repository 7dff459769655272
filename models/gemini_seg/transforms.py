"""The published augmentations (utils/augmentations_mm.py of JiaDingCN/GeminiFusion), in plain torch.

A sample is a dict ``{"rgb": (3, H, W), "depth": (3, H, W), "mask": (H, W) int64}`` with images as
float tensors in 0..255 until :class:`Normalize`. Every random draw comes from the ``random.Random``
passed in, so that a sample's augmentation depends only on (seed, epoch, index): runs resume
exactly and do not depend on the number of loader workers.

Training: colour jitter (p 0.2; RGB only), horizontal flip (p 0.5), 3x3 Gaussian blur (p 0.2; RGB
only), random resize by 0.5..2 then crop / pad to the training size (label fill 255), normalisation.
Evaluation: resize (short side to the evaluation size, then each side up to a multiple of 32) and
normalisation.
"""
from __future__ import annotations

import math
import random
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_LABEL = 255
Sample = Dict[str, torch.Tensor]


def _images(sample: Sample):
    return [k for k in sample if k != "mask"]


def _grey(rgb: torch.Tensor) -> torch.Tensor:
    return (0.2989 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]).unsqueeze(0)


def _blend(image: torch.Tensor, other: torch.Tensor, factor: float) -> torch.Tensor:
    return (factor * image + (1.0 - factor) * other).clamp_(0.0, 255.0)


def color_jitter(sample: Sample, rng: random.Random, p: float = 0.2) -> Sample:
    """Brightness, contrast, saturation, each by a factor in [0.5, 1.5], in that order (RGB only)."""
    if rng.random() < p:
        rgb = sample["rgb"]
        rgb = _blend(rgb, torch.zeros_like(rgb), rng.uniform(0.5, 1.5))
        rgb = _blend(rgb, _grey(rgb).mean().expand_as(rgb), rng.uniform(0.5, 1.5))
        rgb = _blend(rgb, _grey(rgb).expand_as(rgb), rng.uniform(0.5, 1.5))
        sample["rgb"] = rgb
    return sample


def horizontal_flip(sample: Sample, rng: random.Random, p: float = 0.5) -> Sample:
    if rng.random() < p:
        sample = {k: v.flip(-1) for k, v in sample.items()}
    return sample


def gaussian_blur(sample: Sample, rng: random.Random, p: float = 0.2) -> Sample:
    """3x3 Gaussian, sigma 0.8 (torchvision's default for that size), reflect padding; RGB only."""
    if rng.random() < p:
        sigma = 0.8
        taps = torch.exp(-torch.tensor([-1.0, 0.0, 1.0]) ** 2 / (2 * sigma**2))
        taps = taps / taps.sum()
        kernel = (taps[:, None] * taps[None, :]).expand(3, 1, 3, 3)
        padded = F.pad(sample["rgb"].unsqueeze(0), (1, 1, 1, 1), mode="reflect")
        sample["rgb"] = F.conv2d(padded, kernel.to(padded.dtype), groups=3).squeeze(0)
    return sample


def _resize(sample: Sample, size: Tuple[int, int]) -> Sample:
    out = {}
    for k, v in sample.items():
        if k == "mask":
            out[k] = F.interpolate(v[None, None].float(), size=size, mode="nearest")[0, 0].long()
        else:
            out[k] = F.interpolate(v[None], size=size, mode="bilinear", align_corners=False)[0]
    return out


def random_resized_crop(sample: Sample, rng: random.Random, size: Sequence[int],
                        scale: Tuple[float, float] = (0.5, 2.0)) -> Sample:
    """The published RandomResizedCrop: rescale by a random ratio of the target size (keeping the aspect
    ratio), crop a random window of ``size``, pad the rest (images 0, labels 255)."""
    height, width = sample["mask"].shape
    target_h, target_w = size
    ratio = rng.uniform(*scale)
    # As published: the long side is bounded by 4x the target width times the ratio (rarely binding),
    # the short side by the target height times the ratio.
    bounds = (int(target_h * ratio), int(target_w * 4 * ratio))
    factor = min(max(bounds) / max(height, width), min(bounds) / min(height, width))
    new_h, new_w = int(height * factor + 0.5), int(width * factor + 0.5)
    sample = _resize(sample, (new_h, new_w))
    top = rng.randint(0, max(new_h - target_h, 0))
    left = rng.randint(0, max(new_w - target_w, 0))
    sample = {k: v[..., top: top + target_h, left: left + target_w] for k, v in sample.items()}
    pad_h, pad_w = target_h - sample["mask"].shape[0], target_w - sample["mask"].shape[1]
    if pad_h or pad_w:
        sample = {
            k: F.pad(v, (0, pad_w, 0, pad_h), value=IGNORE_LABEL if k == "mask" else 0.0)
            for k, v in sample.items()
        }
    return sample


def resize_for_eval(sample: Sample, short_side: int) -> Sample:
    """The published evaluation Resize: short side to ``short_side``, then each side up to a multiple
    of 32 (the encoder's total stride)."""
    height, width = sample["mask"].shape
    factor = short_side / min(height, width)
    new_h, new_w = round(height * factor), round(width * factor)
    return _resize(sample, (math.ceil(new_h / 32) * 32, math.ceil(new_w / 32) * 32))


def normalize(sample: Sample) -> Sample:
    """RGB: /255 then ImageNet mean and std; every other modality (depth): /255 only, as published."""
    out = {}
    for k, v in sample.items():
        if k == "mask":
            out[k] = v
        elif k == "rgb":
            mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
            std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
            out[k] = (v / 255.0 - mean) / std
        else:
            out[k] = v / 255.0
    return out


def train_transform(sample: Sample, rng: random.Random, size: Sequence[int]) -> Sample:
    sample = color_jitter(sample, rng)
    sample = horizontal_flip(sample, rng)
    sample = gaussian_blur(sample, rng)
    sample = random_resized_crop(sample, rng, size)
    return normalize(sample)


def eval_transform(sample: Sample, short_side: int) -> Sample:
    return normalize(resize_for_eval(sample, short_side))
