"""gemini-kernels: fused kernels for GeminiFusion, the pixel-wise cross-modal fusion of RGB-X ViTs.

Layout:
    reference.py   the pure-PyTorch oracle (the math of SPEC §1, the "torch" backend)
    module.py      GeminiFusion, the drop-in nn.Module
    functional.py  gemini_fusion(x0, x1, params, ...), the functional form
    backends.py    the backend registry and "auto" dispatch
    ops/           one module per backend (kernels, launchers, autograd Functions)
    params.py      parameter names, shapes and the FusionParams tuple
    validation.py  argument checks with messages that say what was expected
    checkpoint.py  load_checkpoint_file: reads checkpoints (published ones included) without running pickles
    patching.py    patch(model): the published code's per-batch fusion loops replaced by the fused layer
    info.py        the environment report of `python -m gemini_kernels` (versions, devices, backends)
"""
from .backends import available_backends
from .checkpoint import load_checkpoint_file
from .functional import gemini_fusion
from .module import GeminiFusion
from .params import PARAM_NAMES, FusionParams, random_params
from .patching import is_patched, patch
from .reference import gemini_fusion_reference

__all__ = [
    "GeminiFusion",
    "gemini_fusion",
    "gemini_fusion_reference",
    "available_backends",
    "load_checkpoint_file",
    "FusionParams",
    "PARAM_NAMES",
    "random_params",
    "patch",
    "is_patched",
]
__version__ = "0.1.0"
