"""The fusion parameters: their published names, their shapes, and the tuple every backend receives.

The names are the ones of the published GeminiFusion checkpoints (SPEC §1), so that
``module.state_dict()`` and a checkpoint's fusion sub-dict are interchangeable.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Union

import torch
from torch import Tensor


class FusionParams(NamedTuple):
    """All fusion parameters as plain tensors, in a fixed order that kernels and custom ops rely on.

    Direction 0 is modality 0 querying modality 1 (``cross_attn_0_to_1``, row 0 of the noises);
    direction 1 is the reverse.
    """

    fc1_weight: Tensor  # (C, 2C)  relation judger layer 1, applied to concat(self, other)
    fc1_bias: Tensor  # (C,)
    fc2_weight: Tensor  # (C, C)
    fc2_bias: Tensor  # (C,)
    k_noise: Tensor  # (2, C)   row d serves direction d
    v_noise: Tensor  # (2, C)
    in_proj_weight_0: Tensor  # (3C, C)  rows [Wq; Wk; Wv] of direction 0
    in_proj_bias_0: Tensor  # (3C,)
    out_proj_weight_0: Tensor  # (C, C)
    out_proj_bias_0: Tensor  # (C,)
    in_proj_weight_1: Tensor  # direction 1, same shapes
    in_proj_bias_1: Tensor
    out_proj_weight_1: Tensor
    out_proj_bias_1: Tensor

    @property
    def dim(self) -> int:
        return self.fc2_weight.shape[0]

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor]) -> "FusionParams":
        missing = [name for name in PARAM_NAMES if name not in state]
        if missing:
            raise KeyError(f"params is missing {missing}; expected the keys {list(PARAM_NAMES)}")
        return cls(*(state[name] for name in PARAM_NAMES))

    def state_dict(self) -> dict:
        return dict(zip(PARAM_NAMES, self))


# The parameter table: FusionParams field, published name, shape as a function of the width C, in
# field order. PARAM_NAMES and param_shapes both read it; the extension's table (csrc/fusion_params.h)
# is compared with it in tests/test_cuda_host.py.
_PARAM_TABLE = (
    ("fc1_weight", "relation_judger.0.fc1.weight", lambda c: (c, 2 * c)),
    ("fc1_bias", "relation_judger.0.fc1.bias", lambda c: (c,)),
    ("fc2_weight", "relation_judger.0.fc2.weight", lambda c: (c, c)),
    ("fc2_bias", "relation_judger.0.fc2.bias", lambda c: (c,)),
    ("k_noise", "k_noise.weight", lambda c: (2, c)),
    ("v_noise", "v_noise.weight", lambda c: (2, c)),
    ("in_proj_weight_0", "cross_attn_0_to_1.in_proj_weight", lambda c: (3 * c, c)),
    ("in_proj_bias_0", "cross_attn_0_to_1.in_proj_bias", lambda c: (3 * c,)),
    ("out_proj_weight_0", "cross_attn_0_to_1.out_proj.weight", lambda c: (c, c)),
    ("out_proj_bias_0", "cross_attn_0_to_1.out_proj.bias", lambda c: (c,)),
    ("in_proj_weight_1", "cross_attn_1_to_0.in_proj_weight", lambda c: (3 * c, c)),
    ("in_proj_bias_1", "cross_attn_1_to_0.in_proj_bias", lambda c: (3 * c,)),
    ("out_proj_weight_1", "cross_attn_1_to_0.out_proj.weight", lambda c: (c, c)),
    ("out_proj_bias_1", "cross_attn_1_to_0.out_proj.bias", lambda c: (c,)),
)
assert tuple(field for field, _, _ in _PARAM_TABLE) == FusionParams._fields, "_PARAM_TABLE is out of FusionParams order"

# Published name of each FusionParams field, in field order.
PARAM_NAMES = tuple(name for _, name, _ in _PARAM_TABLE)


def param_shapes(dim: int) -> dict:
    """The expected shape of every parameter for a fusion layer of width ``dim``."""
    return {name: shape(dim) for _, name, shape in _PARAM_TABLE}


ParamsLike = Union[FusionParams, Mapping[str, Tensor]]


def as_fusion_params(params: ParamsLike) -> FusionParams:
    if isinstance(params, FusionParams):
        return params
    if isinstance(params, Mapping):
        return FusionParams.from_state_dict(params)
    raise TypeError(
        f"params must be a FusionParams or a mapping from the published parameter names to tensors "
        f"(e.g. GeminiFusion.state_dict()); got {type(params).__name__}"
    )


def random_params(dim: int, *, dtype=torch.float32, device=None, generator=None, scale: float = 1.0) -> FusionParams:
    """Random parameters with every weight, bias and noise non-zero; for tests and benchmarks.

    Weights are scaled by 1/sqrt(fan_in) so activations keep unit size, which keeps the softmaxes away
    from saturation and the comparisons against the oracle meaningful.
    """
    tensors = []
    for name, shape in param_shapes(dim).items():
        t = torch.randn(shape, dtype=torch.float64, generator=generator)
        if name.endswith("weight") and "noise" not in name:
            t = t * (scale / shape[1] ** 0.5)
        elif name.endswith("bias"):
            t = t * 0.1 * scale
        tensors.append(t.to(dtype=dtype, device=device))
    return FusionParams(*tensors)
