"""The DeLiVER GeminiFusion model: MiT with GeminiFusion for two to four modalities (RGB, depth, event,
LiDAR), written from JiaDingCN/GeminiFusion branch ``DeLiVER`` (``semseg/models/geminifusion.py``,
``semseg/models/backbones/geminifusion_backbone.py``, ``semseg/models/heads/segformer.py``).

How it differs from the NYUDv2 MiT model (``build_model("mit_b*")``), even at two modalities:

* the patch embeddings keep one LayerNorm per *input* modality (``ln_0`` ... ``ln_{M-1}``) while the
  blocks and the stage norms see two streams, RGB and a merged X (``ln_0``, ``ln_1``);
* for M > 2 modalities, at every stage the extra modalities' embeddings ``e_i`` are weighted by score
  nets ``s_i = sigmoid(conv1x1(dwconv3x3(e_i)))`` as ``s_i * e_i + e_i``, merged by an element-wise max
  into the X stream, and carried to the next stage as ``(s_i * e_i + e_i) + X_out`` (the weighted
  embedding plus the stage's fused, normalised X output). Each stage has M score nets; the last one is
  never used (the published loop stops at M - 1) but is in the checkpoints;
* the decoder is 512 wide whatever the backbone (the published ``"B0" in backbone`` test looks at the
  name ``"GeminiFusion"`` after the split, never at the variant), and the logits are upsampled to the
  input resolution;
* the initialisation is the DeLiVER model's last pass: every conv N(0, sqrt(2 / (k*k*out))), its group
  count ignored (the published ``fan_out // m.groups`` drops its result);
* ``alpha`` is trained (the DeLiVER optimizer takes every parameter; the 1-D ones without decay).

Names follow this package (``encoder`` / ``decoder``; checkpoint.py maps them to the published
``backbone`` / ``decode_head``).
"""
from __future__ import annotations

import functools
import math
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gemini_kernels import GeminiFusion
from gemini_kernels.backends import BACKENDS

from .head import GeminiSegmenter, SegFormerHead
from .mit import MIT_CONFIGS, Block, MiTConfig, OverlapPatchEmbed, _to_maps
from .layers import ModalityLayerNorm

# The published DATASET.MODALS names; the first is always the RGB image.
DELIVER_MODALITIES = ("img", "depth", "event", "lidar")


def init_deliver(module: nn.Module) -> None:
    """``GeminiFusion._init_weights`` of the DeLiVER model, applied with ``.apply``."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ScorePredictor(nn.Module):
    """``PredictorConv``: per extra modality, a per-pixel score in (0, 1) from its embedding map."""

    def __init__(self, dim: int, num_modalities: int):
        super().__init__()
        self.score_nets = nn.ModuleList([
            nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, groups=dim), nn.Conv2d(dim, 1, 1), nn.Sigmoid())
            for _ in range(num_modalities)
        ])

    def forward(self, extra: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(M-1, B, N, C) embeddings -> (M-1, B, N, 1) scores, score net i for extra modality i."""
        scores = [self.score_nets[i](_to_maps(e[None], height, width)).flatten(2).transpose(1, 2)
                  for i, e in enumerate(extra)]
        return torch.stack(scores)


