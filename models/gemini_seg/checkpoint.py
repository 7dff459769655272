"""Published checkpoints and ImageNet MiT weights -> this model's parameter names, and back.

Published GeminiFusion files, per family (:func:`model_family`):

* MiT and Swin (branch ``main``, ``main.py``'s Saver: ``model-best.pth.tar`` / ``checkpoint.pth.tar``)
  hold ``{"segmenter": DDP(WeTr).state_dict(), "epoch_start": int, "best_val": numpy.float64}``;
* DeLiVER (branch ``DeLiVER``, ``tools/train_mm.py``) writes the best model as a bare
  ``model.state_dict()`` (``*.pth``, no ``module.`` prefix) and a resume file beside it,
  ``{"epoch", "model_state_dict", "optimizer_state_dict", "loss", "scheduler_state_dict", "best_miou"}``.

Their names differ from this package's by renaming alone:

* ``module.`` in front of every key of a ``main.py`` file (the DistributedDataParallel wrapper);
* layers the streams share are wrapped in ``ModuleParallel``, adding ``.module.``: before the tensor name
  for MiT / DeLiVER (``attn.q.module.weight``; not the MixFFN depthwise conv, ``mlp.dwconv.dwconv``) and
  Swin's patch embedding, ``norm1``, ``norm2``, ``mlp.fc1`` / ``fc2``; before the layer name for Swin's
  whole window attention and patch merging (``attn.module.qkv.weight``, ``downsample.module.norm.weight``);
* the fusion parameters sit in ``attn`` (MiT, DeLiVER) or directly in the Swin block
  (``...cross_attn_0_to_1.in_proj_weight``, ``...relation_judger.0.fc1.weight``, ``...k_noise.weight``),
  here in a :class:`gemini_kernels.GeminiFusion` called ``fusion`` at the same place;
* Swin's backbone sits in ``TransformerBackbone.body`` (``encoder.body.layers...``); DeLiVER calls the
  encoder ``backbone`` and the decoder ``decode_head``.

Per-modality LayerNorms are ``ln_0`` / ``ln_1`` (``ln_{M-1}`` on DeLiVER) in both. With these renamings
every key of a published file has a place in the model built with the same architecture, class count
and modality count, and every parameter and buffer of the model is filled (Swin's relative position
index included): nothing is left unmapped (:data:`PUBLISHED_UNMAPPED`). Fine-tuning to another class
count (the published ``--is_pretrain_finetune``) drops ``decoder.linear_pred.*`` with
``exclude=("decoder.linear_pred.",)``.

ImageNet MiT weights (SegFormer's ``mit_b*.pth``, single-stream names such as ``block1.0.norm1.weight``)
load into the encoder: each LayerNorm goes to both ``ln_0`` and ``ln_1``, the shared layers load as they
are, ``head.*`` (the ImageNet classifier) is dropped and the fusion layers keep their initialisation
(:data:`IMAGENET_UNMAPPED`), as the published ``expand_state_dict`` does.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Iterable, Mapping, Tuple

import torch
from torch import nn

from gemini_kernels import load_checkpoint_file

# Keys of a published checkpoint with no place in this model, and parameters of this model a
# published checkpoint leaves unfilled: none.
PUBLISHED_UNMAPPED: Tuple[str, ...] = ()
# ImageNet MiT: dropped from the file / left at their initialisation in the model.
IMAGENET_UNMAPPED = {"unexpected": ("head.weight", "head.bias"), "missing": ("attn.fusion.",)}

_FUSION_PARTS = "cross_attn_0_to_1|cross_attn_1_to_0|relation_judger|k_noise|v_noise"
_PUBLISHED_FUSION = re.compile(rf"\.attn\.({_FUSION_PARTS})\.")
_OURS_FUSION = re.compile(rf"\.attn\.fusion\.({_FUSION_PARTS})\.")
# The published ModuleParallel-wrapped (shared) layers, by this model's module names.
_SHARED_LAYER = re.compile(r"(patch_embed\d\.proj|attn\.(q|kv|sr|proj)|mlp\.(fc1|fc2))\.(weight|bias)$")


def published_to_ours(key: str) -> str:
    if key.startswith("module."):
        key = key[len("module."):]
    key = key.replace(".module.", ".")
    return _PUBLISHED_FUSION.sub(r".attn.fusion.\1.", key)


def ours_to_published(key: str) -> str:
    key = _OURS_FUSION.sub(r".attn.\1.", key)
    key = _SHARED_LAYER.sub(lambda m: f"{m.group(1)}.module.{m.group(4)}", key)
    return "module." + key


def _swin_to_published(key: str) -> str:
    key = _SWIN_FUSION.sub(r".blocks.\1.\2.", key)
    key = _SWIN_SHARED.sub(lambda m: f"{m.group(1)}.module.{m.group(2)}", key)
    key = _SWIN_BLOCK_SHARED.sub(lambda m: f"{m.group(1)}.module.{m.group(2)}", key)
    return "module." + key.replace("encoder.", "encoder.body.", 1)


def _deliver_to_published(key: str) -> str:
    key = _OURS_FUSION.sub(r".attn.\1.", key)
    key = _SHARED_LAYER.sub(lambda m: f"{m.group(1)}.module.{m.group(4)}", key)
    for ours, published in (("encoder.", "backbone."), ("decoder.", "decode_head.")):
        if key.startswith(ours):
            return published + key[len(ours):]
    return key


# Swin (models/swin_transformer.py): the fusion sits in the block; ModuleParallel wraps the patch-embed
# conv, norm1 / norm2, mlp.fc1 / fc2 (".module." before the tensor name), the whole WindowAttention and
# the whole PatchMerging (".module." before the layer name); the model sits in TransformerBackbone.body.
_SWIN_FUSION = re.compile(rf"\.blocks\.(\d+)\.fusion\.({_FUSION_PARTS})\.")
_SWIN_SHARED = re.compile(r"(patch_embed\.proj|\.norm1|\.norm2|\.mlp\.fc1|\.mlp\.fc2)\.(weight|bias)$")
_SWIN_BLOCK_SHARED = re.compile(r"(\.attn|\.downsample)\.(qkv|proj|relative_position_bias_table|"
                                r"relative_position_index|norm|reduction)\b")


def model_family(model: nn.Module) -> str:
    """Which published code ``model`` corresponds to: ``"mit"`` / ``"swin"`` (branch main, WeTr),
    ``"deliver"`` (branch DeLiVER), or ``"plain"`` (anything else: names as they are)."""
    from .deliver import DeliverSegmenter
    from .head import GeminiSegmenter
    from .mit import MixVisionTransformer
    from .swin import SwinTransformer

    if isinstance(model, DeliverSegmenter):
        return "deliver"
    if isinstance(model, GeminiSegmenter):
        if isinstance(model.encoder, SwinTransformer):
            return "swin"
        if isinstance(model.encoder, MixVisionTransformer):
            return "mit"
    return "plain"


_TO_PUBLISHED = {"mit": ours_to_published, "swin": _swin_to_published, "deliver": _deliver_to_published,
                 "plain": lambda key: key}


def published_names(model: nn.Module) -> Dict[str, str]:
    """This model's state_dict names -> the published names of the same tensors."""
    rename = _TO_PUBLISHED[model_family(model)]
    return {k: rename(k) for k in model.state_dict()}


