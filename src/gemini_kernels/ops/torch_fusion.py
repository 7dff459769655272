"""The ``"torch"`` backend: the oracle itself, differentiated by autograd."""
from __future__ import annotations

from typing import Optional

import torch

from ..reference import gemini_fusion_reference as fusion  # noqa: F401  (the backend entry point)


def unavailable_reason(device: torch.device) -> Optional[str]:
    return None
