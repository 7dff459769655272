"""gemini_seg: the reference GeminiFusion segmentation model (dual-stream MiT or Swin + SegFormer head; the DeLiVER model for up to four modalities), its
data, checkpoint loading and training. See models/README.md."""
from .build import BACKBONES, build_model
from .deliver import DELIVER_MODALITIES, DeliverSegmenter, build_deliver_model
from .checkpoint import (
    from_published_state_dict,
    load_imagenet_mit,
    load_published_checkpoint,
    to_published_state_dict,
)
from .head import GeminiSegmenter, SegFormerHead
from .mit import MIT_CONFIGS, MixVisionTransformer
from .swin import SWIN_CONFIGS, SwinTransformer

__all__ = [
    "build_model",
    "build_deliver_model",
    "BACKBONES",
    "DELIVER_MODALITIES",
    "DeliverSegmenter",
    "SwinTransformer",
    "SWIN_CONFIGS",
    "GeminiSegmenter",
    "SegFormerHead",
    "MixVisionTransformer",
    "MIT_CONFIGS",
    "load_published_checkpoint",
    "from_published_state_dict",
    "to_published_state_dict",
    "load_imagenet_mit",
]