def to_published_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's state_dict under the published names: what the published code's
    ``DDP(WeTr).state_dict()`` (MiT, Swin; ``module.`` prefix) or ``GeminiFusion.state_dict()``
    (DeLiVER; no prefix) gives, the model's own tensors renamed."""
    state = model.state_dict()
    return {published: state[ours] for ours, published in published_names(model).items()}


def from_published_state_dict(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """MiT names only (kept for callers of the MiT-only version); see :func:`load_published_checkpoint`."""
    return {published_to_ours(k): v for k, v in state.items()}


def _read(source) -> Mapping[str, torch.Tensor]:
    if isinstance(source, Mapping):
        return source
    if not isinstance(source, (str, bytes, os.PathLike)):
        raise TypeError(f"source must be a checkpoint path or an already loaded dict; got {type(source).__name__}")
    # Not a bare torch.load(weights_only=True): published files hold a numpy.float64 best_val, which
    # it refuses; load_checkpoint_file allows NumPy scalars and still refuses arbitrary pickles.
    return load_checkpoint_file(source)


# Where each published training script puts the model in what it saves: main.py's Saver ("segmenter"),
# DeLiVER's train_mm.py resume file ("model_state_dict"); DeLiVER's best-model .pth is the bare dict.
_STATE_ENTRIES = ("segmenter", "model_state_dict")


def _strip_ddp(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


def _listing(keys, limit=20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_published_checkpoint(model: nn.Module, source, exclude: Iterable[str] = ()):
    """Load a published checkpoint (a path, or the loaded dict) into ``model``, strictly.

    ``source`` is any file the published training code writes: main.py's ``.pth.tar`` (MiT / Swin
    WeTr; the state under ``"segmenter"``, keys prefixed ``module.``, ``best_val`` a NumPy scalar),
    DeLiVER's best-model ``.pth`` (a bare state_dict) or its ``*_checkpoint.pth`` resume file (the state
    under ``"model_state_dict"``, with optimizer / scheduler states, ``epoch``, ``best_miou``); or this
    package's own training checkpoints (``"segmenter"``). A ``module.`` prefix is optional everywhere.

    ``exclude``: prefixes of entries to skip on both sides, in this model's names or the published
    ones without ``module.`` (``("decoder.linear_pred.",)`` loads a 37-class SUN RGB-D file into a
    40-class model, as the published ``--is_pretrain_finetune`` does).

    Raises ``KeyError`` listing the checkpoint keys with no place in the model and the model entries
    the checkpoint leaves unfilled, if there are any, and ``ValueError`` listing tensors whose shapes
    differ (nothing is loaded then). Returns the file's other entries (e.g.
    ``{"epoch_start", "best_val"}``; for a bare state_dict, ``{}``).
    """
    if isinstance(exclude, str):
        raise TypeError(f"exclude must be a sequence of prefixes, not a string; got {exclude!r} "
                        f"(write ({exclude!r},))")
    exclude = tuple(exclude)
    raw = _read(source)
    entry = next((e for e in _STATE_ENTRIES if e in raw and isinstance(raw[e], Mapping)), None)
    state = raw[entry] if entry else raw
    extras = {k: v for k, v in raw.items() if k != entry} if entry else {}
    names = published_names(model)
    ours_of = {_strip_ddp(published): ours for ours, published in names.items()}

    def skipped(ours, published):
        return ours.startswith(exclude) or published.startswith(exclude)

    mapped, unmapped = {}, []
    for key, value in state.items():
        published = _strip_ddp(key)
        ours = ours_of.get(published)
        if ours is None:
            if not published.startswith(exclude):
                unmapped.append(key)
        elif not skipped(ours, published):
            mapped[ours] = value
    missing = [k for k in names if k not in mapped and not skipped(k, _strip_ddp(names[k]))]
    if missing or unmapped:
        raise KeyError(
            f"checkpoint does not match the model: {len(missing)} model entries unfilled "
            f"[{_listing(missing)}], {len(unmapped)} checkpoint keys unmapped [{_listing(unmapped)}]; "
            f"is the backbone / num_classes / modality count the one it was trained with?"
        )
    own = model.state_dict()
    wrong = [f"{names[k]}: {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the model"
             for k, v in mapped.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise ValueError(f"checkpoint does not match the model: {len(wrong)} tensors differ in shape "
                         f"[{_listing(wrong)}]; a file trained for another class count loads with "
                         f"exclude=('decoder.linear_pred.',)")
    model.load_state_dict(mapped, strict=False)
    return extras


def load_imagenet_mit(model: nn.Module, source) -> None:
    """Load SegFormer's ImageNet ``mit_b*.pth`` into the encoder, every LayerNorm into each stream.

    ``model`` is a :class:`GeminiSegmenter` or its encoder. Raises ``KeyError`` if any encoder entry
    other than the fusion layers stays unfilled, or any file key other than ``head.*`` is unused.
    """
    encoder = getattr(model, "encoder", model)
    raw = _read(source)
    for wrapper in ("state_dict", "model"):
        if wrapper in raw and isinstance(raw[wrapper], Mapping):
            raw = raw[wrapper]
    missing_fusion = IMAGENET_UNMAPPED["missing"][0]
    target, used, unfilled = {}, set(), []
    for name in encoder.state_dict():
        if missing_fusion in name:
            continue
        source_name = re.sub(r"\.ln_\d+\.", ".", name)
        if source_name in raw:
            target[name] = raw[source_name]
            used.add(source_name)
        else:
            unfilled.append(name)
    unused = [k for k in raw if k not in used and k not in IMAGENET_UNMAPPED["unexpected"]]
    if unfilled or unused:
        raise KeyError(
            f"ImageNet MiT weights do not match the encoder: {len(unfilled)} encoder entries unfilled "
            f"(first: {unfilled[:5]}), {len(unused)} file keys unused (first: {unused[:5]}); "
            f"is it the mit_b* file of this backbone?"
        )
    encoder.load_state_dict(target, strict=False)
