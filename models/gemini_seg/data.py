"""Datasets: an embedded procedural RGB-D set (no download) and NYUDv2 / SUN RGB-D in the published
layout. Every dataset returns the sample dict of :mod:`gemini_seg.transforms`, already transformed.

Augmentation randomness is a function of (seed, epoch, index) only: call ``set_epoch`` each epoch.
"""
from __future__ import annotations

import os
import random
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import eval_transform, train_transform


class _Augmented(Dataset):
    def __init__(self, train: bool, crop_size: Sequence[int], seed: int):
        self.train = train
        self.crop_size = tuple(crop_size)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _transform(self, sample, index: int):
        if self.train:
            rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
            return train_transform(sample, rng, self.crop_size)
        return eval_transform(sample, min(self.crop_size))


class SyntheticRGBD(_Augmented):
    """Procedural RGB-D scenes in which depth carries what colour cannot, and colour what depth cannot.

    A scene is a textured background plane (depth 0.8..1.0, receding upwards) holding rectangles and
    ellipses. Classes:

    * 0 background, including *decals*: coloured patches painted on the background at its depth
      (in RGB they look exactly like objects);
    * 1 near object and 2 far object: the same colours, shapes and sizes, separated only by depth
      (near 0.15..0.35, far 0.5..0.7);
    * 3 camouflaged object: its colour is the background's own texture (invisible in RGB), at any object
      depth (in depth it looks exactly like classes 1 and 2).

    So RGB alone cannot tell near from far, nor see camouflage, nor reject decals; depth alone cannot
    tell a camouflaged object from a coloured one. Scene ``i`` is a pure function of ``(seed, i)``.
    Depth is stored as the published NYUDv2 depth is: a 3-channel 8-bit image (0 near, 255 far).
    """

    CLASSES = ("background", "near object", "far object", "camouflaged object")
    num_classes = len(CLASSES)

    def __init__(self, length: int = 512, size: Sequence[int] = (64, 64), seed: int = 0, train: bool = True,
                 crop_size: Optional[Sequence[int]] = None):
        super().__init__(train, crop_size or size, seed)
        self.length = length
        self.size = tuple(size)

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int):
        """(rgb uint8 (H, W, 3), depth uint8 (H, W, 3), label uint8 (H, W)) of scene ``index``."""
        if not 0 <= index < self.length:
            raise IndexError(f"index must be in [0, {self.length}); got {index}")
        rng = np.random.default_rng([self.seed, index])
        height, width = self.size
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        # Background: a smooth colour field (a few random sinusoids) plus fine noise.
        background = np.empty((height, width, 3), np.float32)
        base = rng.uniform(60, 200, size=3)
        for c in range(3):
            fy, fx = rng.uniform(0.5, 3.0, size=2) * 2 * np.pi
            phase = rng.uniform(0, 2 * np.pi)
            background[..., c] = base[c] + 40 * np.sin(fy * yy / height + fx * xx / width + phase)
        background += rng.normal(0, 6, size=background.shape)
        rgb = background.copy()
        depth = 1.0 - 0.2 * (1.0 - yy / max(height - 1, 1))
        label = np.zeros((height, width), np.uint8)

        # Shapes: (depth, kind, mask, colour). Drawn far to near so that nearer ones occlude.
        shapes = []
        for _ in range(rng.integers(4, 8)):
            kind = rng.choice([1, 2, 3, 0], p=[0.3, 0.3, 0.25, 0.15])  # 0: a decal
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            ry, rx = rng.uniform(0.08, 0.2) * height, rng.uniform(0.08, 0.2) * width
            if rng.random() < 0.5:
                mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
            else:
                mask = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
            if kind == 1:
                z = rng.uniform(0.15, 0.35)
            elif kind == 2:
                z = rng.uniform(0.5, 0.7)
            elif kind == 3:
                z = rng.uniform(0.15, 0.7)
            else:
                z = None  # on the background plane
            colour = rng.uniform(0, 255, size=3)
            shapes.append((2.0 if z is None else z, kind, mask, colour, z))
        for _, kind, mask, colour, z in sorted(shapes, key=lambda s: -s[0]):
            if kind == 3:
                rgb[mask] = background[mask]
            else:
                shade = rng.normal(0, 6, size=(int(mask.sum()), 3))
                rgb[mask] = colour + shade
            if z is not None:
                depth[mask] = z + 0.02 * (yy[mask] - yy[mask].mean()) / height  # a slight tilt
            label[mask] = kind
        depth = depth + rng.normal(0, 0.01, size=depth.shape)
        rgb8 = np.clip(rgb, 0, 255).astype(np.uint8)
        depth8 = np.clip(depth * 255, 0, 255).astype(np.uint8)
        return rgb8, np.repeat(depth8[..., None], 3, axis=2), label

    def __getitem__(self, index: int):
        rgb, depth, label = self.scene(index)
        sample = {
            "rgb": torch.from_numpy(rgb).permute(2, 0, 1).float(),
            "depth": torch.from_numpy(depth).permute(2, 0, 1).float(),
            "mask": torch.from_numpy(label).long(),
        }
        return self._transform(sample, index)


