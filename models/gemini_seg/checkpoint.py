"""Published checkpoints and ImageNet MiT weights -> this model's parameter names.

Published GeminiFusion checkpoints (``*.pth.tar``, JiaDingCN/GeminiFusion ``main.py``) hold
``{"segmenter": DDP(WeTr).state_dict(), "epoch_start": ..., "best_val": ...}``. Their names differ from
this model's in three ways only:

* every key starts with ``module.`` (the DistributedDataParallel wrapper);
* layers the streams share are wrapped in ``ModuleParallel``, adding ``.module.`` before the tensor name
  (``encoder.block1.0.attn.q.module.weight``); the MixFFN depthwise conv is not (``mlp.dwconv.dwconv``);
* the fusion parameters sit directly in ``attn`` (``attn.cross_attn_0_to_1.in_proj_weight``,
  ``attn.relation_judger.0.fc1.weight``, ``attn.k_noise.weight``, ...), here in ``attn.fusion``.

Per-modality LayerNorms are ``ln_0`` / ``ln_1`` in both. With these three renamings every key of a
published MiT checkpoint has a place in the model built with the same backbone and class count, and
every parameter and buffer of the model is filled: the list of keys left unmapped is empty
(:data:`PUBLISHED_UNMAPPED`). Fine-tuning to another class count (the published
``--is_pretrain_finetune``) drops ``decoder.linear_pred.*`` with ``exclude=("decoder.linear_pred.",)``.

ImageNet MiT weights (SegFormer's ``mit_b*.pth``, single-stream names such as ``block1.0.norm1.weight``)
load into the encoder: each LayerNorm goes to both ``ln_0`` and ``ln_1``, the shared layers load as they
are, ``head.*`` (the ImageNet classifier) is dropped and the fusion layers keep their initialisation
(:data:`IMAGENET_UNMAPPED`), as the published ``expand_state_dict`` does.
"""
from __future__ import annotations

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


def to_published_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's state_dict under the published names (what ``DDP(WeTr).state_dict()`` gives)."""
    return {ours_to_published(k): v for k, v in model.state_dict().items()}


def from_published_state_dict(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {published_to_ours(k): v for k, v in state.items()}


def _read(source) -> Mapping[str, torch.Tensor]:
    if isinstance(source, Mapping):
        return source
    # Not a bare torch.load(weights_only=True): published files hold a numpy.float64 best_val, which
    # it refuses; load_checkpoint_file allows NumPy scalars and still refuses arbitrary pickles.
    return load_checkpoint_file(source)


def load_published_checkpoint(model: nn.Module, source, exclude: Iterable[str] = ()):
    """Load a published ``.pth.tar`` (a path, or the loaded dict) into ``model``.

    Accepts the whole file (its ``segmenter`` entry is used) or a bare state_dict, with or without the
    ``module.`` prefix. Raises ``KeyError`` listing any key that does not map, or any model entry left
    unfilled, beyond ``exclude`` (prefixes, in this model's names, of entries to skip on both sides).
    Returns the file's other entries (e.g. ``epoch_start``, ``best_val``).
    """
    raw = _read(source)
    state = raw["segmenter"] if "segmenter" in raw else raw
    extras = {k: v for k, v in raw.items() if k != "segmenter"} if "segmenter" in raw else {}
    exclude = tuple(exclude)
    mapped = {k: v for k, v in from_published_state_dict(state).items() if not k.startswith(exclude)}
    result = model.load_state_dict(mapped, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(exclude)]
    if missing or result.unexpected_keys:
        raise KeyError(
            f"checkpoint does not match the model: {len(missing)} model entries unfilled "
            f"(first: {missing[:5]}), {len(result.unexpected_keys)} checkpoint keys unmapped "
            f"(first: {result.unexpected_keys[:5]}); is the backbone / num_classes the one it was trained with?"
        )
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
