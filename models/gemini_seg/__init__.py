"""gemini_seg: the reference GeminiFusion segmentation model (dual-stream MiT + SegFormer head), its
data, checkpoint loading and training. See models/README.md."""
from .build import build_model
from .checkpoint import (
    from_published_state_dict,
    load_imagenet_mit,
    load_published_checkpoint,
    to_published_state_dict,
)
from .head import GeminiSegmenter, SegFormerHead
from .mit import MIT_CONFIGS, MixVisionTransformer

__all__ = [
    "build_model",
    "GeminiSegmenter",
    "SegFormerHead",
    "MixVisionTransformer",
    "MIT_CONFIGS",
    "load_published_checkpoint",
    "from_published_state_dict",
    "to_published_state_dict",
    "load_imagenet_mit",
]