def read_list_file(path: str):
    """A published list file: one sample per line, tab-separated paths relative to the data root."""
    with open(path, "r", encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def _read_image(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        array = np.array(img)
    if array.dtype == np.uint16:
        # 16-bit depth maps: brought to the 8-bit range the model was trained on.
        array = (array.astype(np.float32) * (255.0 / 65535.0))
    return array


class FolderRGBD(_Augmented):
    """NYUDv2 / SUN RGB-D in the published layout: a data root and a list file whose columns are
    ``rgb, mask, depth`` (``rgb/000003.png  masks/000003.png  depth/000003.png`` for NYUDv2,
    ``RGB/train_0.jpg  labels/train_0.png  Depth/train_0.png`` for SUN RGB-D).

    Depth is an 8-bit image (a single channel is repeated to 3). Labels: NYUDv2 masks hold 0..39 and
    255 (ignored); SUN RGB-D masks hold 0 (unlabelled) and 1..37, shifted by -1 so that 0 becomes 255
    (ignored) and the classes 0..36, as published.
    """

    NUM_CLASSES = {"nyudv2": 40, "sunrgbd": 37}
    # Column of each entry in a list line (the published input_mask_idxs = [0, 2, 1]).
    COLUMNS = {"rgb": 0, "depth": 2, "mask": 1}

    def __init__(self, dataset: str, root: str, list_file: str, train: bool, crop_size: Sequence[int],
                 seed: int = 0):
        if dataset not in self.NUM_CLASSES:
            raise ValueError(f"dataset must be one of {sorted(self.NUM_CLASSES)}; got {dataset!r}")
        super().__init__(train, crop_size, seed)
        self.dataset = dataset
        self.num_classes = self.NUM_CLASSES[dataset]
        self.root = root
        self.items = read_list_file(list_file)
        for number, item in enumerate(self.items, start=1):
            if len(item) != 3:
                raise ValueError(f"{list_file}:{number}: expected 3 tab-separated paths (rgb, mask, depth); got {item}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        paths = {k: os.path.join(self.root, self.items[index][c]) for k, c in self.COLUMNS.items()}
        sample = {}
        for key in ("rgb", "depth"):
            image = _read_image(paths[key])
            if image.ndim == 2:
                image = np.repeat(image[..., None], 3, axis=2)
            sample[key] = torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1).float()
        mask = _read_image(paths["mask"])
        if mask.ndim != 2:
            raise ValueError(f"{paths['mask']}: label masks must be single-channel class indices; got shape {mask.shape}")
        mask = mask.astype(np.uint8)
        if self.dataset == "sunrgbd":
            mask = mask - np.uint8(1)  # uint8 wrap-around: unlabelled 0 -> 255 (ignored)
        sample["mask"] = torch.from_numpy(mask.astype(np.int64))
        if sample["rgb"].shape[1:] != sample["mask"].shape or sample["depth"].shape[1:] != sample["mask"].shape:
            raise ValueError(f"sample {index}: rgb, depth and mask sizes differ: "
                             f"{tuple(sample['rgb'].shape)}, {tuple(sample['depth'].shape)}, {tuple(sample['mask'].shape)}")
        return self._transform(sample, index)


class SyntheticDeliver(SyntheticRGBD):
    """:class:`SyntheticRGBD` scenes with DeLiVER's extra modalities, for the 4-modality model.

    Besides the RGB-D scenes (classes 0-3), each scene holds one to three *moving objects* (class 4):
    coloured patches on the background plane, drawn exactly as the decals of class 0 are, so that RGB
    and depth cannot tell them from decals. Stand-ins for the extra sensors, each carrying what the
    image does not:

    * ``depth``: the dense depth of :class:`SyntheticRGBD` (near / far, camouflage);
    * ``event``: an event camera's frame: where a moving object's mask changed during a small motion,
      positive events in channel 0 (pixels it enters), negative in channel 1 (pixels it leaves), plus
      sparse noise events; the only modality that sees class 4;
    * ``lidar``: sparse range on scan lines (every third row): channel 0 the range (depth * 255, noisy),
      channel 1 255 where a return exists, 0 elsewhere.

    ``modalities`` are the published DeLiVER names (``"img"`` first); ``__getitem__`` returns the
    transformed sample with the image under ``"rgb"`` and the others under their names, and
    :attr:`keys` gives the order the model takes them in.
    """

    CLASSES = SyntheticRGBD.CLASSES + ("moving object",)
    num_classes = len(CLASSES)
    EXTRA = ("depth", "event", "lidar")

    def __init__(self, length: int = 512, size: Sequence[int] = (64, 64), seed: int = 0, train: bool = True,
                 crop_size: Optional[Sequence[int]] = None, modalities: Sequence[str] = ("img", "depth", "event", "lidar")):
        if isinstance(modalities, str) or not modalities or tuple(modalities)[0] != "img" \
                or len(set(modalities)) != len(modalities) or not set(modalities[1:]) <= set(self.EXTRA):
            raise ValueError(f"modalities must be 'img' followed by distinct names of {list(self.EXTRA)}; "
                             f"got {modalities!r}")
        super().__init__(length, size, seed, train, crop_size)
        self.modalities = tuple(modalities)
        self.keys = ("rgb",) + self.modalities[1:]

    def scene(self, index: int):
        """(rgb, depth, event, lidar: uint8 (H, W, 3), label uint8 (H, W)) of scene ``index``."""
        rgb, depth, label = super().scene(index)
        rgb, depth = rgb.copy(), depth.copy()
        rng = np.random.default_rng([self.seed, index, 4])
        height, width = self.size
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        event = np.zeros((height, width, 3), np.uint8)
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            ry, rx = rng.uniform(0.08, 0.2) * height, rng.uniform(0.08, 0.2) * width
            dy, dx = rng.uniform(-0.06, 0.06) * height, rng.uniform(-0.06, 0.06) * width
            before = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
            after = ((yy - cy - dy) / ry) ** 2 + ((xx - cx - dx) / rx) ** 2 <= 1.0
            colour = rng.uniform(0, 255, size=3)
            rgb[after] = np.clip(colour + rng.normal(0, 6, size=(int(after.sum()), 3)), 0, 255).astype(np.uint8)
            label[after] = 4
            # At the background plane's depth, as a decal is (also where it covers a nearer object).
            plane = 1.0 - 0.2 * (1.0 - yy[after] / max(height - 1, 1)) + rng.normal(0, 0.01, size=int(after.sum()))
            depth[after] = np.clip(plane * 255, 0, 255).astype(np.uint8)[:, None]
            event[after & ~before, 0] = 255
            event[before & ~after, 1] = 255
        noise = rng.random((height, width)) < 0.01
        event[noise, rng.integers(0, 2)] = 255
        lidar = np.zeros((height, width, 3), np.uint8)
        rows = np.arange(0, height, 3)
        ranged = depth[rows, :, 0].astype(np.float32) + rng.normal(0, 2.0, size=(len(rows), width))
        lidar[rows, :, 0] = np.clip(ranged, 0, 255).astype(np.uint8)
        lidar[rows, :, 1] = 255
        return rgb, depth, event, lidar, label

    def __getitem__(self, index: int):
        rgb, depth, event, lidar, label = self.scene(index)
        images = {"rgb": rgb, "depth": depth, "event": event, "lidar": lidar}
        sample = {k: torch.from_numpy(np.ascontiguousarray(images[k])).permute(2, 0, 1).float() for k in self.keys}
        sample["mask"] = torch.from_numpy(label).long()
        return self._transform(sample, index)
