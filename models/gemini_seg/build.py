"""``build_model``: the published architectures by name."""
from __future__ import annotations

from gemini_kernels.backends import BACKENDS

from .head import GeminiSegmenter
from .mit import MIT_CONFIGS, MixVisionTransformer
from .swin import SWIN_CONFIGS, SwinTransformer

BACKBONES = (*MIT_CONFIGS, *SWIN_CONFIGS)


def build_model(backbone: str = "mit_b3", num_classes: int = 40, fusion_backend: str = "auto", *,
                num_modalities: int = 2, fusion: bool = True, drop_path_rate: float = 0.1,
                drop_rate: float = 0.0, fusion_heads: int = 8, embed_dim: int = 256,
                decoder_dropout: float = 0.1) -> GeminiSegmenter:
    """A GeminiFusion segmenter: dual-stream MiT (``backbone`` = ``"mit_b0"`` ... ``"mit_b5"``) or Swin
    (``"swin_tiny"``, ``"swin_small"``, ``"swin_large"``, ``"swin_large_window12"``,
    ``"swin_large_window12_to_1k"``; see swin.py) with GeminiFusion in every block, and the SegFormer
    head. The published NYUDv2 / SUN RGB-D models (``main.py`` / ``WeTr``) for every name.

    Args:
        num_classes: 40 for NYUDv2, 37 for SUN RGB-D.
        fusion_backend: ``"auto"``, ``"torch"`` (the oracle), ``"triton"``, ``"cuda"`` or ``"cpu_cpp"``, resolved per
            call on the input's device; every fusion layer uses it. It never changes the parameters, so
            :meth:`GeminiSegmenter.set_fusion_backend` can switch it later.
        num_modalities: 2 (RGB + X); 1 builds the single-stream SegFormer (no fusion), the RGB-only
            baseline.
        fusion: ``False`` removes the fusion layers from the dual-stream model (the streams then only
            share weights); used as the speed baseline.
        drop_path_rate: stochastic depth at the last block (linear from 0); the published training
            uses 0.4 for MiT-B3 (``main.py --dpr``), 0.1 is the WeTr default.
        embed_dim: the decoder width (256; 512 on DeLiVER).
        decoder_dropout: the decoder's channel dropout before the classifier (published: 0.1).
    """
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {list(BACKBONES)}; got {backbone!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int; got {num_classes!r}")
    if fusion_backend != "auto" and fusion_backend not in BACKENDS:
        raise ValueError(f"fusion_backend must be one of {['auto', *BACKENDS]}; got {fusion_backend!r}")
    if backbone in SWIN_CONFIGS:
        # The published Swin block hard-codes 8 fusion heads; fusion_heads=8 (the default) is that model.
        encoder = SwinTransformer(
            SWIN_CONFIGS[backbone], num_modalities=num_modalities, fusion=fusion, fusion_heads=fusion_heads,
            fusion_backend=fusion_backend, drop_path_rate=drop_path_rate, drop_rate=drop_rate,
        )
        return GeminiSegmenter(encoder, num_classes, embed_dim, decoder_dropout)
    encoder = MixVisionTransformer(
        MIT_CONFIGS[backbone], num_modalities=num_modalities, fusion=fusion and num_modalities == 2,
        fusion_heads=fusion_heads, fusion_backend=fusion_backend, drop_path_rate=drop_path_rate,
        drop_rate=drop_rate,
    )
    return GeminiSegmenter(encoder, num_classes, embed_dim, decoder_dropout)