class DeliverMiT(nn.Module):
    """The DeLiVER GeminiFusion backbone. ``forward(inputs)`` takes ``M`` images ``(B, 3, H, W)`` and
    returns the four stage outputs of the RGB and merged-X streams, ``(2, B, C_s, H/r_s, W/r_s)``."""

    def __init__(self, config: MiTConfig, num_modalities: int, fusion_heads: int = 8, fusion_backend: str = "auto",
                 drop_path_rate: float = 0.0, drop_rate: float = 0.0, in_channels: int = 3):
        super().__init__()
        if num_modalities < 2:
            raise ValueError(f"num_modalities must be at least 2; got {num_modalities}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1); got {drop_path_rate}")
        self.config = config
        self.num_modalities = num_modalities
        self.embed_dims = list(config.embed_dims)
        rates = [r.item() for r in torch.linspace(0, drop_path_rate, sum(config.depths), device="cpu")]
        previous, first = in_channels, 0
        for stage, (dim, depth) in enumerate(zip(config.embed_dims, config.depths), start=1):
            patch, stride = (7, 4) if stage == 1 else (3, 2)
            setattr(self, f"patch_embed{stage}", OverlapPatchEmbed(previous, dim, patch, stride, num_modalities))
            setattr(self, f"block{stage}", nn.ModuleList([
                Block(dim, config.num_heads[stage - 1], config.sr_ratios[stage - 1], config.mlp_ratio,
                      rates[first + i], 2, True, fusion_heads, fusion_backend, drop_rate)
                for i in range(depth)
            ]))
            setattr(self, f"norm{stage}", ModalityLayerNorm(dim, 2))
            first += depth
            previous = dim
        if num_modalities > 2:
            self.extra_score_predictor = nn.ModuleList(
                [ScorePredictor(dim, num_modalities) for dim in config.embed_dims])

    def forward(self, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
        streams = self.num_modalities
        maps = torch.cat(list(inputs), dim=0)
        outputs = []
        for stage in range(1, 5):
            x, height, width = getattr(self, f"patch_embed{stage}")(maps, streams)
            if streams > 2:
                extra = x[1:]
                scores = self.extra_score_predictor[stage - 1](extra, height, width)
                extra = scores * extra + extra
                merged = functools.reduce(torch.max, extra.unbind(0))
                x = torch.stack([x[0], merged])
            for block in getattr(self, f"block{stage}"):
                x = block(x, height, width)
            x = getattr(self, f"norm{stage}")(x)
            out = _to_maps(x, height, width).contiguous()  # (2B, C, h, w): RGB batch, then X batch
            outputs.append(out.reshape(2, -1, *out.shape[1:]))
            if streams > 2:
                rgb, merged = out.chunk(2)
                carried = _to_maps(extra, height, width) + merged.repeat(streams - 1, 1, 1, 1)
                maps = torch.cat([rgb, carried])
            else:
                maps = out
        return outputs


class DeliverSegmenter(GeminiSegmenter):
    """Encoder + shared SegFormer decoder. ``forward(inputs)`` with one ``(B, 3, H, W)`` batch per
    modality (any H, W) returns ``[logits_0 (RGB), logits_1 (merged X), ensemble]`` at ``H x W``; the
    ensemble is ``softmax(alpha)``-weighted over the detached logits."""

    def __init__(self, encoder: DeliverMiT, modalities: Sequence[str], num_classes: int, embed_dim: int = 512,
                 decoder_dropout: float = 0.1):
        nn.Module.__init__(self)
        self.num_classes = num_classes
        self.modalities = tuple(modalities)
        self.encoder = encoder
        self.decoder = SegFormerHead(encoder.embed_dims, num_classes, embed_dim, decoder_dropout)
        self.apply(init_deliver)
        # The published Attention's MultiheadAttention / Embedding parameters are untouched by every
        # _init_weights pass (not Linear / Conv2d / norms): GeminiFusion's own initialisation.
        for module in self.modules():
            if isinstance(module, GeminiFusion):
                module.reset_parameters()
        self.alpha = nn.Parameter(torch.ones(2))

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    def forward(self, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
        if not isinstance(inputs, (list, tuple)) or len(inputs) != self.num_modalities:
            raise ValueError(f"inputs must be a list of {self.num_modalities} image batches "
                             f"({', '.join(self.modalities)}); got "
                             f"{len(inputs) if isinstance(inputs, (list, tuple)) else type(inputs).__name__}")
        shapes = {tuple(x.shape) for x in inputs}
        if len(shapes) != 1 or len(next(iter(shapes))) != 4:
            raise ValueError(f"inputs must be (B, 3, H, W) batches of one shape; got {sorted(shapes)}")
        size = inputs[0].shape[-2:]
        features = self.encoder(inputs)
        logits = [F.interpolate(self.decoder([f[m] for f in features]), size=size, mode="bilinear",
                                align_corners=False) for m in range(2)]
        weights = torch.softmax(self.alpha, dim=0)
        return logits + [sum(w * l.detach() for w, l in zip(weights, logits))]

    def param_groups(self):
        """The DeLiVER optimizer's groups: non-decoder weights with at least 2 dims (decayed), the other
        non-decoder parameters, ``alpha`` included (not decayed), the decoder (10x learning rate)."""
        decayed, plain = [], []
        for name, p in self.named_parameters():
            if not name.startswith("decoder."):
                (decayed if p.dim() > 1 else plain).append(p)
        return decayed, plain, list(self.decoder.parameters())


def build_deliver_model(backbone: str = "mit_b2", num_classes: int = 25, fusion_backend: str = "auto", *,
                        modalities: Sequence[str] = DELIVER_MODALITIES, drop_path_rate: float = 0.0,
                        drop_rate: float = 0.0, fusion_heads: int = 8, embed_dim: int = 512,
                        decoder_dropout: float = 0.1) -> DeliverSegmenter:
    """The DeLiVER GeminiFusion segmenter (``GeminiFusion("GeminiFusionBackbone-B*", num_classes,
    modals)`` of the published ``DeLiVER`` branch).

    Args:
        backbone: ``"mit_b0"`` ... ``"mit_b5"`` (published: B2).
        num_classes: 25 for DeLiVER.
        fusion_backend: as for :func:`build_model`.
        modalities: the published ``MODALS``: ``"img"`` first, then one to three distinct names of
            ``"depth"``, ``"event"``, ``"lidar"``, in the order the inputs come.
        drop_path_rate: stochastic depth at the last block (published ``--drop_path_rate`` default 0.4;
            the model's own default 0.0).
        embed_dim: the decoder width (published: 512).
    """
    if backbone not in MIT_CONFIGS:
        raise ValueError(f"backbone must be one of {sorted(MIT_CONFIGS)}; got {backbone!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int; got {num_classes!r}")
    if fusion_backend != "auto" and fusion_backend not in BACKENDS:
        raise ValueError(f"fusion_backend must be one of {['auto', *BACKENDS]}; got {fusion_backend!r}")
    if isinstance(modalities, str):
        raise ValueError(f"modalities must be a sequence of names, not a string; got {modalities!r}")
    modalities = tuple(modalities)
    if (len(modalities) < 2 or modalities[0] != "img" or len(set(modalities)) != len(modalities)
            or not set(modalities[1:]) <= set(DELIVER_MODALITIES[1:])):
        raise ValueError(f"modalities must be 'img' followed by one or more distinct names of "
                         f"{list(DELIVER_MODALITIES[1:])}; got {list(modalities)}")
    encoder = DeliverMiT(MIT_CONFIGS[backbone], len(modalities), fusion_heads=fusion_heads,
                         fusion_backend=fusion_backend, drop_path_rate=drop_path_rate, drop_rate=drop_rate)
    return DeliverSegmenter(encoder, modalities, num_classes, embed_dim, decoder_dropout)
