"""The SegFormer all-MLP decoder, shared by both streams, and the segmenter around it."""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gemini_kernels import GeminiFusion

from .layers import ConvBNReLU
from .mit import MixVisionTransformer


class LinearEmbed(nn.Module):
    """A per-pixel Linear from a stage's width to the decoder's (published name ``linear_c{s}.proj``)."""

    def __init__(self, in_channels: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_channels, embed_dim)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = maps.shape
        tokens = self.proj(maps.flatten(2).transpose(1, 2))
        return tokens.transpose(1, 2).reshape(batch, -1, height, width)


class SegFormerHead(nn.Module):
    """Project each stage to ``embed_dim``, upsample to stride 4, concatenate, fuse (1x1 conv + BN +
    ReLU), channel dropout (0.1 as published), classify. Returns logits at 1/4 of the input resolution."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, embed_dim: int = 256, dropout: float = 0.1):
        super().__init__()
        for stage, channels in enumerate(in_channels, start=1):
            setattr(self, f"linear_c{stage}", LinearEmbed(channels, embed_dim))
        self.linear_fuse = ConvBNReLU(4 * embed_dim, embed_dim)
        self.dropout = nn.Dropout2d(dropout)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, kernel_size=1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        embedded = []
        # Deepest first: the published concatenation order, which fixes linear_fuse's input channels.
        for stage in (4, 3, 2, 1):
            x = getattr(self, f"linear_c{stage}")(features[stage - 1])
            if stage != 1:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            embedded.append(x)
        fused = self.linear_fuse(torch.cat(embedded, dim=1))
        return self.linear_pred(self.dropout(fused))


class GeminiSegmenter(nn.Module):
    """Encoder + shared decoder. ``forward(inputs)`` with ``inputs`` a list of one image batch per
    modality returns a list of logits at 1/4 resolution: ``[logits_0, logits_1, ensemble]`` for two
    modalities, ``[logits_0]`` for one.

    The ensemble is ``softmax(alpha)``-weighted over the streams' *detached* logits, as published: its
    loss trains ``alpha`` only, never the streams.
    """

    def __init__(self, encoder: MixVisionTransformer, num_classes: int, embed_dim: int = 256,
                 decoder_dropout: float = 0.1):
        super().__init__()
        self.num_classes = num_classes
        self.encoder = encoder
        self.decoder = SegFormerHead(encoder.embed_dims, num_classes, embed_dim, decoder_dropout)
        if encoder.num_modalities > 1:
            self.alpha = nn.Parameter(torch.ones(encoder.num_modalities))

    @property
    def num_modalities(self) -> int:
        return self.encoder.num_modalities

    def forward(self, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
        features = self.encoder(inputs)
        # The decoder runs per stream: its BatchNorm then sees each stream's batch alone, as published.
        logits = [self.decoder([f[m] for f in features]) for m in range(self.num_modalities)]
        if self.num_modalities == 1:
            return logits
        weights = torch.softmax(self.alpha, dim=0)
        ensemble = sum(w * l.detach() for w, l in zip(weights, logits))
        return logits + [ensemble]

    def set_fusion_backend(self, backend: str) -> None:
        """Switch every fusion layer to ``backend``; the parameters do not change."""
        for module in self.encoder.modules():
            if isinstance(module, GeminiFusion):
                module.backend = backend

    def param_groups(self):
        """The published three groups: encoder weights (decayed), encoder norms (not decayed), decoder
        (decayed, 10x learning rate). ``alpha`` belongs to none of them, as published, so it stays at
        its initial value unless a caller adds it."""
        encoder, norms = [], []
        for name, p in self.encoder.named_parameters():
            (norms if "norm" in name else encoder).append(p)
        return encoder, norms, list(self.decoder.parameters())
